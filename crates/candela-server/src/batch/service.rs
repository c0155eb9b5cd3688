//! The Batch API's state: the files and batches clients see, the limits on them, and the
//! operations of the routes (upload, list, delete, create, cancel). A batch's own life, the
//! task that runs it, is in `task.rs`; at start [`BatchService::resume`] gives every
//! unfinished batch its task again.
//!
//! State: one registry (files and batches) under a std mutex, held only for short in-memory
//! reads and updates, never across an await; disk work runs on blocking threads. Every
//! change is written to the data directory before it is answered.

use std::collections::HashMap;
use std::fs;
use std::io::{self, BufReader};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use serde::Deserialize;
use serde_json::Value;
use tokio::sync::{Notify, Semaphore};

use super::jsonl::{
    duplicate_custom_ids, parse_lines, shown_ids, BatchRequest, Endpoint, InputError, Line,
};
use super::objects::{
    BatchId, BatchObject, BatchRecord, BatchStatus, FileDeleted, FileId, FileObject, FileStatus,
    ListPage, ObjectKind, Purpose, RequestCounts,
};
use super::runner::{Dispatch, Patience, BATCH_PRIORITY};
use super::store::DataDir;
use crate::app::{unix_now_s, AppState};
use crate::error::ApiError;

/// Default largest uploaded file (OpenAI's batch input limit is 200 MB).
pub const FILE_BYTES_MAX_DEFAULT: u64 = 100 << 20;
/// Most requests in one batch file (OpenAI's limit).
pub const REQUESTS_PER_BATCH_MAX: usize = 50_000;
/// Most files stored at once; beyond it uploads are refused until some are deleted.
pub const FILES_MAX: usize = 10_000;
/// Most batches not yet finished at once; beyond it creation answers 429.
pub const BATCHES_UNFINISHED_MAX: usize = 100;
/// The only completion window, and its length.
const COMPLETION_WINDOW: &str = "24h";
const COMPLETION_WINDOW_S: u64 = 24 * 3600;
/// OpenAI's metadata limits.
const METADATA_PAIRS_MAX: usize = 16;
const METADATA_KEY_CHARS_MAX: usize = 64;
const METADATA_VALUE_CHARS_MAX: usize = 512;
/// Longest stored file name (longer ones are cut).
const FILENAME_CHARS_MAX: usize = 256;
/// Most items on one page of a listing, and the default for files (OpenAI's).
const LIST_LIMIT_MAX: usize = 10_000;
/// The default page size of a batch listing (OpenAI's).
pub const BATCH_LIST_LIMIT_DEFAULT: usize = 20;

/// Settings of the Batch API.
#[derive(Debug, Clone)]
pub struct BatchConfig {
    /// Where files, batches and results are stored.
    pub data_dir: PathBuf,
    /// Largest uploaded file, in bytes.
    pub file_bytes_max: u64,
    /// Most batch requests in the engine at once, over all batches: the rest of the engine's
    /// running slots stay free for interactive requests.
    pub in_flight_max: usize,
}

/// Files and batches, as clients see them.
#[derive(Default)]
pub(super) struct Registry {
    pub(super) files: HashMap<FileId, FileObject>,
    pub(super) batches: HashMap<BatchId, Entry>,
}

pub(super) struct Entry {
    pub(super) record: BatchRecord,
    /// Wakes the batch's task when cancel is asked.
    pub(super) cancel: Arc<Notify>,
}

/// The body of `POST /v1/batches`.
#[derive(Debug, Deserialize)]
pub struct CreateBatch {
    /// An uploaded file with purpose `batch`.
    pub input_file_id: Option<String>,
    /// `/v1/chat/completions` or `/v1/completions`; every line's `url` must match.
    pub endpoint: Option<String>,
    /// Must be `24h`.
    pub completion_window: Option<String>,
    /// Up to 16 string pairs.
    pub metadata: Option<Value>,
    /// Anything else: refused by name.
    #[serde(flatten)]
    pub unknown: serde_json::Map<String, Value>,
}

