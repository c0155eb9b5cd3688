//! Chat templates: the Jinja program a model ships to turn a list of messages into its
//! prompt text.
//!
//! Templates come from `tokenizer_config.json` (`chat_template`) or the GGUF key
//! `tokenizer.chat_template`, and are rendered with minijinja set up the way Hugging Face
//! `transformers` sets up Jinja2: `trim_blocks` and `lstrip_blocks` on, loop controls,
//! Python string/dict methods (minijinja-contrib `pycompat`), and the globals templates
//! expect: `raise_exception`, `strftime_now`, a Python-compatible `tojson`, `bos_token`,
//! `eos_token`, `add_generation_prompt`, `messages` (each with `role` and `content`, and
//! `tool_calls` / `tool_call_id` / `name` when the message has them) and `tools` when the
//! request offers tools.
//!
//! The template also tells which tool-call format the model was trained on ([`ToolFormat`]),
//! detected from the markers its source writes.
//!
//! Content given as a list of `{type: "text", text}` parts is passed as such only to
//! templates that render it (probed once when the template is built); templates written for
//! string content get the parts joined by newlines, as vLLM does.

use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file;
use minijinja::value::{Kwargs, Value, ValueKind};
use minijinja::{Environment, Error, ErrorKind};

/// Why a chat template could not be loaded or rendered.
#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    /// The template source does not parse.
    #[error("chat template does not compile: {message}")]
    Syntax {
        /// minijinja's description, with the line.
        message: String,
    },
    /// The template called `raise_exception(message)`, e.g. on a role it does not support.
    #[error("chat template raised an exception: {message}")]
    Raised {
        /// The message the template gave.
        message: String,
    },
    /// Rendering failed for another reason (a type error in the template, ...).
    #[error("chat template failed to render: {message}")]
    Render {
        /// minijinja's description, with the line.
        message: String,
    },
    /// A config file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A config file or GGUF key is not what we expect.
    #[error("invalid chat template source {origin}: {reason}")]
    InvalidSource {
        /// The file or GGUF key.
        origin: String,
        /// What is wrong with it.
        reason: String,
    },
}

/// Result alias for this module.
pub type Result<T> = std::result::Result<T, TemplateError>;

/// One part of a message's content given as a list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ContentPart {
    /// `{"type": "text", "text": ...}`.
    Text(String),
}

/// A message's content: plain text, or a list of typed parts (OpenAI's array form).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MessageContent {
    /// A plain string.
    Text(String),
    /// A list of parts.
    Parts(Vec<ContentPart>),
}

impl MessageContent {
    /// The text parts joined by newlines (what string-only templates receive).
    pub fn joined_text(&self) -> String {
        match self {
            Self::Text(text) => text.clone(),
            Self::Parts(parts) => parts
                .iter()
                .map(|ContentPart::Text(text)| text.as_str())
                .collect::<Vec<_>>()
                .join("\n"),
        }
    }
}

/// A tool call the assistant made earlier in the conversation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolCall {
    /// The call's id, which the `tool` message answering it names.
    pub id: String,
    /// The function called.
    pub name: String,
    /// Its arguments as JSON text (OpenAI sends a string).
    pub arguments: String,
}

/// One chat message: the one type from the HTTP request to the template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatMessage {
    /// `system`, `user`, `assistant`, ... (passed to the template as given).
    pub role: String,
    /// What was said.
    pub content: MessageContent,
    /// An assistant message's tool calls.
    pub tool_calls: Vec<ToolCall>,
    /// A `tool` message: the call it answers.
    pub tool_call_id: Option<String>,
    /// A `tool` message: the function that answered (some templates print it).
    pub name: Option<String>,
}

impl ChatMessage {
    /// A message with plain-text content.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self::with_content(role, MessageContent::Text(content.into()))
    }

    /// A message with the given content and no tool fields.
    pub fn with_content(role: impl Into<String>, content: MessageContent) -> Self {
        Self {
            role: role.into(),
            content,
            tool_calls: Vec::new(),
            tool_call_id: None,
            name: None,
        }
    }
}

