//! The OpenAI Batch file format, shared by `candela batch` and the HTTP Batch API.
//!
//! Input: one JSON object per line, `{"custom_id", "method": "POST", "url":
//! "/v1/chat/completions" | "/v1/completions", "body"}`; custom_ids are unique in a file.
//! Output and error records: `{"id", "custom_id", "response": {"status_code", "request_id",
//! "body"}, "error"}`.
//!
//! [`ResultsFile`] is what makes a batch resumable with every line answered exactly once: each
//! record is appended as one whole line and synced to disk before the next, a torn last line
//! (a crash mid-write) is cut off when the file is reopened, and reopening reports which
//! custom_ids are already answered so that a rerun skips them.

use std::collections::{HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Seek, SeekFrom, Write};
use std::path::Path;

use serde_json::{json, Value};

/// The endpoints a batch line may name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Endpoint {
    /// `/v1/chat/completions`.
    ChatCompletions,
    /// `/v1/completions`.
    Completions,
}

impl Endpoint {
    /// Every endpoint, in the order error messages list them.
    pub const ALL: [Endpoint; 2] = [Endpoint::ChatCompletions, Endpoint::Completions];

    /// The route's path.
    pub fn path(self) -> &'static str {
        match self {
            Self::ChatCompletions => "/v1/chat/completions",
            Self::Completions => "/v1/completions",
        }
    }

    /// The endpoint of a path, if it is one a batch may name.
    pub fn from_path(path: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|e| e.path() == path)
    }

    /// The paths, for error messages.
    pub fn paths() -> Vec<&'static str> {
        Self::ALL.iter().map(|e| e.path()).collect()
    }
}

/// One request read from a batch file, ready for the router.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchRequest {
    /// The caller's id for this line, unique in its file.
    pub custom_id: String,
    /// Where the body goes.
    pub endpoint: Endpoint,
    /// The request body, as the line gave it.
    pub body: Value,
}

/// What one input line turned into.
#[derive(Debug, Clone, PartialEq)]
pub enum Line {
    /// A well-formed request.
    Request(BatchRequest),
    /// The line cannot become a request.
    Invalid {
        /// 1-based line number in the input.
        line_number: usize,
        /// The line's custom_id, when it has a usable one.
        custom_id: Option<String>,
        /// A machine-readable reason (`invalid_json`, `invalid_url`, ...).
        code: &'static str,
        /// Why, starting with `line N: `.
        message: String,
    },
}

impl Line {
    /// The custom_id, when the line has a usable one.
    pub fn custom_id(&self) -> Option<&str> {
        match self {
            Self::Request(r) => Some(&r.custom_id),
            Self::Invalid { custom_id, .. } => custom_id.as_deref(),
        }
    }
}

/// Parses one non-blank input line (`line_number` is 1-based, for messages).
pub fn parse_line(line_number: usize, text: &str) -> Line {
    let invalid = |custom_id: Option<String>, code, message: String| Line::Invalid {
        line_number,
        custom_id,
        code,
        message: format!("line {line_number}: {message}"),
    };
    let value: Value = match serde_json::from_str(text) {
        Ok(value) => value,
        Err(e) => return invalid(None, "invalid_json", format!("not valid JSON: {e}")),
    };
    let custom_id = match value.get("custom_id") {
        Some(Value::String(id)) if !id.is_empty() => id.clone(),
        _ => {
            return invalid(
                None,
                "missing_custom_id",
                "`custom_id` must be a non-empty string".into(),
            )
        }
    };
    let id = Some(custom_id.clone());
    match value.get("method").and_then(Value::as_str) {
        Some("POST") => {}
        other => {
            return invalid(
                id,
                "invalid_method",
                format!("`method` must be \"POST\", got {other:?}"),
            )
        }
    }
    let Some(endpoint) = value
        .get("url")
        .and_then(Value::as_str)
        .and_then(Endpoint::from_path)
    else {
        return invalid(
            id,
            "invalid_url",
            format!("`url` must be one of {:?}", Endpoint::paths()),
        );
    };
    match value.get("body") {
        Some(body @ Value::Object(_)) => Line::Request(BatchRequest {
            custom_id,
            endpoint,
            body: body.clone(),
        }),
        _ => invalid(id, "invalid_body", "`body` must be a JSON object".into()),
    }
}