/// An upload being written; removed when dropped unless it became a file.
pub struct Upload {
    path: PathBuf,
    committed: bool,
}

impl Upload {
    /// Where to write it.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Upload {
    fn drop(&mut self) {
        if !self.committed {
            // Best effort: a leftover is removed at the next start.
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// The Batch API over a data directory.
pub struct BatchService {
    pub(super) dir: DataDir,
    pub(super) config: BatchConfig,
    /// How batch requests reach the routes: the server's own router, at batch priority.
    pub(super) dispatch: Dispatch,
    /// The state behind that router: it shares the server's drain flag.
    pub(super) dispatch_state: AppState,
    /// The in-flight bound shared by every batch.
    pub(super) slots: Arc<Semaphore>,
    pub(super) registry: Mutex<Registry>,
    /// Serializes batch-record writes; each writes the newest state (see [`Self::persist`]).
    pub(super) record_writes: Mutex<()>,
}

pub(super) fn internal(context: &str, e: impl std::fmt::Display) -> ApiError {
    ApiError::Internal(format!("{context}: {e}"))
}

pub(super) fn poisoned<T>(_: T) -> io::Error {
    io::Error::other("a batch lock was poisoned by a panic")
}

fn not_found(what: &str, id: &str, param: &'static str) -> ApiError {
    ApiError::NotFound {
        message: format!("No such {what} object: {id}"),
        param: Some(param),
    }
}

/// Why a file cannot be run as a batch.
pub(super) struct InputProblem {
    pub(super) line: Option<usize>,
    pub(super) message: String,
}

impl InputProblem {
    fn whole(message: impl Into<String>) -> Self {
        Self {
            line: None,
            message: message.into(),
        }
    }
}

/// Reads and checks a batch file: every line a request, custom_ids unique, at least one
/// request, and (with `endpoint`) every `url` that endpoint.
pub(super) fn read_requests(
    path: &Path,
    endpoint: Option<Endpoint>,
) -> Result<Vec<BatchRequest>, InputProblem> {
    let file = fs::File::open(path).map_err(|e| InputProblem::whole(e.to_string()))?;
    let lines = parse_lines(BufReader::new(file), REQUESTS_PER_BATCH_MAX).map_err(|e| match e {
        InputError::Io(e) if e.kind() == io::ErrorKind::InvalidData => {
            InputProblem::whole("the file is not UTF-8 text")
        }
        other => InputProblem::whole(other.to_string()),
    })?;
    let duplicates = duplicate_custom_ids(&lines);
    if !duplicates.is_empty() {
        return Err(InputProblem::whole(format!(
            "the file has {} duplicate custom_id(s): {}; every custom_id must be unique",
            duplicates.len(),
            shown_ids(&duplicates)
        )));
    }
    let mut requests = Vec::with_capacity(lines.len());
    for line in lines {
        match line {
            Line::Request(r) => requests.push(r),
            Line::Invalid {
                line_number,
                message,
                ..
            } => {
                return Err(InputProblem {
                    line: Some(line_number),
                    message,
                })
            }
        }
    }
    if requests.is_empty() {
        return Err(InputProblem::whole("the file holds no request"));
    }
    if let Some(endpoint) = endpoint {
        // Line numbers count blank lines too; the index here does not, so name the custom_id.
        if let Some(r) = requests.iter().find(|r| r.endpoint != endpoint) {
            return Err(InputProblem::whole(format!(
                "the request with custom_id {:?} goes to {}, but the batch's endpoint is {}: \
                 every line's `url` must be the batch's endpoint",
                r.custom_id,
                r.endpoint.path(),
                endpoint.path()
            )));
        }
    }
    Ok(requests)
}

impl BatchService {
    /// Opens the data directory and loads what it holds. `server` is the state of the
    /// server's router: batch requests go to a router over the same backend (and drain
    /// flag), without auth. Call [`Self::resume`] once the runtime runs.
    pub fn open(config: BatchConfig, server: &AppState) -> io::Result<Arc<Self>> {
        if config.in_flight_max == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "the batch in-flight bound must be at least 1",
            ));
        }
        let dir = DataDir::open(&config.data_dir)?;
        let mut registry = Registry::default();
        for file in dir.load_files()? {
            registry.files.insert(file.id.clone(), file);
        }
        for record in dir.load_batches()? {
            registry.batches.insert(
                record.batch.id.clone(),
                Entry {
                    record,
                    cancel: Arc::new(Notify::new()),
                },
            );
        }
        let dispatch_state = server.for_dispatch();
        let dispatch = Dispatch {
            router: crate::app::app(dispatch_state.clone()),
            priority: Some(BATCH_PRIORITY),
            strip_model: false,
            patience: Patience::UntilStopped,
        };
        tracing::info!(
            data_dir = %config.data_dir.display(),
            files = registry.files.len(),
            batches = registry.batches.len(),
            in_flight_max = config.in_flight_max,
            "batch API ready"
        );
        Ok(Arc::new(Self {
            slots: Arc::new(Semaphore::new(config.in_flight_max)),
            dir,
            config,
            dispatch,
            dispatch_state,
            registry: Mutex::new(registry),
            record_writes: Mutex::new(()),
        }))
    }