/// How a model writes a tool call, as its chat template shows it. The parser and the
/// grammar that constrains a call follow it; models whose template knows no tools get
/// [`ToolFormat::Generic`] (llama.cpp's generic format: the whole answer is one JSON object).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ToolFormat {
    /// `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` (Hermes, Qwen 2.5 / 3).
    Hermes,
    /// `[TOOL_CALLS][{"name": ..., "arguments": {...}}]` (Mistral).
    Mistral,
    /// `{"name": ..., "parameters": {...}}` as the whole answer (Llama 3.1+).
    Llama3,
    /// `{"tool_calls": [{"name": ..., "arguments": {...}}]}` or `{"response": "..."}`, with
    /// the tools described in a system message.
    Generic,
}

impl ToolFormat {
    /// The format a template's source was written for: the marker it prints.
    pub fn detect(source: &str) -> Self {
        if source.contains("<tool_call>") {
            Self::Hermes
        } else if source.contains("[TOOL_CALLS]") {
            Self::Mistral
        } else if source.contains("<|start_header_id|>")
            && (source.contains("<|python_tag|>") || source.contains("\"parameters\""))
        {
            Self::Llama3
        } else {
            Self::Generic
        }
    }
}

/// Marker attached to the error `raise_exception` returns, so rendering can tell a
/// deliberate template exception from a template bug.
#[derive(Debug)]
struct RaisedByTemplate(String);

impl std::fmt::Display for RaisedByTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for RaisedByTemplate {}

const TEMPLATE_NAME: &str = "chat";
const GGUF_KEY_TEMPLATE: &str = "tokenizer.chat_template";

/// A compiled chat template. `Send + Sync`; render from any thread.
#[derive(Debug)]
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
    /// Whether the template renders list-of-parts content (else parts are joined).
    typed_content: bool,
    /// The tool-call format its source shows.
    tool_format: ToolFormat,
}

