//! The OpenAI objects of the Files and Batch APIs, as answered and as stored.
//!
//! The JSON a client reads is the JSON on disk (plus, for a batch, the ids its result files
//! will take): one shape, so a restart reads back exactly what clients saw.

use serde::{Deserialize, Serialize};

/// The `object` field of the objects below.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ObjectKind {
    /// A file.
    File,
    /// A batch.
    Batch,
    /// A page of a listing.
    List,
}

fn is_id(text: &str, prefix: &str) -> bool {
    text.strip_prefix(prefix)
        .is_some_and(|hex| hex.len() == 32 && hex.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// An id type: `prefix` and 32 hex digits, random when new, checked when parsed.
macro_rules! prefixed_id {
    ($(#[$doc:meta])* $name:ident, $prefix:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            const PREFIX: &'static str = $prefix;

            /// A new random id.
            pub fn new() -> Self {
                Self(format!("{}{}", Self::PREFIX, uuid::Uuid::new_v4().simple()))
            }

            /// The id `text` names, if it is well-formed.
            pub fn parse(text: &str) -> Option<Self> {
                is_id(text, Self::PREFIX).then(|| Self(text.to_owned()))
            }

            /// The id as text.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl Default for $name {
            fn default() -> Self {
                Self::new()
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

prefixed_id!(
    /// A file id: `file-` and 32 hex digits. Ids from clients are checked before any use, so a
    /// path built from one cannot leave the data directory.
    FileId,
    "file-"
);

prefixed_id!(
    /// A batch id: `batch_` and 32 hex digits (checked as [`FileId`] is).
    BatchId,
    "batch_"
);

/// What a file is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Purpose {
    /// Uploaded batch input.
    Batch,
    /// A batch's output or error file.
    BatchOutput,
}

impl Purpose {
    /// The purpose named `text`, if it is one this server stores.
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "batch" => Some(Self::Batch),
            "batch_output" => Some(Self::BatchOutput),
            _ => None,
        }
    }
}

/// A file's processing status; every stored file is processed (validated when uploaded).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FileStatus {
    /// Ready to use.
    Processed,
}

/// OpenAI's File object.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FileObject {
    /// The file's id.
    pub id: FileId,
    /// Always `file`.
    pub object: ObjectKind,
    /// Size of the content in bytes.
    pub bytes: u64,
    /// Unix seconds.
    pub created_at: u64,
    /// The name it was uploaded with (or given, for results).
    pub filename: String,
    /// What it is for.
    pub purpose: Purpose,
    /// Always `processed`.
    pub status: FileStatus,
    /// Files do not expire here.
    pub expires_at: Option<u64>,
    /// Always null.
    pub status_details: Option<String>,
}

/// A batch's life, as OpenAI names it.
///
/// ```text
/// validating -> in_progress -> finalizing -> completed
///     |              |---------------------> expired     (the completion window passed)
///     |              `-> cancelling -------> cancelled   (POST /cancel; results so far kept)
///     `-> failed                                         (the input cannot be run)
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BatchStatus {
    /// Created; its input is being read.
    Validating,
    /// The input could not be run; `errors` says why.
    Failed,
    /// Requests are running.
    InProgress,
    /// Every request is answered; the result files are being made.
    Finalizing,
    /// Done; results in the output and error files.
    Completed,
    /// The completion window passed; unanswered requests are `batch_expired` errors.
    Expired,
    /// Cancel asked; in-flight requests are being stopped.
    Cancelling,
    /// Cancelled; the results made before are in the output and error files.
    Cancelled,
}

impl BatchStatus {
    /// True once nothing more will happen to the batch.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            Self::Failed | Self::Completed | Self::Expired | Self::Cancelled
        )
    }

    /// The name, for messages.
    pub fn name(self) -> &'static str {
        match self {
            Self::Validating => "validating",
            Self::Failed => "failed",
            Self::InProgress => "in_progress",
            Self::Finalizing => "finalizing",
            Self::Completed => "completed",
            Self::Expired => "expired",
            Self::Cancelling => "cancelling",
            Self::Cancelled => "cancelled",
        }
    }
}

/// How many of a batch's requests are answered.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestCounts {
    /// Requests in the input file.
    pub total: u64,
    /// Answered with a 2xx (in the output file).
    pub completed: u64,
    /// Answered otherwise (in the error file).
    pub failed: u64,
}