    /// Starts a task for every unfinished batch, and tidies the finished ones.
    pub fn resume(self: &Arc<Self>) {
        let Ok(registry) = self.registry.lock() else {
            return;
        };
        let (finished, unfinished): (Vec<_>, Vec<_>) = registry
            .batches
            .values()
            .map(|e| (e.record.batch.id.clone(), e.record.batch.status))
            .partition(|(_, status)| status.is_terminal());
        drop(registry);
        for (id, _) in finished {
            if let Err(e) = self.dir.remove_work_dir(&id) {
                tracing::warn!(batch = %id, error = %e, "cannot tidy a finished batch");
            }
        }
        for (id, status) in unfinished {
            tracing::info!(batch = %id, status = status.name(), "resuming a batch");
            self.spawn(id);
        }
    }

    /// Largest uploaded file, in bytes.
    pub fn file_bytes_max(&self) -> u64 {
        self.config.file_bytes_max
    }

    fn registry(&self) -> Result<MutexGuard<'_, Registry>, ApiError> {
        self.registry
            .lock()
            .map_err(|_| ApiError::Internal("the batch registry lock was poisoned".into()))
    }

    pub(super) fn is_draining(&self) -> bool {
        self.dispatch_state.is_draining()
    }

    // ---- Files ----

    /// A place to write an upload to.
    pub fn new_upload(&self) -> Upload {
        Upload {
            path: self.dir.upload_path(),
            committed: false,
        }
    }

    /// Turns a finished upload into a file, after checking it is a runnable batch file.
    pub async fn create_file(
        self: &Arc<Self>,
        mut upload: Upload,
        filename: String,
        purpose: Purpose,
    ) -> Result<FileObject, ApiError> {
        if purpose != Purpose::Batch {
            return Err(ApiError::invalid(
                "purpose",
                "only files with purpose `batch` can be uploaded here",
            ));
        }
        if self.registry()?.files.len() >= FILES_MAX {
            return Err(ApiError::invalid(
                "file",
                format!("this server stores at most {FILES_MAX} files: delete some first"),
            ));
        }
        let this = Arc::clone(self);
        let path = upload.path.clone();
        let object = tokio::task::spawn_blocking(move || -> Result<FileObject, ApiError> {
            let requests = read_requests(&path, None).map_err(|p| {
                ApiError::invalid("file", format!("not a valid batch file: {}", p.message))
            })?;
            tracing::debug!(requests = requests.len(), "batch file checked");
            let bytes = fs::metadata(&path)
                .map_err(|e| internal("reading an upload", e))?
                .len();
            let object = FileObject {
                id: FileId::new(),
                object: ObjectKind::File,
                bytes,
                created_at: unix_now_s(),
                filename: filename.chars().take(FILENAME_CHARS_MAX).collect(),
                purpose,
                status: FileStatus::Processed,
                expires_at: None,
                status_details: None,
            };
            this.dir
                .commit_upload(&path, &object.id)
                .and_then(|()| this.dir.write_file_meta(&object))
                .map_err(|e| internal("storing an upload", e))?;
            Ok(object)
        })
        .await??;
        upload.committed = true;
        self.registry()?
            .files
            .insert(object.id.clone(), object.clone());
        Ok(object)
    }

    /// A file's object.
    pub fn file(&self, id: &str) -> Result<FileObject, ApiError> {
        FileId::parse(id)
            .and_then(|id| self.registry().ok()?.files.get(&id).cloned())
            .ok_or_else(|| not_found("File", id, "file_id"))
    }

    /// A file's object and where its content is.
    pub fn file_content(&self, id: &str) -> Result<(FileObject, PathBuf), ApiError> {
        let file = self.file(id)?;
        let path = self.dir.content_path(&file.id);
        Ok((file, path))
    }

    /// Files, newest first (or oldest with `ascending`), after the file `after`.
    pub fn list_files(
        &self,
        purpose: Option<Purpose>,
        limit: Option<usize>,
        after: Option<&str>,
        ascending: bool,
    ) -> Result<ListPage<FileObject>, ApiError> {
        let limit = page_limit(limit, LIST_LIMIT_MAX, LIST_LIMIT_MAX)?;
        let mut files: Vec<FileObject> = self
            .registry()?
            .files
            .values()
            .filter(|f| purpose.is_none_or(|p| f.purpose == p))
            .cloned()
            .collect();
        files.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
        if !ascending {
            files.reverse();
        }
        page(files, |f| f.id.as_str().to_owned(), limit, after)
    }

    /// Deletes a file, unless an unfinished batch reads it.
    pub async fn delete_file(self: &Arc<Self>, id: &str) -> Result<FileDeleted, ApiError> {
        let file = self.file(id)?;
        {
            let mut registry = self.registry()?;
            if let Some(entry) = registry.batches.values().find(|e| {
                e.record.batch.input_file_id == file.id && !e.record.batch.status.is_terminal()
            }) {
                return Err(ApiError::invalid(
                    "file_id",
                    format!(
                        "the file is the input of batch {}, which is {}: cancel it or wait",
                        entry.record.batch.id,
                        entry.record.batch.status.name()
                    ),
                ));
            }
            registry.files.remove(&file.id);
        }
        let this = Arc::clone(self);
        let file_id = file.id.clone();
        tokio::task::spawn_blocking(move || this.dir.remove_file(&file_id))
            .await?
            .map_err(|e| internal("deleting a file", e))?;
        Ok(FileDeleted {
            id: file.id,
            object: ObjectKind::File,
            deleted: true,
        })
    }

    // ---- Batches ----

    /// Creates a batch over an uploaded file and starts it.
    pub async fn create_batch(
        self: &Arc<Self>,
        request: CreateBatch,
    ) -> Result<BatchObject, ApiError> {
        if let Some(name) = request.unknown.keys().next() {
            return Err(ApiError::UnsupportedParam(name.clone()));
        }
        let input = request
            .input_file_id
            .ok_or_else(|| ApiError::invalid("input_file_id", "`input_file_id` is required"))?;
        let endpoint_text = request
            .endpoint
            .ok_or_else(|| ApiError::invalid("endpoint", "`endpoint` is required"))?;
        let endpoint = Endpoint::from_path(&endpoint_text).ok_or_else(|| {
            ApiError::invalid(
                "endpoint",
                format!(
                    "`endpoint` must be one of {:?}, got {endpoint_text:?}",
                    Endpoint::paths()
                ),
            )
        })?;
        match request.completion_window.as_deref() {
            Some(COMPLETION_WINDOW) => {}
            other => {
                return Err(ApiError::invalid(
                    "completion_window",
                    format!("`completion_window` must be \"{COMPLETION_WINDOW}\", got {other:?}"),
                ))
            }
        }
        let metadata = check_metadata(request.metadata)?;
        if self.is_draining() {
            return Err(ApiError::Unavailable(
                "the server is shutting down".to_owned(),
            ));
        }
        let file = self.file(&input).map_err(|_| {
            ApiError::invalid("input_file_id", format!("no file with id {input:?}"))
        })?;
        if file.purpose != Purpose::Batch {
            return Err(ApiError::invalid(
                "input_file_id",
                format!("the file {input} has purpose `batch_output`, not `batch`"),
            ));
        }
        let this = Arc::clone(self);
        let file_id = file.id.clone();
        let now = unix_now_s();
        let record = BatchRecord {
            batch: BatchObject {
                id: BatchId::new(),
                object: ObjectKind::Batch,
                endpoint: endpoint.path().to_owned(),
                errors: None,
                input_file_id: file.id.clone(),
                completion_window: COMPLETION_WINDOW.to_owned(),
                status: BatchStatus::Validating,
                output_file_id: None,
                error_file_id: None,
                created_at: now,
                in_progress_at: None,
                expires_at: Some(now + COMPLETION_WINDOW_S),
                finalizing_at: None,
                completed_at: None,
                failed_at: None,
                expired_at: None,
                cancelling_at: None,
                cancelled_at: None,
                request_counts: RequestCounts::default(),
                metadata,
            },
            output_file_reserved: FileId::new(),
            error_file_reserved: FileId::new(),
        };
        tokio::task::spawn_blocking(move || {
            // Checked now, so that a file that does not fit the endpoint is a 400 here.
            read_requests(&this.dir.content_path(&file_id), Some(endpoint)).map_err(|p| {
                let at = p.line.map(|n| format!("line {n}: ")).unwrap_or_default();
                ApiError::invalid("input_file_id", format!("{at}{}", p.message))
            })
        })
        .await??;
        let batch_id = record.batch.id.clone();
        {
            // The input is checked again under the lock: a delete may have come meanwhile
            // (and from here on, delete refuses it).
            let mut registry = self.registry()?;
            if !registry.files.contains_key(&file.id) {
                return Err(ApiError::invalid(
                    "input_file_id",
                    format!("no file with id {input:?}"),
                ));
            }
            let unfinished = registry
                .batches
                .values()
                .filter(|e| !e.record.batch.status.is_terminal())
                .count();
            if unfinished >= BATCHES_UNFINISHED_MAX {
                return Err(ApiError::Overloaded(format!(
                    "{BATCHES_UNFINISHED_MAX} batches are unfinished: wait for some to finish"
                )));
            }
            registry.batches.insert(
                batch_id.clone(),
                Entry {
                    record: record.clone(),
                    cancel: Arc::new(Notify::new()),
                },
            );
        }
        if let Err(e) = self.persist(&batch_id).await {
            // Never confirmed to the client: forget it.
            if let Ok(mut registry) = self.registry.lock() {
                registry.batches.remove(&batch_id);
            }
            return Err(internal("storing a batch", e));
        }
        tracing::info!(batch = %record.batch.id, input = %file.id, "batch created");
        self.spawn(record.batch.id.clone());
        Ok(record.batch)
    }

    /// A batch's object.
    pub fn batch(&self, id: &str) -> Result<BatchObject, ApiError> {
        BatchId::parse(id)
            .and_then(|id| Some(self.registry().ok()?.batches.get(&id)?.record.batch.clone()))
            .ok_or_else(|| not_found("Batch", id, "batch_id"))
    }

    /// Batches, newest first, after the batch `after`.
    pub fn list_batches(
        &self,
        limit: Option<usize>,
        after: Option<&str>,
    ) -> Result<ListPage<BatchObject>, ApiError> {
        let limit = page_limit(limit, BATCH_LIST_LIMIT_DEFAULT, 100)?;
        let mut batches: Vec<BatchObject> = self
            .registry()?
            .batches
            .values()
            .map(|e| e.record.batch.clone())
            .collect();
        batches.sort_by(|a, b| (b.created_at, &b.id).cmp(&(a.created_at, &a.id)));
        page(batches, |b| b.id.as_str().to_owned(), limit, after)
    }

    /// Asks a batch to stop: requests in flight are aborted, results so far are kept.
    pub async fn cancel(self: &Arc<Self>, id: &str) -> Result<BatchObject, ApiError> {
        let batch_id = BatchId::parse(id).ok_or_else(|| not_found("Batch", id, "batch_id"))?;
        let (object, changed) = {
            let mut registry = self.registry()?;
            let entry = registry
                .batches
                .get_mut(&batch_id)
                .ok_or_else(|| not_found("Batch", id, "batch_id"))?;
            let batch = &mut entry.record.batch;
            let changed = match batch.status {
                BatchStatus::Validating | BatchStatus::InProgress => {
                    batch.status = BatchStatus::Cancelling;
                    batch.cancelling_at = Some(unix_now_s());
                    entry.cancel.notify_one();
                    true
                }
                BatchStatus::Cancelling | BatchStatus::Cancelled => false,
                other => {
                    return Err(ApiError::InvalidRequest {
                        message: format!("cannot cancel a batch that is {}", other.name()),
                        param: None,
                    })
                }
            };
            (batch.clone(), changed)
        };
        if changed {
            self.persist(&batch_id)
                .await
                .map_err(|e| internal("storing a batch", e))?;
        }
        Ok(object)
    }
}