impl ChatTemplate {
    /// Compiles `source`. `bos_token` / `eos_token` are the texts the template sees under
    /// those names (empty when the model has none).
    pub fn new(source: &str, bos_token: Option<&str>, eos_token: Option<&str>) -> Result<Self> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        minijinja_contrib::add_to_environment(&mut env);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        env.add_template_owned(TEMPLATE_NAME, strip_generation_tags(source))
            .map_err(|e| TemplateError::Syntax {
                message: describe(&e),
            })?;
        let mut template = Self {
            env,
            bos_token: bos_token.unwrap_or_default().to_owned(),
            eos_token: eos_token.unwrap_or_default().to_owned(),
            typed_content: false,
            tool_format: ToolFormat::detect(source),
        };
        template.typed_content = template.renders_typed_content();
        Ok(template)
    }

    /// The template in GGUF `tokenizer.chat_template`, with BOS/EOS texts from the GGUF
    /// vocabulary; `None` when the file has no template.
    pub fn from_gguf(content: &gguf_file::Content) -> Result<Option<Self>> {
        let Some(value) = content.metadata.get(GGUF_KEY_TEMPLATE) else {
            return Ok(None);
        };
        let source = value
            .to_string()
            .map_err(|e| TemplateError::InvalidSource {
                origin: GGUF_KEY_TEMPLATE.to_owned(),
                reason: e.to_string(),
            })?;
        let token_text = |key: &str| -> Option<String> {
            let id = content.metadata.get(key)?.to_u32().ok()?;
            let tokens = content
                .metadata
                .get("tokenizer.ggml.tokens")?
                .to_vec()
                .ok()?;
            tokens.get(id as usize)?.to_string().ok().cloned()
        };
        let bos = token_text("tokenizer.ggml.bos_token_id");
        let eos = token_text("tokenizer.ggml.eos_token_id");
        Self::new(source, bos.as_deref(), eos.as_deref()).map(Some)
    }

    /// The template in a `tokenizer_config.json` (`chat_template`, either a string or a list
    /// of `{name, template}` from which `default` is taken), with its `bos_token` and
    /// `eos_token`; `None` when the file has no template.
    pub fn from_tokenizer_config(path: &Path) -> Result<Option<Self>> {
        let text = std::fs::read_to_string(path).map_err(|source| TemplateError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let invalid = |reason: String| TemplateError::InvalidSource {
            origin: path.display().to_string(),
            reason,
        };
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| invalid(e.to_string()))?;
        let source = match json.get("chat_template") {
            None | Some(serde_json::Value::Null) => return Ok(None),
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(serde_json::Value::Array(named)) => {
                let by_name = |name: &str| {
                    named.iter().find_map(|entry| {
                        (entry.get("name")?.as_str()? == name)
                            .then(|| entry.get("template")?.as_str().map(str::to_owned))
                            .flatten()
                    })
                };
                by_name("default").ok_or_else(|| {
                    invalid("`chat_template` list has no entry named `default`".to_owned())
                })?
            }
            Some(other) => {
                return Err(invalid(format!(
                    "`chat_template` must be a string or a list, got {other}"
                )))
            }
        };
        let bos = crate::tokenizer::config_token_text(&json, "bos_token");
        let eos = crate::tokenizer::config_token_text(&json, "eos_token");
        Self::new(&source, bos.as_deref(), eos.as_deref()).map(Some)
    }

    /// Renders `messages` into prompt text. `add_generation_prompt` appends the opening of
    /// the assistant's turn (e.g. `<|im_start|>assistant\n`).
    ///
    /// Templates write `bos_token` themselves when the model wants one, so tokenize the
    /// result with `add_special_tokens = false` (as `transformers` does), else models whose
    /// files add BOS get it twice.
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        self.render_with_tools(messages, None, add_generation_prompt)
    }

    /// [`Self::render`] with `tools` (OpenAI's list of `{"type": "function", "function":
    /// {...}}`) in the template's context, for templates that describe tools themselves.
    pub fn render_with_tools(
        &self,
        messages: &[ChatMessage],
        tools: Option<&serde_json::Value>,
        add_generation_prompt: bool,
    ) -> Result<String> {
        let messages: Vec<Value> = messages
            .iter()
            .map(|message| self.message_value(message))
            .collect();
        self.render_values(
            messages,
            tools.map(Value::from_serialize),
            add_generation_prompt,
        )
    }

    /// The tool-call format this template was written for.
    pub fn tool_format(&self) -> ToolFormat {
        self.tool_format
    }

    fn message_value(&self, message: &ChatMessage) -> Value {
        let content = match &message.content {
            MessageContent::Parts(parts) if self.typed_content => Value::from(
                parts
                    .iter()
                    .map(|ContentPart::Text(text)| {
                        Value::from_iter([
                            ("type", Value::from("text")),
                            ("text", Value::from(text.as_str())),
                        ])
                    })
                    .collect::<Vec<_>>(),
            ),
            other => Value::from(other.joined_text()),
        };
        let mut fields = vec![
            ("role", Value::from(message.role.as_str())),
            ("content", content),
        ];
        if !message.tool_calls.is_empty() {
            fields.push(("tool_calls", tool_calls_value(&message.tool_calls)));
        }
        if let Some(id) = &message.tool_call_id {
            fields.push(("tool_call_id", Value::from(id.as_str())));
        }
        if let Some(name) = &message.name {
            fields.push(("name", Value::from(name.as_str())));
        }
        Value::from_iter(fields)
    }

    fn render_values(
        &self,
        messages: Vec<Value>,
        tools: Option<Value>,
        add_generation_prompt: bool,
    ) -> Result<String> {
        let template = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| TemplateError::Render {
                message: describe(&e),
            })?;
        let ctx = minijinja::context! {
            messages => messages,
            tools => tools,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token.as_str(),
            eos_token => self.eos_token.as_str(),
        };
        template.render(ctx).map_err(|e| match raised_message(&e) {
            Some(message) => TemplateError::Raised { message },
            None => TemplateError::Render {
                message: describe(&e),
            },
        })
    }

    /// Renders a probe message whose content is a list of parts and checks its text shows
    /// up. Templates written for strings fail or drop it; those get joined text instead.
    fn renders_typed_content(&self) -> bool {
        const PROBE: &str = "candela-typed-content-probe";
        let probe = Value::from_iter([
            ("role", Value::from("user")),
            (
                "content",
                Value::from(vec![Value::from_iter([
                    ("type", Value::from("text")),
                    ("text", Value::from(PROBE)),
                ])]),
            ),
        ]);
        self.render_values(vec![probe], None, false)
            .is_ok_and(|text| text.contains(PROBE))
    }
}

