//! The data directory: where uploaded files, batch records and results live, and how each is
//! written so that a crash at any instant leaves a state that a restart finishes from.
//!
//! ```text
//! <data-dir>/
//!   lock                            locked while a server uses the directory
//!   files/<file-id>.jsonl           a file's content, never changed once named
//!   files/<file-id>.json            its metadata (File object), written after the content
//!   batches/<batch-id>.json         a batch's record, replaced whole on each status change
//!   batches/<batch-id>/output.jsonl results answered 2xx, appended and synced per line
//!   batches/<batch-id>/errors.jsonl the other results
//! ```
//!
//! The rules that make it crash-safe:
//! - JSON records and uploaded content are written to a temporary name, synced, then renamed
//!   over the final name (and the directory synced): a reader sees the old or the new, whole.
//! - A file exists for the API only once its metadata does; content without metadata is an
//!   upload (or a result file) that never finished, and is removed at start.
//! - Results are appended one synced line at a time ([`super::jsonl::ResultsFile`]); a
//!   batch's result files become File objects by a hard link into `files/` (same inode, no
//!   copy), which is idempotent, so finishing a batch again after a crash is harmless.
//! - One server per directory: the `lock` file is locked for the process's life (the kernel
//!   drops the lock when the process dies, SIGKILL included). Two servers running the same
//!   batch would answer its lines twice.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Serialize;

use super::objects::{BatchId, BatchRecord, FileId, FileObject};

/// Which result file of a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResultKind {
    /// 2xx answers.
    Output,
    /// Everything else.
    Errors,
}

/// An open data directory, locked for this process.
#[derive(Debug)]
pub struct DataDir {
    root: PathBuf,
    /// Holds the lock; unlocked when dropped or when the process dies.
    _lock: File,
}

