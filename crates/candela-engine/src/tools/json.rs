//! JSON read from a prefix of text: what a tool call looks like while the model is still
//! writing it. Each value keeps its byte span in the text, so a call's `arguments` can be
//! streamed as the exact text the model wrote (OpenAI sends arguments as a JSON string), and
//! each says whether it is complete.
//!
//! Hand-written because serde_json (and every JSON crate we use) rejects an unfinished
//! document outright; streaming needs the valid prefix and how far it got.

/// One value read from the text.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Node {
    /// What it is, so far.
    pub(crate) value: Value,
    /// Where it starts in the text (its first byte).
    pub(crate) start: usize,
    /// Where the text read so far ends (one past its last byte, when complete).
    pub(crate) end: usize,
    /// Its closing byte has been read.
    pub(crate) complete: bool,
}

/// The kinds of [`Node`]. Objects keep only members whose key is complete.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Value {
    Object(Vec<(String, Node)>),
    Array(Vec<Node>),
    /// The string's text, unescaped, as far as it is known.
    String(String),
    /// A number, `true`, `false` or `null`.
    Scalar,
}

impl Node {
    /// The member `key` of an object.
    pub(crate) fn get(&self, key: &str) -> Option<&Node> {
        match &self.value {
            Value::Object(members) => members.iter().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }

    /// A string's text.
    pub(crate) fn as_str(&self) -> Option<&str> {
        match &self.value {
            Value::String(text) => Some(text),
            _ => None,
        }
    }
}

/// The text is not the beginning of any JSON document.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct NotJson;

/// Reads one JSON value from `text[start..]`, skipping leading whitespace. `Ok(None)` when
/// only whitespace has been written so far.
pub(crate) fn parse_prefix(text: &str, start: usize) -> Result<Option<Node>, NotJson> {
    let mut reader = Reader {
        bytes: text.as_bytes(),
        at: start,
    };
    reader.skip_whitespace();
    if reader.at >= reader.bytes.len() {
        return Ok(None);
    }
    reader.value().map(Some)
}

/// Skips JSON whitespace from `at`; the position of the next other byte (or the end).
pub(crate) fn skip_whitespace(text: &str, at: usize) -> usize {
    let mut reader = Reader {
        bytes: text.as_bytes(),
        at,
    };
    reader.skip_whitespace();
    reader.at
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn peek(&self) -> Option<u8> {
        self.bytes.get(self.at).copied()
    }

    fn skip_whitespace(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\n' | b'\r' | b'\t')) {
            self.at += 1;
        }
    }

    fn node(&self, value: Value, start: usize, complete: bool) -> Node {
        Node {
            value,
            start,
            end: self.at,
            complete,
        }
    }

    /// A value starting at `self.at` (not whitespace, not the end).
    fn value(&mut self) -> Result<Node, NotJson> {
        match self.peek() {
            Some(b'{') => self.object(),
            Some(b'[') => self.array(),
            Some(b'"') => self.string(),
            Some(b'-' | b'0'..=b'9' | b't' | b'f' | b'n') => self.scalar(),
            _ => Err(NotJson),
        }
    }

    fn object(&mut self) -> Result<Node, NotJson> {
        let start = self.at;
        self.at += 1;
        let mut members = Vec::new();
        loop {
            self.skip_whitespace();
            match self.peek() {
                None => return Ok(self.node(Value::Object(members), start, false)),
                Some(b'}') => {
                    self.at += 1;
                    return Ok(self.node(Value::Object(members), start, true));
                }
                Some(b',') if !members.is_empty() => {
                    self.at += 1;
                    self.skip_whitespace();
                }
                Some(_) if members.is_empty() => {}
                Some(_) => return Err(NotJson),
            }
            match self.peek() {
                None => return Ok(self.node(Value::Object(members), start, false)),
                Some(b'"') => {}
                Some(_) => return Err(NotJson),
            }
            let key = self.string()?;
            let (Value::String(key_text), true) = (key.value, key.complete) else {
                return Ok(self.node(Value::Object(members), start, false));
            };
            self.skip_whitespace();
            match self.peek() {
                None => return Ok(self.node(Value::Object(members), start, false)),
                Some(b':') => self.at += 1,
                Some(_) => return Err(NotJson),
            }
            self.skip_whitespace();
            if self.peek().is_none() {
                return Ok(self.node(Value::Object(members), start, false));
            }
            let value = self.value()?;
            let complete = value.complete;
            members.push((key_text, value));
            if !complete {
                return Ok(self.node(Value::Object(members), start, false));
            }
        }
    }