/// Checks `metadata`: null, or an object of up to 16 string values with short keys.
fn check_metadata(
    metadata: Option<Value>,
) -> Result<Option<serde_json::Map<String, Value>>, ApiError> {
    let map = match metadata {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Object(map)) => map,
        Some(_) => {
            return Err(ApiError::invalid(
                "metadata",
                "`metadata` must be an object",
            ))
        }
    };
    if map.len() > METADATA_PAIRS_MAX {
        return Err(ApiError::invalid(
            "metadata",
            format!("`metadata` holds at most {METADATA_PAIRS_MAX} pairs"),
        ));
    }
    for (key, value) in &map {
        let fits = key.chars().count() <= METADATA_KEY_CHARS_MAX
            && value
                .as_str()
                .is_some_and(|v| v.chars().count() <= METADATA_VALUE_CHARS_MAX);
        if !fits {
            return Err(ApiError::invalid(
                "metadata",
                format!(
                    "`metadata` keys are at most {METADATA_KEY_CHARS_MAX} characters and \
                     values strings of at most {METADATA_VALUE_CHARS_MAX}"
                ),
            ));
        }
    }
    Ok(Some(map))
}

fn page_limit(limit: Option<usize>, default: usize, max: usize) -> Result<usize, ApiError> {
    match limit {
        None => Ok(default),
        Some(n) if (1..=max).contains(&n) => Ok(n),
        Some(n) => Err(ApiError::invalid(
            "limit",
            format!("`limit` must be in 1..={max}, got {n}"),
        )),
    }
}