impl DataDir {
    /// Opens (creating if needed) the directory at `root`, locks it, and removes what an
    /// interrupted run left half-made.
    pub fn open(root: &Path) -> io::Result<Self> {
        fs::create_dir_all(root.join("files"))?;
        fs::create_dir_all(root.join("batches"))?;
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(root.join("lock"))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => {
                return Err(io::Error::new(
                    io::ErrorKind::WouldBlock,
                    format!(
                        "{} is in use by another candela server (one server per data directory)",
                        root.display()
                    ),
                ))
            }
            Err(fs::TryLockError::Error(e)) => return Err(e),
        }
        let dir = Self {
            root: root.to_owned(),
            _lock: lock,
        };
        dir.remove_unfinished()?;
        Ok(dir)
    }

    /// The directory's path.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn files_dir(&self) -> PathBuf {
        self.root.join("files")
    }

    fn batches_dir(&self) -> PathBuf {
        self.root.join("batches")
    }

    /// Where a file's content is.
    pub fn content_path(&self, id: &FileId) -> PathBuf {
        self.files_dir().join(format!("{id}.jsonl"))
    }

    fn meta_path(&self, id: &FileId) -> PathBuf {
        self.files_dir().join(format!("{id}.json"))
    }

    fn record_path(&self, id: &BatchId) -> PathBuf {
        self.batches_dir().join(format!("{id}.json"))
    }

    fn work_dir(&self, id: &BatchId) -> PathBuf {
        self.batches_dir().join(id.as_str())
    }

    /// A batch's result file while it runs.
    pub fn results_path(&self, id: &BatchId, kind: ResultKind) -> PathBuf {
        let name = match kind {
            ResultKind::Output => "output.jsonl",
            ResultKind::Errors => "errors.jsonl",
        };
        self.work_dir(id).join(name)
    }

    /// Creates a batch's working directory (for its result files).
    pub fn create_work_dir(&self, id: &BatchId) -> io::Result<()> {
        fs::create_dir_all(self.work_dir(id))?;
        sync_dir(&self.batches_dir())
    }

    /// Removes a finished batch's working directory (its results live on as files).
    pub fn remove_work_dir(&self, id: &BatchId) -> io::Result<()> {
        match fs::remove_dir_all(self.work_dir(id)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// A new temporary path for an upload in progress.
    pub fn upload_path(&self) -> PathBuf {
        self.files_dir()
            .join(format!("upload-{}.tmp", uuid::Uuid::new_v4().simple()))
    }

    /// Makes the finished upload at `upload` the content of file `id`.
    pub fn commit_upload(&self, upload: &Path, id: &FileId) -> io::Result<()> {
        File::open(upload)?.sync_all()?;
        fs::rename(upload, self.content_path(id))?;
        sync_dir(&self.files_dir())
    }

    /// Makes a batch's result file the content of file `id`, unless it already is.
    pub fn link_results(&self, results: &Path, id: &FileId) -> io::Result<()> {
        match fs::hard_link(results, self.content_path(id)) {
            Err(e) if e.kind() != io::ErrorKind::AlreadyExists => Err(e),
            _ => sync_dir(&self.files_dir()),
        }
    }

    /// Writes a file's metadata: from then on the file exists.
    pub fn write_file_meta(&self, file: &FileObject) -> io::Result<()> {
        write_json(&self.meta_path(&file.id), file)
    }

    /// Removes a file: metadata first, so a crash in between leaves content that the next
    /// start removes.
    pub fn remove_file(&self, id: &FileId) -> io::Result<()> {
        for path in [self.meta_path(id), self.content_path(id)] {
            match fs::remove_file(&path) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        sync_dir(&self.files_dir())
    }

    /// Writes a batch's record.
    pub fn write_batch(&self, record: &BatchRecord) -> io::Result<()> {
        write_json(&self.record_path(&record.batch.id), record)
    }

    /// Every stored file's metadata. A record that cannot be read is logged and skipped (one
    /// damaged record must not keep the server from starting).
    pub fn load_files(&self) -> io::Result<Vec<FileObject>> {
        load_all(&self.files_dir())
    }

    /// Every stored batch record (skipping unreadable ones, as [`Self::load_files`] does).
    pub fn load_batches(&self) -> io::Result<Vec<BatchRecord>> {
        load_all(&self.batches_dir())
    }

    /// Removes temporaries and content whose metadata was never written.
    fn remove_unfinished(&self) -> io::Result<()> {
        for dir in [self.files_dir(), self.batches_dir()] {
            for entry in fs::read_dir(&dir)? {
                let path = entry?.path();
                let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
                let orphan = name.ends_with(".jsonl") && !path.with_extension("json").exists();
                if name.ends_with(".tmp") || orphan {
                    tracing::info!(path = %path.display(), "removing an unfinished file");
                    fs::remove_file(&path)?;
                }
            }
        }
        Ok(())
    }
}

/// Writes `value` as JSON to `path` atomically: a temporary name, synced, renamed, and the
/// directory synced.
fn write_json(path: &Path, value: &impl Serialize) -> io::Result<()> {
    let dir = path
        .parent()
        .ok_or_else(|| io::Error::other("a record path has a parent"))?;
    let tmp = path.with_extension("json.tmp");
    let mut file = File::create(&tmp)?;
    let bytes = serde_json::to_vec(value).map_err(io::Error::other)?;
    file.write_all(&bytes)?;
    file.sync_all()?;
    fs::rename(&tmp, path)?;
    sync_dir(dir)
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

fn load_all<T: DeserializeOwned>(dir: &Path) -> io::Result<Vec<T>> {
    let mut items = Vec::new();
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        if path.extension().and_then(|e| e.to_str()) != Some("json") {
            continue;
        }
        let parsed = fs::read(&path)
            .map_err(|e| e.to_string())
            .and_then(|bytes| serde_json::from_slice::<T>(&bytes).map_err(|e| e.to_string()));
        match parsed {
            Ok(item) => items.push(item),
            Err(e) => {
                tracing::error!(path = %path.display(), error = %e, "skipping an unreadable record")
            }
        }
    }
    Ok(items)
}

#[cfg(test)]
mod tests {
    use super::super::objects::{FileStatus, ObjectKind, Purpose};
    use super::*;

    fn file_object(id: &FileId) -> FileObject {
        FileObject {
            id: id.clone(),
            object: ObjectKind::File,
            bytes: 3,
            created_at: 1,
            filename: "in.jsonl".into(),
            purpose: Purpose::Batch,
            status: FileStatus::Processed,
            expires_at: None,
            status_details: None,
        }
    }

    #[test]
    fn one_server_per_directory() {
        let tmp = tempfile::tempdir().expect("temp dir");
        let first = DataDir::open(tmp.path()).expect("open");
        let second = DataDir::open(tmp.path()).expect_err("locked");
        assert_eq!(second.kind(), io::ErrorKind::WouldBlock);
        assert!(second.to_string().contains("another candela server"));
        drop(first);
        DataDir::open(tmp.path()).expect("free again");
    }

    #[test]
    fn files_exist_once_their_metadata_does() {
        let tmp = tempfile::tempdir().expect("temp dir");
        let dir = DataDir::open(tmp.path()).expect("open");
        let kept = FileId::new();
        let upload = dir.upload_path();
        fs::write(&upload, "abc").expect("write");
        dir.commit_upload(&upload, &kept).expect("commit");
        dir.write_file_meta(&file_object(&kept)).expect("meta");
        // Interrupted: content without metadata, and an upload never committed.
        let orphan = FileId::new();
        let upload = dir.upload_path();
        fs::write(&upload, "x").expect("write");
        fs::write(dir.content_path(&orphan), "x").expect("write");
        drop(dir);

        let dir = DataDir::open(tmp.path()).expect("reopen");
        assert_eq!(dir.load_files().expect("load"), vec![file_object(&kept)]);
        assert!(!dir.content_path(&orphan).exists());
        assert!(!upload.exists());
        assert_eq!(
            fs::read_to_string(dir.content_path(&kept)).expect("read"),
            "abc"
        );
        dir.remove_file(&kept).expect("remove");
        assert!(dir.load_files().expect("load").is_empty());
        assert!(!dir.content_path(&kept).exists());
    }

    #[test]
    fn linking_results_twice_is_harmless() {
        let tmp = tempfile::tempdir().expect("temp dir");
        let dir = DataDir::open(tmp.path()).expect("open");
        let batch = BatchId::new();
        dir.create_work_dir(&batch).expect("work dir");
        let results = dir.results_path(&batch, ResultKind::Output);
        fs::write(&results, "{}\n").expect("write");
        let id = FileId::new();
        dir.link_results(&results, &id).expect("link");
        dir.link_results(&results, &id).expect("link again");
        dir.remove_work_dir(&batch).expect("remove");
        dir.remove_work_dir(&batch).expect("remove again");
        assert_eq!(
            fs::read_to_string(dir.content_path(&id)).expect("read"),
            "{}\n"
        );
    }
}