    fn array(&mut self) -> Result<Node, NotJson> {
        let start = self.at;
        self.at += 1;
        let mut items = Vec::new();
        loop {
            self.skip_whitespace();
            match self.peek() {
                None => return Ok(self.node(Value::Array(items), start, false)),
                Some(b']') => {
                    self.at += 1;
                    return Ok(self.node(Value::Array(items), start, true));
                }
                Some(b',') if !items.is_empty() => {
                    self.at += 1;
                    self.skip_whitespace();
                    if self.peek().is_none() {
                        return Ok(self.node(Value::Array(items), start, false));
                    }
                }
                Some(_) if items.is_empty() => {}
                Some(_) => return Err(NotJson),
            }
            let item = self.value()?;
            let complete = item.complete;
            items.push(item);
            if !complete {
                return Ok(self.node(Value::Array(items), start, false));
            }
        }
    }

    fn string(&mut self) -> Result<Node, NotJson> {
        let start = self.at;
        self.at += 1;
        let mut text = String::new();
        // Unescaped runs are copied whole: the text is valid UTF-8 and `"`/`\` are ASCII, so
        // a run ends on a character boundary.
        let mut run = self.at;
        while let Some(byte) = self.peek() {
            match byte {
                b'"' => {
                    text.push_str(&self.str_between(run, self.at));
                    self.at += 1;
                    return Ok(self.node(Value::String(text), start, true));
                }
                b'\\' => {
                    text.push_str(&self.str_between(run, self.at));
                    let Some(escape) = self.bytes.get(self.at + 1).copied() else {
                        // A lone backslash at the end: the escape is not known yet.
                        return Ok(self.node(Value::String(text), start, false));
                    };
                    let simple = match escape {
                        b'"' => Some('"'),
                        b'\\' => Some('\\'),
                        b'/' => Some('/'),
                        b'b' => Some('\u{8}'),
                        b'f' => Some('\u{c}'),
                        b'n' => Some('\n'),
                        b'r' => Some('\r'),
                        b't' => Some('\t'),
                        b'u' => None,
                        _ => return Err(NotJson),
                    };
                    match simple {
                        Some(c) => {
                            text.push(c);
                            self.at += 2;
                        }
                        None => match self.unicode_escape()? {
                            Some(c) => text.push(c),
                            None => return Ok(self.node(Value::String(text), start, false)),
                        },
                    }
                    run = self.at;
                }
                0x00..=0x1f => return Err(NotJson),
                _ => self.at += 1,
            }
        }
        text.push_str(&self.str_between(run, self.at));
        Ok(self.node(Value::String(text), start, false))
    }

    /// `\uXXXX` (and a following low surrogate) at `self.at`; `Ok(None)` when the text ends
    /// inside it (the position is then left at the backslash's end so nothing is lost).
    fn unicode_escape(&mut self) -> Result<Option<char>, NotJson> {
        let hex = |at: usize| -> Result<Option<u32>, NotJson> {
            let Some(digits) = self.bytes.get(at..at + 4) else {
                let rest = self.bytes.get(at..).unwrap_or_default();
                return if rest.iter().all(u8::is_ascii_hexdigit) {
                    Ok(None)
                } else {
                    Err(NotJson)
                };
            };
            let digits = std::str::from_utf8(digits).map_err(|_| NotJson)?;
            u32::from_str_radix(digits, 16)
                .map(Some)
                .map_err(|_| NotJson)
        };
        let Some(high) = hex(self.at + 2)? else {
            self.at = self.bytes.len();
            return Ok(None);
        };
        if (0xD800..0xDC00).contains(&high) {
            // A surrogate pair: `\uD83D\uDE00`.
            let next = self.at + 6;
            match (self.bytes.get(next), self.bytes.get(next + 1)) {
                (Some(b'\\'), Some(b'u')) => {}
                (None, _) | (Some(b'\\'), None) => {
                    self.at = self.bytes.len();
                    return Ok(None);
                }
                _ => return Err(NotJson),
            }
            let Some(low) = hex(next + 2)? else {
                self.at = self.bytes.len();
                return Ok(None);
            };
            let code = 0x10000 + ((high - 0xD800) << 10) + (low.wrapping_sub(0xDC00) & 0x3FF);
            self.at = next + 6;
            return char::from_u32(code).map(Some).ok_or(NotJson);
        }
        self.at += 6;
        Ok(Some(
            char::from_u32(high).unwrap_or(char::REPLACEMENT_CHARACTER),
        ))
    }

