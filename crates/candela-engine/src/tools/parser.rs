//! One choice's tool-call parser: reads the model's output in its [`ToolFormat`] as it is
//! released and splits it into the answer's content and OpenAI tool-call pieces.
//!
//! Each push re-reads the whole output (calls are short; a re-read is microseconds) and sends
//! what is new since the last push: content that cannot be the start of a call marker any
//! more, a call's first piece once its name is whole, then its arguments' text as it grows.
//! Re-reading from the start keeps the parser free of incremental states to get wrong: a
//! marker or an escape split across tokens is just a shorter text.

use candela_models::chat_template::ToolFormat;

use super::json::{parse_prefix, skip_whitespace, Node, NotJson, Value};
use crate::api::ToolCallDelta;

/// What one push released.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct Released {
    /// More of the answer's content.
    pub(crate) content: String,
    /// More of its tool calls.
    pub(crate) calls: Vec<ToolCallDelta>,
}

impl Released {
    pub(crate) fn extend(&mut self, other: Released) {
        self.content.push_str(&other.content);
        self.calls.extend(other.calls);
    }
}

/// Where a format's calls begin in the output.
const HERMES_OPEN: &str = "<tool_call>";
const HERMES_CLOSE: &str = "</tool_call>";
const MISTRAL_MARKER: &str = "[TOOL_CALLS]";
const LLAMA_PYTHON_TAG: &str = "<|python_tag|>";

/// The output as read so far.
#[derive(Debug, Default)]
struct View {
    /// All the content known to be content.
    content: String,
    /// Calls whose name is whole: the name, their arguments' text so far, and whether the
    /// call is complete.
    calls: Vec<(String, String, bool)>,
}

/// A call already announced.
#[derive(Debug)]
struct Announced {
    args_sent: usize,
}

/// The parser of one choice.
#[derive(Debug)]
pub(crate) struct CallParser {
    format: ToolFormat,
    text: String,
    content_sent: usize,
    calls: Vec<Announced>,
    /// The output stopped following the format at this byte: from there on it is content.
    raw_from: Option<usize>,
    /// Makes call ids: the request's seed and the choice, so ids differ between choices.
    id_prefix: String,
}

impl CallParser {
    /// A parser for `format`; `id_prefix` starts every call id it makes (`call_...`).
    pub(crate) fn new(format: ToolFormat, id_prefix: String) -> Self {
        Self {
            format,
            text: String::new(),
            content_sent: 0,
            calls: Vec::new(),
            raw_from: None,
            id_prefix,
        }
    }

    /// Calls announced so far.
    pub(crate) fn calls(&self) -> usize {
        self.calls.len()
    }

    /// Adds released text; returns what is now known.
    pub(crate) fn push(&mut self, piece: &str) -> Released {
        self.text.push_str(piece);
        self.release(false)
    }

    /// The output is complete: releases everything held back.
    pub(crate) fn finish(&mut self) -> Released {
        self.release(true)
    }

    fn release(&mut self, done: bool) -> Released {
        if let Some(from) = self.raw_from {
            let content = self.text.get(from..).unwrap_or_default().to_owned();
            self.raw_from = Some(self.text.len());
            return Released {
                content,
                calls: Vec::new(),
            };
        }
        let view = match self.format {
            ToolFormat::Generic => self.generic(),
            ToolFormat::Hermes => self.hermes(done),
            ToolFormat::Mistral => self.mistral(done),
            ToolFormat::Llama3 => self.llama3(done),
        };
        let view = match view {
            Ok(view) => view,
            Err(Unparsed { from }) => {
                // Not the format after all (a constraint that did not hold, text cut short in
                // a way no call can finish): what was not understood is content, as written.
                tracing::debug!(format = ?self.format, "tool-call output did not parse");
                self.raw_from = Some(from);
                return self.release(done);
            }
        };
        self.announce(view)
    }