/// Tool calls as Hugging Face templates read them: `{id, type, function: {name, arguments}}`
/// with `arguments` an object when it is JSON (templates print it with `tojson`, as
/// `transformers` passes a dict), else the text as given.
fn tool_calls_value(calls: &[ToolCall]) -> Value {
    let calls: Vec<serde_json::Value> = calls
        .iter()
        .map(|call| {
            let arguments = serde_json::from_str::<serde_json::Value>(&call.arguments)
                .unwrap_or_else(|_| serde_json::Value::String(call.arguments.clone()));
            serde_json::json!({
                "id": call.id,
                "type": "function",
                "function": {"name": call.name, "arguments": arguments},
            })
        })
        .collect();
    Value::from_serialize(&calls)
}

/// The message of a `raise_exception` call anywhere in `err`'s source chain.
fn raised_message(err: &Error) -> Option<String> {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(current) = source {
        if let Some(raised) = current.downcast_ref::<RaisedByTemplate>() {
            return Some(raised.0.clone());
        }
        source = current.source();
    }
    None
}

/// minijinja's error with its location, on one line.
fn describe(err: &Error) -> String {
    let mut message = err.to_string();
    let mut source = std::error::Error::source(err);
    while let Some(current) = source {
        message.push_str(": ");
        message.push_str(&current.to_string());
        source = current.source();
    }
    message
}

/// `raise_exception(message)`: Hugging Face templates call it to reject input.
fn raise_exception(message: String) -> std::result::Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message.clone())
        .with_source(RaisedByTemplate(message)))
}

/// `strftime_now(format)`: the current time (UTC) formatted with Python's `strftime` codes.
fn strftime_now(format: String) -> std::result::Result<Value, Error> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_err(|e| Error::new(ErrorKind::InvalidOperation, e.to_string()))?;
    Ok(Value::from(strftime_utc(&format, now.as_secs())))
}

/// Drops `{% generation %}` / `{% endgeneration %}`: transformers uses them to mark
/// assistant text for training masks; they render nothing.
fn strip_generation_tags(source: &str) -> String {
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    while let Some(start) = rest.find("{%") {
        let Some(len) = rest[start..].find("%}") else {
            break;
        };
        let tag = &rest[start..start + len + 2];
        let inner =
            tag[2..tag.len() - 2].trim_matches(|c: char| c == '-' || c == '+' || c.is_whitespace());
        out.push_str(&rest[..start]);
        if inner != "generation" && inner != "endgeneration" {
            out.push_str(tag);
        }
        rest = &rest[start + len + 2..];
    }
    out.push_str(rest);
    out
}

