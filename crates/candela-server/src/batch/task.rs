//! The life of one batch: the task that drives it from `validating` to its end (the states are
//! drawn on [`BatchStatus`]), and how each step is made durable.
//!
//! The task reads the input file, opens the batch's result files (which say what is already
//! answered), runs the rest through [`Dispatch::run`](super::runner::Dispatch::run) under the
//! in-flight bound shared by all batches, then makes the result files into File objects.
//! Since each answer is synced to its result file before it is counted, and a resumed batch
//! skips the custom_ids its result files hold, a batch survives a restart (SIGKILL included)
//! with every line answered exactly once. On shutdown the task stops and its in-flight
//! requests are aborted (the next start runs them again), so the drain is not held up by
//! batch work.

use std::collections::HashSet;
use std::fs;
use std::io;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use tokio::sync::Notify;

use super::jsonl::{error_record, response_record, Answered, BatchRequest, Endpoint, ResultsFile};
use super::objects::{
    BatchError, BatchErrors, BatchId, BatchRecord, BatchStatus, FileObject, FileStatus, ObjectKind,
    Purpose, RequestCounts,
};
use super::runner::{Answer, RunEnd};
use super::service::{poisoned, read_requests, BatchService};
use super::store::ResultKind;
use crate::app::unix_now_s;

/// How often a running batch checks for shutdown and expiry (cancel wakes it at once).
const STOP_POLL: Duration = Duration::from_millis(200);

/// Why a running batch stopped before every request was answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    Cancel,
    Expire,
    Shutdown,
}

impl BatchService {
    /// Starts the task that drives batch `id`.
    pub(super) fn spawn(self: &Arc<Self>, id: BatchId) {
        let this = Arc::clone(self);
        tokio::spawn(async move {
            if let Err(e) = this.drive(&id).await {
                tracing::error!(batch = %id, error = %e, "the batch failed");
                let failed = this.fail(
                    &id,
                    BatchError {
                        code: "internal_error".into(),
                        message: "the server could not run the batch".into(),
                        param: None,
                        line: None,
                    },
                );
                if let Err(e) = failed.await {
                    tracing::error!(batch = %id, error = %e, "cannot record the failure");
                }
            }
        });
    }

    /// Applies `f` to a batch's record in memory; returns the record after.
    fn update(
        &self,
        id: &BatchId,
        f: impl FnOnce(&mut BatchRecord),
    ) -> io::Result<(BatchRecord, Arc<Notify>)> {
        let mut registry = self.registry.lock().map_err(poisoned)?;
        let entry = registry
            .batches
            .get_mut(id)
            .ok_or_else(|| io::Error::other(format!("batch {id} vanished")))?;
        f(&mut entry.record);
        Ok((entry.record.clone(), Arc::clone(&entry.cancel)))
    }

    /// Writes a batch's record as it is now. Writes are serialized and each takes the newest
    /// state under the write lock, so the last write on disk is always the newest state
    /// (a cancel and the task's own update cannot overwrite each other out of order).
    pub(super) async fn persist(self: &Arc<Self>, id: &BatchId) -> io::Result<()> {
        let this = Arc::clone(self);
        let id = id.clone();
        tokio::task::spawn_blocking(move || {
            let _writing = this.record_writes.lock().map_err(poisoned)?;
            let (record, _) = this.snapshot(&id)?;
            this.dir.write_batch(&record)
        })
        .await
        .map_err(io::Error::other)?
    }

    /// A batch's record as it is now.
    fn snapshot(&self, id: &BatchId) -> io::Result<(BatchRecord, Arc<Notify>)> {
        self.update(id, |_| {})
    }

    fn stop_reason(&self, id: &BatchId) -> Option<Stop> {
        let (record, _) = self.snapshot(id).ok()?;
        if record.batch.status == BatchStatus::Cancelling {
            Some(Stop::Cancel)
        } else if record.batch.expires_at.is_some_and(|t| unix_now_s() >= t) {
            Some(Stop::Expire)
        } else if self.is_draining() {
            Some(Stop::Shutdown)
        } else {
            None
        }
    }