    fn announce(&mut self, view: View) -> Released {
        let mut released = Released::default();
        if let Some(more) = view.content.get(self.content_sent..) {
            released.content = more.to_owned();
            self.content_sent = view.content.len();
        }
        for (index, (name, args, complete)) in view.calls.into_iter().enumerate() {
            let index_u32 = u32::try_from(index).unwrap_or(u32::MAX);
            if index >= self.calls.len() {
                released.calls.push(ToolCallDelta {
                    index: index_u32,
                    id: Some(format!("{}{index}", self.id_prefix)),
                    name: Some(name),
                    arguments: String::new(),
                });
                self.calls.push(Announced { args_sent: 0 });
            }
            let Some(call) = self.calls.get_mut(index) else {
                continue;
            };
            // A whole call written without arguments takes none: `{}` (never an empty string).
            let args = if complete && args.trim().is_empty() && call.args_sent == 0 {
                "{}".to_owned()
            } else {
                args
            };
            if let Some(more) = args.get(call.args_sent..).filter(|m| !m.is_empty()) {
                released.calls.push(ToolCallDelta {
                    index: index_u32,
                    id: None,
                    name: None,
                    arguments: more.to_owned(),
                });
                call.args_sent = args.len();
            }
        }
        released
    }

    /// `{"tool_calls": [...]}` or `{"response": "..."}` (also llama.cpp's `tool_call`).
    fn generic(&self) -> Result<View, Unparsed> {
        let mut view = View::default();
        let Some(root) = parse_prefix(&self.text, 0).map_err(|NotJson| Unparsed { from: 0 })?
        else {
            return Ok(view);
        };
        if !matches!(root.value, Value::Object(_)) {
            return Err(Unparsed { from: 0 });
        }
        if let Some(response) = root.get("response").and_then(Node::as_str) {
            view.content = response.to_owned();
        }
        if let Some(calls) = root.get("tool_calls") {
            if let Value::Array(items) = &calls.value {
                for item in items {
                    self.read_call(item, "arguments", &mut view);
                }
            }
        }
        if let Some(call) = root.get("tool_call") {
            self.read_call(call, "arguments", &mut view);
        }
        Ok(view)
    }

    /// Text, then `<tool_call>{...}</tool_call>` blocks.
    fn hermes(&self, done: bool) -> Result<View, Unparsed> {
        let text = self.text.as_str();
        let mut view = View::default();
        let Some(open) = text.find(HERMES_OPEN) else {
            view.content = held_back(text, HERMES_OPEN, done).to_owned();
            return Ok(view);
        };
        view.content = text[..open].trim_end().to_owned();
        // Where the unparsed text starts if a block does not parse: right after the content
        // for the first block, at the block for later ones.
        let content_end = view.content.len();
        let unparsed = |at: usize| Unparsed {
            from: if at == open { content_end } else { at },
        };
        let mut at = open;
        while text[at..].starts_with(HERMES_OPEN) {
            let body = at + HERMES_OPEN.len();
            let Some(call) = parse_prefix(text, body).map_err(|NotJson| unparsed(at))? else {
                return Ok(view);
            };
            self.read_call(&call, "arguments", &mut view);
            if !call.complete {
                return Ok(view);
            }
            let close = skip_whitespace(text, call.end);
            let rest = &text[close..];
            if rest.starts_with(HERMES_CLOSE) {
                at = skip_whitespace(text, close + HERMES_CLOSE.len());
            } else if HERMES_CLOSE.starts_with(rest) {
                return Ok(view);
            } else {
                return Err(unparsed(at));
            }
        }
        // Text after the last call is content too (rare; kept rather than dropped).
        view.content
            .push_str(held_back(&text[at..], HERMES_OPEN, done));
        Ok(view)
    }

    /// Text, then `[TOOL_CALLS]` and a JSON array of calls.
    fn mistral(&self, done: bool) -> Result<View, Unparsed> {
        let text = self.text.as_str();
        let mut view = View::default();
        let Some(marker) = text.find(MISTRAL_MARKER) else {
            view.content = held_back(text, MISTRAL_MARKER, done).to_owned();
            return Ok(view);
        };
        view.content = text[..marker].trim_end().to_owned();
        let unparsed = Unparsed {
            from: view.content.len(),
        };
        let body = marker + MISTRAL_MARKER.len();
        let Ok(calls) = parse_prefix(text, body) else {
            return Err(unparsed);
        };
        let Some(calls) = calls else {
            return Ok(view);
        };
        match &calls.value {
            Value::Array(items) => {
                for item in items {
                    self.read_call(item, "arguments", &mut view);
                }
            }
            Value::Object(_) => self.read_call(&calls, "arguments", &mut view),
            _ => return Err(unparsed),
        }
        Ok(view)
    }