/// `tojson` as transformers defines it: Python's `json.dumps` (`", "`/`": "` separators,
/// non-ASCII kept, optional `indent`, `sort_keys`), not minijinja's HTML-safe compact form.
fn tojson(value: &Value, kwargs: Kwargs) -> std::result::Result<Value, Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    let ensure_ascii: Option<bool> = kwargs.get("ensure_ascii")?;
    let separators: Option<Vec<String>> = kwargs.get("separators")?;
    kwargs.assert_all_used()?;
    let (item_sep, key_sep) = match separators.as_deref() {
        Some([item, key]) => (item.clone(), key.clone()),
        Some(_) => {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                "tojson separators must be a pair",
            ))
        }
        // Python drops the space after ',' when indenting (it ends the line instead).
        None if indent.is_some() => (",".to_owned(), ": ".to_owned()),
        None => (", ".to_owned(), ": ".to_owned()),
    };
    let style = JsonStyle {
        indent,
        sort_keys: sort_keys.unwrap_or(false),
        ensure_ascii: ensure_ascii.unwrap_or(false),
        item_sep,
        key_sep,
    };
    let mut out = String::new();
    write_json(&mut out, value, &style, 0, 0)?;
    Ok(Value::from(out))
}

struct JsonStyle {
    indent: Option<usize>,
    sort_keys: bool,
    ensure_ascii: bool,
    item_sep: String,
    key_sep: String,
}

/// Nesting bound for `tojson`, so a self-referencing value cannot recurse forever.
const JSON_DEPTH_MAX: usize = 64;

fn write_json(
    out: &mut String,
    value: &Value,
    style: &JsonStyle,
    level: usize,
    depth: usize,
) -> std::result::Result<(), Error> {
    if depth > JSON_DEPTH_MAX {
        return Err(Error::new(
            ErrorKind::InvalidOperation,
            "tojson: value nested too deeply",
        ));
    }
    let newline = |out: &mut String, level: usize| {
        if let Some(width) = style.indent {
            out.push('\n');
            out.push_str(&" ".repeat(width * level));
        }
    };
    match value.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if value.is_true() { "true" } else { "false" }),
        ValueKind::Number => out.push_str(&value.to_string()),
        ValueKind::String | ValueKind::Bytes => {
            write_json_string(out, value.as_str().unwrap_or_default(), style.ensure_ascii)
        }
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = value.try_iter()?.collect();
            if items.is_empty() {
                out.push_str("[]");
                return Ok(());
            }
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(&style.item_sep);
                }
                newline(out, level + 1);
                write_json(out, item, style, level + 1, depth + 1)?;
            }
            newline(out, level);
            out.push(']');
        }
        ValueKind::Map => {
            let mut keys: Vec<Value> = value.try_iter()?.collect();
            if style.sort_keys {
                keys.sort_by_key(|k| k.to_string());
            }
            if keys.is_empty() {
                out.push_str("{}");
                return Ok(());
            }
            out.push('{');
            for (i, key) in keys.iter().enumerate() {
                if i > 0 {
                    out.push_str(&style.item_sep);
                }
                newline(out, level + 1);
                write_json_string(out, &key.to_string(), style.ensure_ascii);
                out.push_str(&style.key_sep);
                write_json(out, &value.get_item(key)?, style, level + 1, depth + 1)?;
            }
            newline(out, level);
            out.push('}');
        }
        _ => write_json_string(out, &value.to_string(), style.ensure_ascii),
    }
    Ok(())
}

fn write_json_string(out: &mut String, s: &str, ensure_ascii: bool) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{08}' => out.push_str("\\b"),
            '\u{0c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 || (ensure_ascii && !c.is_ascii()) => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    out.push_str(&format!("\\u{unit:04x}"));
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];
const WEEKDAYS: [&str; 7] = [
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
    "Sunday",
];