    /// Drives a batch from wherever it is to its end (or to shutdown).
    async fn drive(self: &Arc<Self>, id: &BatchId) -> io::Result<()> {
        let (record, cancel) = self.snapshot(id)?;
        let endpoint = Endpoint::from_path(&record.batch.endpoint)
            .ok_or_else(|| io::Error::other("a stored batch has an unknown endpoint"))?;
        match record.batch.status {
            BatchStatus::Validating | BatchStatus::InProgress => {}
            BatchStatus::Finalizing => return self.finalize(id, BatchStatus::Completed).await,
            BatchStatus::Cancelling => return self.finalize(id, BatchStatus::Cancelled).await,
            _ => return Ok(()),
        }
        let input = self.dir.content_path(&record.batch.input_file_id);
        let output_path = self.dir.results_path(id, ResultKind::Output);
        let errors_path = self.dir.results_path(id, ResultKind::Errors);
        let work_dir_ready = {
            let this = Arc::clone(self);
            let id = id.clone();
            move || this.dir.create_work_dir(&id)
        };
        let opened = tokio::task::spawn_blocking(move || {
            let requests = read_requests(&input, Some(endpoint));
            work_dir_ready()?;
            let output = ResultsFile::open(&output_path)?;
            let errors = ResultsFile::open(&errors_path)?;
            Ok::<_, io::Error>((requests, output, errors))
        })
        .await
        .map_err(io::Error::other)??;
        let (requests, (output, output_answered), (errors, errors_answered)) = opened;
        let requests = match requests {
            Ok(requests) => requests,
            Err(problem) => {
                return self
                    .fail(
                        id,
                        BatchError {
                            code: "invalid_input_file".into(),
                            message: problem.message,
                            param: Some("input_file_id".into()),
                            line: problem.line.map(|n| n as u64),
                        },
                    )
                    .await
            }
        };
        let mut answered: HashSet<String> = output_answered
            .custom_ids
            .iter()
            .chain(&errors_answered.custom_ids)
            .cloned()
            .collect();
        let pending: Vec<BatchRequest> = requests
            .iter()
            .filter(|r| !answered.contains(&r.custom_id))
            .cloned()
            .collect();
        let (record, _) = self.update(id, |r| {
            let b = &mut r.batch;
            b.request_counts = RequestCounts {
                total: requests.len() as u64,
                completed: output_answered.len() as u64,
                failed: errors_answered.len() as u64,
            };
            if b.status == BatchStatus::Validating {
                b.status = BatchStatus::InProgress;
                b.in_progress_at = Some(unix_now_s());
            }
        })?;
        self.persist(id).await?;
        if record.batch.status == BatchStatus::Cancelling {
            return self.finalize(id, BatchStatus::Cancelled).await;
        }
        tracing::info!(batch = %id, total = requests.len(), pending = pending.len(), "batch running");

        let files = Arc::new(Mutex::new((output, errors)));
        let stop = {
            let this = Arc::clone(self);
            let id = id.clone();
            async move {
                while this.stop_reason(&id).is_none() {
                    tokio::select! {
                        () = cancel.notified() => {}
                        () = tokio::time::sleep(STOP_POLL) => {}
                    }
                }
            }
        };
        // Each answer: synced to its result file, then counted (the futures own what they
        // use, so the batch's task stays `Send`).
        let on_answer = |answer: Answer| {
            answered.insert(answer.custom_id.clone());
            let this = Arc::clone(self);
            let files = Arc::clone(&files);
            let id = id.clone();
            async move {
                let success = answer.status.is_success();
                let record =
                    response_record(&answer.custom_id, answer.status.as_u16(), answer.body);
                this.append(&files, success, record).await?;
                this.update(&id, |r| {
                    let counts = &mut r.batch.request_counts;
                    if success {
                        counts.completed += 1;
                    } else {
                        counts.failed += 1;
                    }
                })?;
                Ok(())
            }
        };
        let end = self
            .dispatch
            .run(pending, Arc::clone(&self.slots), on_answer, stop)
            .await?;
        match (end, self.stop_reason(id)) {
            (_, Some(Stop::Cancel)) => self.finalize(id, BatchStatus::Cancelled).await,
            (RunEnd::Finished, _) => self.finalize(id, BatchStatus::Completed).await,
            (RunEnd::Stopped, Some(Stop::Expire)) => {
                for request in requests.iter().filter(|r| !answered.contains(&r.custom_id)) {
                    let record = error_record(
                        0,
                        Some(&request.custom_id),
                        "batch_expired",
                        "This request could not be executed before the completion window expired.",
                    );
                    self.append(&files, false, record).await?;
                }
                self.finalize(id, BatchStatus::Expired).await
            }
            (RunEnd::Stopped, _) => {
                tracing::info!(batch = %id, "batch paused for shutdown; the next start resumes it");
                Ok(())
            }
        }
    }