    fn str_between(&self, from: usize, to: usize) -> String {
        String::from_utf8_lossy(self.bytes.get(from..to).unwrap_or_default()).into_owned()
    }

    fn scalar(&mut self) -> Result<Node, NotJson> {
        let start = self.at;
        while matches!(
            self.peek(),
            Some(b'-' | b'+' | b'.' | b'0'..=b'9' | b'a'..=b'z' | b'E')
        ) {
            self.at += 1;
        }
        let word = self.bytes.get(start..self.at).unwrap_or_default();
        let is_prefix_of = |full: &[u8]| full.starts_with(word);
        let numeric = word
            .iter()
            .all(|b| matches!(b, b'-' | b'+' | b'.' | b'0'..=b'9' | b'e' | b'E'));
        if !(numeric || is_prefix_of(b"true") || is_prefix_of(b"false") || is_prefix_of(b"null")) {
            return Err(NotJson);
        }
        // At the end of the text a number may go on; a literal is complete when whole.
        let complete = self.at < self.bytes.len() || matches!(word, b"true" | b"false" | b"null");
        Ok(self.node(Value::Scalar, start, complete))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Node {
        match parse_prefix(text, 0) {
            Ok(Some(node)) => node,
            other => panic!("{text:?}: {other:?}"),
        }
    }

    #[test]
    fn complete_documents_parse_with_spans() {
        let text = r#" {"name": "f", "arguments": {"a": [1, 2.5e3, true, null]}} "#;
        let root = parse(text);
        assert!(root.complete);
        assert_eq!(root.get("name").and_then(Node::as_str), Some("f"));
        let args = root.get("arguments").expect("arguments");
        assert_eq!(
            &text[args.start..args.end],
            r#"{"a": [1, 2.5e3, true, null]}"#
        );
        assert!(args.complete);
    }

    #[test]
    fn every_prefix_of_a_document_is_a_prefix() {
        let text = r#"{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris \"15e\" \u00e9\ud83d\ude00", "n": -12.5}}]}"#;
        for end in 1..=text.len() {
            if !text.is_char_boundary(end) {
                continue;
            }
            let prefix = &text[..end];
            let node = parse_prefix(prefix, 0).unwrap_or_else(|_| panic!("{prefix:?}"));
            let node = node.expect("a value");
            assert_eq!(node.complete, end == text.len(), "{prefix:?}");
        }
        let root = parse(text);
        let call = match &root.get("tool_calls").expect("calls").value {
            Value::Array(items) => items[0].clone(),
            other => panic!("{other:?}"),
        };
        let args = call.get("arguments").expect("arguments");
        let city = args.get("city").and_then(Node::as_str);
        assert_eq!(city, Some("Paris \"15e\" é😀"));
    }

    #[test]
    fn a_partial_string_is_known_as_far_as_written() {
        let root = parse(r#"{"response": "Hello, wor"#);
        let response = root.get("response").expect("response");
        assert_eq!(response.as_str(), Some("Hello, wor"));
        assert!(!response.complete);
        // A key still being written is not a member yet.
        let root = parse(r#"{"response": "Hi", "na"#);
        assert!(root.get("na").is_none());
        // A split escape waits for its end.
        let root = parse(r#"{"response": "a\"#);
        assert_eq!(root.get("response").and_then(Node::as_str), Some("a"));
        let root = parse(r#"{"response": "a\u00"#);
        assert_eq!(root.get("response").and_then(Node::as_str), Some("a"));
    }

    #[test]
    fn text_that_is_not_json_is_refused() {
        for bad in [
            "hello",
            "{x",
            r#"{"a" 1}"#,
            "[1 2]",
            r#"{"a": tru e}"#,
            "{\"a\": \"\u{1}\"}",
        ] {
            assert_eq!(parse_prefix(bad, 0), Err(NotJson), "{bad:?}");
        }
        assert_eq!(parse_prefix("  \n", 0), Ok(None));
    }
}