/// One reason a batch failed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BatchError {
    /// Machine-readable.
    pub code: String,
    /// For humans.
    pub message: String,
    /// The parameter at fault, if any.
    pub param: Option<String>,
    /// The input line at fault, if any (1-based).
    pub line: Option<u64>,
}

/// The `errors` of a failed batch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BatchErrors {
    /// Always `list`.
    pub object: ObjectKind,
    /// The reasons.
    pub data: Vec<BatchError>,
}

/// OpenAI's Batch object.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BatchObject {
    /// The batch's id.
    pub id: BatchId,
    /// Always `batch`.
    pub object: ObjectKind,
    /// The endpoint every request goes to.
    pub endpoint: String,
    /// Why it failed, when it did.
    pub errors: Option<BatchErrors>,
    /// The uploaded input.
    pub input_file_id: FileId,
    /// Always `24h`.
    pub completion_window: String,
    /// Where it is in its life.
    pub status: BatchStatus,
    /// Results of 2xx answers, once finished (null when there are none).
    pub output_file_id: Option<FileId>,
    /// Results of the other answers and of expired requests, once finished (null when none).
    pub error_file_id: Option<FileId>,
    /// Unix seconds, as are the other `*_at`.
    pub created_at: u64,
    /// When requests started running.
    pub in_progress_at: Option<u64>,
    /// When the completion window ends.
    pub expires_at: Option<u64>,
    /// When the result files started being made.
    pub finalizing_at: Option<u64>,
    /// When it completed.
    pub completed_at: Option<u64>,
    /// When it failed.
    pub failed_at: Option<u64>,
    /// When it expired.
    pub expired_at: Option<u64>,
    /// When cancel was asked.
    pub cancelling_at: Option<u64>,
    /// When it was cancelled.
    pub cancelled_at: Option<u64>,
    /// Answered so far.
    pub request_counts: RequestCounts,
    /// Up to 16 string pairs given at creation.
    pub metadata: Option<serde_json::Map<String, serde_json::Value>>,
}

/// A batch as stored: the object, and the ids its result files take when it finishes (chosen
/// at creation, so that finishing again after a crash makes the same files).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BatchRecord {
    /// What clients see.
    pub batch: BatchObject,
    /// The id of the output file, once it exists.
    pub output_file_reserved: FileId,
    /// The id of the error file, once it exists.
    pub error_file_reserved: FileId,
}

/// A page of a listing: `{"object": "list", "data", "first_id", "last_id", "has_more"}`.
#[derive(Debug, Clone, Serialize)]
pub struct ListPage<T> {
    /// Always `list`.
    pub object: ObjectKind,
    /// The items.
    pub data: Vec<T>,
    /// The first item's id.
    pub first_id: Option<String>,
    /// The last item's id (the `after` of the next page).
    pub last_id: Option<String>,
    /// Whether items follow.
    pub has_more: bool,
}

/// The answer to a file delete.
#[derive(Debug, Clone, Serialize)]
pub struct FileDeleted {
    /// The file's id.
    pub id: FileId,
    /// Always `file`.
    pub object: ObjectKind,
    /// Always true.
    pub deleted: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_checked() {
        let id = FileId::new();
        assert_eq!(FileId::parse(id.as_str()), Some(id.clone()));
        assert_eq!(BatchId::parse(id.as_str()), None);
        let batch = BatchId::new();
        assert_eq!(BatchId::parse(batch.as_str()), Some(batch));
        for bad in [
            "",
            "file-",
            "file-../../etc/passwd",
            "file-0123456789abcdef0123456789abcdeg",
            "file-0123456789abcdef0123456789abcdef0",
            "batch_0123456789abcdef0123456789abcdef/x",
        ] {
            assert_eq!(FileId::parse(bad), None, "{bad}");
            assert_eq!(BatchId::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn statuses_are_named_as_openai_names_them() {
        for status in [
            BatchStatus::Validating,
            BatchStatus::Failed,
            BatchStatus::InProgress,
            BatchStatus::Finalizing,
            BatchStatus::Completed,
            BatchStatus::Expired,
            BatchStatus::Cancelling,
            BatchStatus::Cancelled,
        ] {
            let json = serde_json::to_value(status).expect("serialize");
            assert_eq!(json, status.name());
            let terminal = matches!(
                status.name(),
                "failed" | "completed" | "expired" | "cancelled"
            );
            assert_eq!(status.is_terminal(), terminal);
        }
    }
}