    /// Either plain text, or (optionally after `<|python_tag|>`) calls as JSON objects
    /// separated by `;`.
    fn llama3(&self, done: bool) -> Result<View, Unparsed> {
        let text = self.text.as_str();
        let mut view = View::default();
        let mut at = skip_whitespace(text, 0);
        if text[at..].starts_with(LLAMA_PYTHON_TAG) {
            at = skip_whitespace(text, at + LLAMA_PYTHON_TAG.len());
        } else if !done && LLAMA_PYTHON_TAG.starts_with(&text[at..]) {
            return Ok(view); // nothing but whitespace, or the start of the tag
        }
        if !text[at..].starts_with('{') {
            if at < text.len() || done {
                view.content = text.to_owned();
            }
            return Ok(view);
        }
        loop {
            let Some(call) = parse_prefix(text, at).map_err(|NotJson| Unparsed { from: 0 })? else {
                return Ok(view);
            };
            self.read_call(&call, "parameters", &mut view);
            if !call.complete {
                return Ok(view);
            }
            at = skip_whitespace(text, call.end);
            match text[at..].chars().next() {
                None => return Ok(view),
                Some(';') => at = skip_whitespace(text, at + 1),
                Some(_) => return Err(Unparsed { from: 0 }),
            }
        }
    }

    /// A call object `{"name": ..., "<args_key>": {...}}` into `view` once its name is whole.
    fn read_call(&self, call: &Node, args_key: &str, view: &mut View) {
        let Some(name) = call
            .get("name")
            .filter(|n| n.complete)
            .and_then(Node::as_str)
        else {
            return;
        };
        let args = call
            .get(args_key)
            .or_else(|| call.get("arguments"))
            .map(|args| self.text.get(args.start..args.end).unwrap_or_default())
            .unwrap_or_default();
        view.calls
            .push((name.to_owned(), args.to_owned(), call.complete));
    }
}

/// The output stopped following its format at byte `from`.
#[derive(Debug)]
struct Unparsed {
    from: usize,
}