/// Why a batch file cannot be read as a whole.
#[derive(Debug, thiserror::Error)]
pub enum InputError {
    /// The file could not be read, or is not UTF-8.
    #[error("reading the file: {0}")]
    Io(#[from] io::Error),
    /// More lines than a batch may hold.
    #[error("the file has more than {lines_max} requests")]
    TooManyLines {
        /// The limit.
        lines_max: usize,
    },
}

/// Parses every non-blank line of `reader`, at most `lines_max` of them.
pub fn parse_lines(reader: impl BufRead, lines_max: usize) -> Result<Vec<Line>, InputError> {
    let mut lines = Vec::new();
    for (index, text) in reader.lines().enumerate() {
        let text = text?;
        if text.trim().is_empty() {
            continue;
        }
        if lines.len() == lines_max {
            return Err(InputError::TooManyLines { lines_max });
        }
        lines.push(parse_line(index + 1, &text));
    }
    Ok(lines)
}

/// The custom_ids that appear on more than one line, sorted.
pub fn duplicate_custom_ids(lines: &[Line]) -> Vec<String> {
    let mut seen: HashMap<&str, ()> = HashMap::with_capacity(lines.len());
    let mut duplicates: Vec<String> = lines
        .iter()
        .filter_map(Line::custom_id)
        .filter(|id| seen.insert(id, ()).is_some())
        .map(str::to_owned)
        .collect();
    duplicates.sort();
    duplicates.dedup();
    duplicates
}

/// A short listing of custom_ids for messages (the first ten).
pub fn shown_ids(ids: &[String]) -> String {
    let shown: Vec<_> = ids.iter().take(10).collect();
    let more = if ids.len() > shown.len() { " ..." } else { "" };
    format!("{shown:?}{more}")
}

fn record_id() -> String {
    format!("batch_req_{}", uuid::Uuid::new_v4().simple())
}

/// The record of a request the router answered, whatever its status.
pub fn response_record(custom_id: &str, status_code: u16, body: Value) -> Value {
    let request_id = body
        .get("id")
        .and_then(Value::as_str)
        .map_or_else(|| uuid::Uuid::new_v4().simple().to_string(), str::to_owned);
    json!({
        "id": record_id(),
        "custom_id": custom_id,
        "response": {
            "status_code": status_code,
            "request_id": request_id,
            "body": body,
        },
        "error": null,
    })
}

/// The record of a line that never got a response (invalid, or its batch expired). Without a
/// custom_id, `line` (an extension) names the input line so a rerun does not report it twice.
pub fn error_record(
    line_number: usize,
    custom_id: Option<&str>,
    code: &str,
    message: &str,
) -> Value {
    let mut record = json!({
        "id": record_id(),
        "custom_id": custom_id,
        "response": null,
        "error": {"code": code, "message": message},
    });
    if custom_id.is_none() {
        record["line"] = json!(line_number);
    }
    record
}

/// What an existing results file already answers.
#[derive(Debug, Default, Clone)]
pub struct Answered {
    /// Answered custom_ids.
    pub custom_ids: HashSet<String>,
    /// Input lines without a usable custom_id that already have an error record.
    pub line_numbers: HashSet<usize>,
}

impl Answered {
    /// Records in the file.
    pub fn len(&self) -> usize {
        self.custom_ids.len() + self.line_numbers.len()
    }

    /// True when the file holds no record.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// An append-only file of result records, one per line, each synced before the next.
#[derive(Debug)]
pub struct ResultsFile {
    file: File,
}

impl ResultsFile {
    /// Opens (or creates) `path` for appending, first cutting off a torn last line and
    /// collecting what it already answers.
    pub fn open(path: &Path) -> io::Result<(Self, Answered)> {
        let mut file = OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(path)?;
        let mut answered = Answered::default();
        let mut whole_bytes = 0u64;
        let mut reader = BufReader::new(&mut file);
        let mut line = String::new();
        loop {
            line.clear();
            let read = reader.read_line(&mut line)?;
            if read == 0 || !line.ends_with('\n') {
                break;
            }
            whole_bytes += read as u64;
            let Ok(record) = serde_json::from_str::<Value>(&line) else {
                continue;
            };
            match record.get("custom_id") {
                Some(Value::String(id)) => {
                    answered.custom_ids.insert(id.clone());
                }
                _ => {
                    if let Some(n) = record.get("line").and_then(Value::as_u64) {
                        answered.line_numbers.insert(n as usize);
                    }
                }
            }
        }
        drop(reader);
        if file.seek(SeekFrom::End(0))? != whole_bytes {
            tracing::warn!(
                "{}: dropping a torn last line from an interrupted run",
                path.display()
            );
            file.set_len(whole_bytes)?;
            file.sync_data()?;
        }
        Ok((Self { file }, answered))
    }