/// The page of `items` (already in order) after the item with id `after`.
fn page<T>(
    items: Vec<T>,
    id_of: impl Fn(&T) -> String,
    limit: usize,
    after: Option<&str>,
) -> Result<ListPage<T>, ApiError> {
    let start = match after {
        None => 0,
        Some(after) => {
            items
                .iter()
                .position(|item| id_of(item) == after)
                .ok_or_else(|| ApiError::invalid("after", format!("no object with id {after:?}")))?
                + 1
        }
    };
    let has_more = items.len() > start + limit;
    let data: Vec<T> = items.into_iter().skip(start).take(limit).collect();
    Ok(ListPage {
        object: ObjectKind::List,
        first_id: data.first().map(&id_of),
        last_id: data.last().map(&id_of),
        data,
        has_more,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, text: &str) -> PathBuf {
        let path = dir.join("in.jsonl");
        fs::write(&path, text).expect("write");
        path
    }

    fn line(id: &str, url: &str) -> String {
        format!(r#"{{"custom_id":"{id}","method":"POST","url":"{url}","body":{{"prompt":"x"}}}}"#)
    }

    #[test]
    fn batch_files_are_checked_whole() {
        let tmp = tempfile::tempdir().expect("temp dir");
        let good = format!(
            "{}\n\n{}\n",
            line("a", "/v1/completions"),
            line("b", "/v1/completions")
        );
        let requests = read_requests(&write(tmp.path(), &good), Some(Endpoint::Completions))
            .unwrap_or_else(|p| panic!("{}", p.message));
        assert_eq!(requests.len(), 2);

        let problem = |text: &str, endpoint| {
            read_requests(&write(tmp.path(), text), endpoint)
                .err()
                .map(|p| (p.line, p.message))
                .expect("a problem")
        };
        let (at, message) = problem(&format!("{}\n{{\n", line("a", "/v1/completions")), None);
        assert_eq!(at, Some(2));
        assert!(message.starts_with("line 2: not valid JSON"), "{message}");
        let (at, message) = problem(
            &format!(
                "{}\n{}\n",
                line("a", "/v1/completions"),
                line("a", "/v1/completions")
            ),
            None,
        );
        assert_eq!(at, None);
        assert!(message.contains("duplicate custom_id") && message.contains("\"a\""));
        let (_, message) = problem("\n\n", None);
        assert!(message.contains("no request"), "{message}");
        let (_, message) = problem(
            &line("a", "/v1/chat/completions"),
            Some(Endpoint::Completions),
        );
        assert!(message.contains("custom_id \"a\"") && message.contains("endpoint"));
        fs::write(tmp.path().join("in.jsonl"), [0xff, 0xfe, b'\n']).expect("write");
        let problem = read_requests(&tmp.path().join("in.jsonl"), None).expect_err("bad");
        assert!(problem.message.contains("UTF-8"), "{}", problem.message);
    }

    #[test]
    fn metadata_limits() {
        assert!(check_metadata(None).is_ok_and(|m| m.is_none()));
        assert!(check_metadata(Some(serde_json::json!({"a": "b"}))).is_ok_and(|m| m.is_some()));
        for bad in [
            serde_json::json!([1]),
            serde_json::json!({"a": 1}),
            serde_json::json!({"a": "x".repeat(513)}),
            Value::Object((0..17).map(|i| (i.to_string(), Value::from("v"))).collect()),
        ] {
            let e = check_metadata(Some(bad)).expect_err("refused");
            assert_eq!(e.body().error.param.as_deref(), Some("metadata"));
        }
    }

    #[test]
    fn pages_follow_the_cursor() {
        let items: Vec<String> = (0..5).map(|i| format!("id{i}")).collect();
        let first = page(items.clone(), Clone::clone, 2, None).expect("page");
        assert_eq!(first.data, ["id0", "id1"]);
        assert!(first.has_more);
        let last = page(items.clone(), Clone::clone, 2, Some("id3")).expect("page");
        assert_eq!(last.data, ["id4"]);
        assert!(!last.has_more);
        assert_eq!(last.first_id.as_deref(), Some("id4"));
        assert!(page(items, Clone::clone, 2, Some("nope")).is_err());
        assert!(page_limit(Some(0), 20, 100).is_err());
        assert_eq!(page_limit(None, 20, 100).ok(), Some(20));
    }
}