    /// Appends a record to the output (`success`) or error file, synced before it returns.
    async fn append(
        &self,
        files: &Arc<Mutex<(ResultsFile, ResultsFile)>>,
        success: bool,
        record: Value,
    ) -> io::Result<()> {
        let files = Arc::clone(files);
        tokio::task::spawn_blocking(move || {
            let mut files = files.lock().map_err(poisoned)?;
            if success {
                files.0.append(&record)
            } else {
                files.1.append(&record)
            }
        })
        .await
        .map_err(io::Error::other)?
    }

    /// Makes the result files into File objects and ends the batch as `end` (`completed`,
    /// `cancelled` or `expired`). Safe to run again after a crash at any point: counts come
    /// from the result files, links and metadata are rewritten the same.
    async fn finalize(self: &Arc<Self>, id: &BatchId, end: BatchStatus) -> io::Result<()> {
        let mut end = end;
        let (record, _) = self.update(id, |r| match r.batch.status {
            // A cancel that came after the last answer still wins: the client was told
            // `cancelling`, and must not then see `completed`.
            BatchStatus::Cancelling => end = BatchStatus::Cancelled,
            BatchStatus::Finalizing => {}
            _ if end == BatchStatus::Completed => {
                r.batch.status = BatchStatus::Finalizing;
                r.batch.finalizing_at = Some(unix_now_s());
            }
            _ => {}
        })?;
        self.persist(id).await?;
        let this = Arc::clone(self);
        let batch_id = id.clone();
        let made = tokio::task::spawn_blocking(move || -> io::Result<_> {
            let mut made = Vec::new();
            for (kind, file_id, suffix) in [
                (ResultKind::Output, record.output_file_reserved, "output"),
                (ResultKind::Errors, record.error_file_reserved, "error"),
            ] {
                let path = this.dir.results_path(&batch_id, kind);
                let answered = match ResultsFile::open(&path) {
                    Ok((_, answered)) => answered,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => Answered::default(),
                    Err(e) => return Err(e),
                };
                let bytes = fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
                if answered.is_empty() || bytes == 0 {
                    made.push((kind, answered.len(), None));
                    continue;
                }
                this.dir.link_results(&path, &file_id)?;
                let object = FileObject {
                    id: file_id,
                    object: ObjectKind::File,
                    bytes,
                    created_at: unix_now_s(),
                    filename: format!("{batch_id}_{suffix}.jsonl"),
                    purpose: Purpose::BatchOutput,
                    status: FileStatus::Processed,
                    expires_at: None,
                    status_details: None,
                };
                this.dir.write_file_meta(&object)?;
                made.push((kind, answered.len(), Some(object)));
            }
            Ok(made)
        })
        .await
        .map_err(io::Error::other)??;
        {
            let mut registry = self.registry.lock().map_err(poisoned)?;
            for (_, _, object) in &made {
                if let Some(object) = object {
                    registry.files.insert(object.id.clone(), object.clone());
                }
            }
        }
        let now = unix_now_s();
        self.update(id, |r| {
            let b = &mut r.batch;
            for (kind, count, object) in made {
                let (counter, file) = match kind {
                    ResultKind::Output => (&mut b.request_counts.completed, &mut b.output_file_id),
                    ResultKind::Errors => (&mut b.request_counts.failed, &mut b.error_file_id),
                };
                *counter = count as u64;
                *file = object.map(|o| o.id);
            }
            b.status = end;
            match end {
                BatchStatus::Completed => b.completed_at = Some(now),
                BatchStatus::Cancelled => b.cancelled_at = Some(now),
                BatchStatus::Expired => b.expired_at = Some(now),
                _ => {}
            }
        })?;
        self.persist(id).await?;
        self.remove_work_dir(id).await;
        tracing::info!(batch = %id, status = end.name(), "batch finished");
        Ok(())
    }

    /// Ends a batch as `failed`.
    async fn fail(self: &Arc<Self>, id: &BatchId, error: BatchError) -> io::Result<()> {
        tracing::warn!(batch = %id, code = %error.code, message = %error.message, "batch failed");
        self.update(id, |r| {
            r.batch.status = BatchStatus::Failed;
            r.batch.failed_at = Some(unix_now_s());
            r.batch.errors = Some(BatchErrors {
                object: ObjectKind::List,
                data: vec![error],
            });
        })?;
        self.persist(id).await?;
        self.remove_work_dir(id).await;
        Ok(())
    }

    async fn remove_work_dir(self: &Arc<Self>, id: &BatchId) {
        let this = Arc::clone(self);
        let id = id.clone();
        let removed = tokio::task::spawn_blocking(move || this.dir.remove_work_dir(&id)).await;
        if !matches!(removed, Ok(Ok(()))) {
            // Tidied at the next start.
            tracing::warn!("cannot remove a finished batch's working directory");
        }
    }
}