/// Python `strftime` for a UTC time, covering the codes chat templates use (dates, times,
/// names); an unknown code is copied through as written.
fn strftime_utc(format: &str, unix_secs: u64) -> String {
    let days = (unix_secs / 86_400) as i64;
    let secs_of_day = unix_secs % 86_400;
    let (year, month, day) = civil_from_days(days);
    let (hour, minute, second) = (secs_of_day / 3600, secs_of_day / 60 % 60, secs_of_day % 60);
    // 1970-01-01 was a Thursday (index 3 from Monday).
    let weekday = (days + 3).rem_euclid(7) as usize;
    let day_of_year = days - days_from_civil(year, 1, 1) + 1;
    let month_name = MONTHS[(month - 1) as usize];
    let weekday_name = WEEKDAYS[weekday];
    let hour12 = if hour % 12 == 0 { 12 } else { hour % 12 };

    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('Y') => out.push_str(&year.to_string()),
            Some('y') => out.push_str(&format!("{:02}", year.rem_euclid(100))),
            Some('m') => out.push_str(&format!("{month:02}")),
            Some('d') => out.push_str(&format!("{day:02}")),
            Some('e') => out.push_str(&format!("{day:2}")),
            Some('-') => match chars.next() {
                // glibc's no-padding flag, used as `%-d` in some templates.
                Some('d') => out.push_str(&day.to_string()),
                Some('m') => out.push_str(&month.to_string()),
                Some('H') => out.push_str(&hour.to_string()),
                Some(other) => {
                    out.push_str("%-");
                    out.push(other);
                }
                None => out.push_str("%-"),
            },
            Some('H') => out.push_str(&format!("{hour:02}")),
            Some('I') => out.push_str(&format!("{hour12:02}")),
            Some('M') => out.push_str(&format!("{minute:02}")),
            Some('S') => out.push_str(&format!("{second:02}")),
            Some('p') => out.push_str(if hour < 12 { "AM" } else { "PM" }),
            Some('B') => out.push_str(month_name),
            Some('b') | Some('h') => out.push_str(&month_name[..3]),
            Some('A') => out.push_str(weekday_name),
            Some('a') => out.push_str(&weekday_name[..3]),
            Some('j') => out.push_str(&format!("{day_of_year:03}")),
            Some('Z') => out.push_str("UTC"),
            Some('z') => out.push_str("+0000"),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

/// Days since 1970-01-01 -> (year, month 1..=12, day 1..=31), proleptic Gregorian
/// (Howard Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// Inverse of [`civil_from_days`].
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = if month > 2 { month - 3 } else { month + 9 };
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strftime_formats_known_dates() {
        // 2024-02-29 13:05:09 UTC, a Thursday.
        let t = 1_709_211_909;
        assert_eq!(strftime_utc("%Y-%m-%d %H:%M:%S", t), "2024-02-29 13:05:09");
        assert_eq!(strftime_utc("%d %b %Y", t), "29 Feb 2024");
        assert_eq!(
            strftime_utc("%A, %B %-d (%j) %I%p %%", t),
            "Thursday, February 29 (060) 01PM %"
        );
        assert_eq!(strftime_utc("%Y-%m-%d %a", 0), "1970-01-01 Thu");
    }

    #[test]
    fn civil_days_round_trip() {
        for days in [-800_000, -1, 0, 59, 60, 11_016, 19_782, 2_932_896] {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days, "{y}-{m}-{d}");
        }
    }

    #[test]
    fn generation_tags_are_dropped() {
        assert_eq!(
            strip_generation_tags("a{% generation %}b{%- endgeneration -%}c{% if x %}d{% endif %}"),
            "abc{% if x %}d{% endif %}"
        );
    }

    #[test]
    fn json_strings_escape_like_python() {
        let mut out = String::new();
        write_json_string(&mut out, "a\"b\\c\nd\u{1}é", false);
        assert_eq!(out, r#""a\"b\\c\nd\u0001é""#);
        let mut out = String::new();
        write_json_string(&mut out, "é😀", true);
        assert_eq!(out, r#""\u00e9\ud83d\ude00""#);
    }
}