/// `text` without what may still become `marker` or separate content from it: a tail that is
/// a prefix of the marker, and trailing whitespace (dropped before a call). All of it once
/// the output is `done`.
fn held_back<'t>(text: &'t str, marker: &str, done: bool) -> &'t str {
    if done {
        return text;
    }
    let keep = (1..marker.len().min(text.len() + 1))
        .rev()
        .find(|&n| text.is_char_boundary(text.len() - n) && text.ends_with(&marker[..n]))
        .map_or(text.len(), |n| text.len() - n);
    text[..keep].trim_end()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `output` to a parser in pieces of `size` characters and collects what it released.
    fn run(
        format: ToolFormat,
        output: &str,
        size: usize,
    ) -> (String, Vec<(String, String)>, Vec<ToolCallDelta>) {
        let mut parser = CallParser::new(format, "call_t".into());
        let chars: Vec<char> = output.chars().collect();
        let mut all = Released::default();
        for piece in chars.chunks(size) {
            all.extend(parser.push(&piece.iter().collect::<String>()));
        }
        all.extend(parser.finish());
        let mut calls: Vec<(String, String)> = Vec::new();
        for delta in &all.calls {
            if let Some(name) = &delta.name {
                assert_eq!(
                    delta.index as usize,
                    calls.len(),
                    "calls are announced in order"
                );
                assert!(
                    delta.id.is_some() && delta.arguments.is_empty(),
                    "{delta:?}"
                );
                calls.push((name.clone(), String::new()));
            } else {
                assert!(delta.id.is_none());
                calls[delta.index as usize].1.push_str(&delta.arguments);
            }
        }
        (all.content, calls, all.calls)
    }

    fn every_split(format: ToolFormat, output: &str, content: &str, calls: &[(&str, &str)]) {
        let want: Vec<(String, String)> = calls
            .iter()
            .map(|(n, a)| ((*n).to_owned(), (*a).to_owned()))
            .collect();
        for size in [1, 2, 3, 7, 1000] {
            let (got_content, got_calls, _) = run(format, output, size);
            assert_eq!(
                got_content, content,
                "content, pieces of {size}: {output:?}"
            );
            assert_eq!(got_calls, want, "calls, pieces of {size}: {output:?}");
        }
    }

    #[test]
    fn hermes_calls_with_text_before_split_anywhere() {
        every_split(
            ToolFormat::Hermes,
            "Let me check.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>\n<tool_call>\n{\"name\": \"get_time\", \"arguments\": {}}\n</tool_call>",
            "Let me check.",
            &[("get_weather", "{\"city\": \"Paris\"}"), ("get_time", "{}")],
        );
    }

    #[test]
    fn text_that_only_looks_like_a_marker_is_content() {
        every_split(ToolFormat::Hermes, "a <tool_ b", "a <tool_ b", &[]);
        every_split(
            ToolFormat::Hermes,
            "ends with <tool_",
            "ends with <tool_",
            &[],
        );
        every_split(ToolFormat::Mistral, "[TOOL] x", "[TOOL] x", &[]);
        every_split(ToolFormat::Llama3, "Paris is {big}", "Paris is {big}", &[]);
    }

    #[test]
    fn generic_calls_and_responses() {
        every_split(
            ToolFormat::Generic,
            r#"{"tool_calls": [{"name": "a", "arguments": {"x": [1, "]}"]}}, {"name": "b", "arguments": {}}]}"#,
            "",
            &[("a", r#"{"x": [1, "]}"]}"#), ("b", "{}")],
        );
        every_split(
            ToolFormat::Generic,
            r#"{"response": "Hi \"there\" \u00e9"}"#,
            "Hi \"there\" é",
            &[],
        );
    }

    #[test]
    fn parameterless_calls_get_an_empty_object() {
        // vLLM #28806 dropped `{}`; a call written without arguments still gets `{}`.
        every_split(
            ToolFormat::Hermes,
            "<tool_call>{\"name\": \"now\"}</tool_call>",
            "",
            &[("now", "{}")],
        );
        every_split(
            ToolFormat::Generic,
            r#"{"tool_calls": [{"name": "now", "arguments": {}}]}"#,
            "",
            &[("now", "{}")],
        );
    }

    #[test]
    fn mistral_and_llama3_formats() {
        every_split(
            ToolFormat::Mistral,
            "[TOOL_CALLS][{\"name\": \"f\", \"arguments\": {\"a\": 1}}, {\"name\": \"g\", \"arguments\": {\"b\": true}}]",
            "",
            &[("f", "{\"a\": 1}"), ("g", "{\"b\": true}")],
        );
        every_split(
            ToolFormat::Llama3,
            "<|python_tag|>{\"name\": \"f\", \"parameters\": {\"a\": \"x\"}}; {\"name\": \"g\", \"parameters\": {}}",
            "",
            &[("f", "{\"a\": \"x\"}"), ("g", "{}")],
        );
        every_split(ToolFormat::Llama3, "  Hello there", "  Hello there", &[]);
    }

    #[test]
    fn the_first_piece_of_a_call_has_empty_arguments_then_only_arguments_follow() {
        let (_, _, deltas) = run(
            ToolFormat::Generic,
            r#"{"tool_calls": [{"name": "f", "arguments": {"a": 1}}]}"#,
            1,
        );
        assert_eq!(deltas[0].name.as_deref(), Some("f"));
        assert_eq!(deltas[0].arguments, "");
        assert!(deltas[1..]
            .iter()
            .all(|d| d.name.is_none() && d.id.is_none()));
        assert!(
            deltas.len() > 3,
            "arguments are streamed in pieces: {deltas:?}"
        );
    }

    #[test]
    fn output_that_leaves_the_format_becomes_content() {
        let (content, calls, _) = run(ToolFormat::Hermes, "Hi <tool_call> not json", 4);
        assert_eq!(content, "Hi <tool_call> not json");
        assert!(calls.is_empty());
        let (content, calls, _) = run(ToolFormat::Generic, "plain words", 3);
        assert_eq!(content, "plain words");
        assert!(calls.is_empty());
    }
}