    /// Appends one record as one line and syncs it to disk: once this returns, a crash
    /// cannot lose or tear it, so a resume never answers its custom_id again.
    pub fn append(&mut self, record: &Value) -> io::Result<()> {
        let mut line = record.to_string();
        line.push('\n');
        self.file.write_all(line.as_bytes())?;
        self.file.sync_data()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_lines_become_requests() {
        let line = parse_line(
            1,
            r#"{"custom_id":"a","method":"POST","url":"/v1/completions","body":{"prompt":"x"}}"#,
        );
        assert_eq!(
            line,
            Line::Request(BatchRequest {
                custom_id: "a".into(),
                endpoint: Endpoint::Completions,
                body: json!({"prompt": "x"}),
            })
        );
    }

    #[test]
    fn invalid_lines_say_why() {
        for (text, expected_code, has_id) in [
            ("{", "invalid_json", false),
            (r#"{"method":"POST"}"#, "missing_custom_id", false),
            (
                r#"{"custom_id":"","method":"POST"}"#,
                "missing_custom_id",
                false,
            ),
            (
                r#"{"custom_id":"a","method":"GET"}"#,
                "invalid_method",
                true,
            ),
            (
                r#"{"custom_id":"a","method":"POST","url":"/v1/embeddings","body":{}}"#,
                "invalid_url",
                true,
            ),
            (
                r#"{"custom_id":"a","method":"POST","url":"/v1/completions","body":[]}"#,
                "invalid_body",
                true,
            ),
        ] {
            match parse_line(7, text) {
                Line::Invalid {
                    line_number,
                    custom_id,
                    code,
                    message,
                } => {
                    assert_eq!(line_number, 7);
                    assert_eq!(code, expected_code, "{text}");
                    assert_eq!(custom_id.is_some(), has_id, "{text}");
                    assert!(message.starts_with("line 7: "), "{message}");
                }
                other => panic!("{text} parsed as {other:?}"),
            }
        }
    }

    #[test]
    fn blank_lines_are_skipped_and_numbers_kept() {
        let text = "\n{\"custom_id\":\"a\"}\n  \n{\n";
        let lines = parse_lines(text.as_bytes(), 10).expect("parse");
        assert_eq!(lines.len(), 2);
        assert!(matches!(lines[0], Line::Invalid { line_number: 2, .. }));
        assert!(matches!(lines[1], Line::Invalid { line_number: 4, .. }));
    }

    #[test]
    fn the_line_limit_holds() {
        let text = "{}\n{}\n{}\n";
        assert!(parse_lines(text.as_bytes(), 3).is_ok());
        assert!(matches!(
            parse_lines(text.as_bytes(), 2),
            Err(InputError::TooManyLines { lines_max: 2 })
        ));
    }

    #[test]
    fn duplicates_are_found_once_each() {
        let line = |id: &str| parse_line(1, &format!(r#"{{"custom_id":"{id}"}}"#));
        let lines = [
            line("b"),
            line("a"),
            line("b"),
            line("c"),
            line("b"),
            line("a"),
        ];
        assert_eq!(duplicate_custom_ids(&lines), ["a", "b"]);
        assert!(duplicate_custom_ids(&lines[..2]).is_empty());
    }

    #[test]
    fn records_have_the_openai_shape() {
        let ok = response_record("x", 200, json!({"id": "chatcmpl-1"}));
        assert_eq!(ok["custom_id"], "x");
        assert_eq!(ok["response"]["status_code"], 200);
        assert_eq!(ok["response"]["request_id"], "chatcmpl-1");
        assert!(ok["error"].is_null());
        assert!(ok["id"]
            .as_str()
            .is_some_and(|id| id.starts_with("batch_req_")));
        let bad = error_record(3, None, "invalid_json", "line 3: nope");
        assert!(bad["response"].is_null());
        assert_eq!(bad["error"]["code"], "invalid_json");
        assert_eq!(bad["line"], 3);
        assert!(error_record(3, Some("y"), "c", "m").get("line").is_none());
    }

    #[test]
    fn torn_output_lines_are_cut_and_answers_collected() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("out.jsonl");
        std::fs::write(
            &path,
            "{\"custom_id\":\"a\"}\n{\"custom_id\":null,\"line\":3}\n{\"custom_id\":\"b\"",
        )
        .expect("write");
        let (mut file, answered) = ResultsFile::open(&path).expect("open");
        assert_eq!(answered.custom_ids, HashSet::from(["a".to_owned()]));
        assert_eq!(answered.line_numbers, HashSet::from([3]));
        assert_eq!(answered.len(), 2);
        let text = std::fs::read_to_string(&path).expect("read");
        assert!(text.ends_with("\"line\":3}\n"), "{text}");
        file.append(&json!({"custom_id": "b"})).expect("append");
        let (_, answered) = ResultsFile::open(&path).expect("reopen");
        assert_eq!(answered.len(), 3);
        assert!(answered.custom_ids.contains("b"));
    }
}
