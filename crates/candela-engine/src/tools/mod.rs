//! Tool calling: structured outputs with a trigger. At submit a request's tools become
//! constraints in the model's own format ([`grammar`]); on the engine thread each choice runs
//! a [`ChoiceTools`]: it switches a lazy constraint on when the format's marker appears, and
//! its [`parser::CallParser`] turns the output into content and OpenAI tool-call pieces.
//! [`prompt`] decides what the chat template sees of the tools.

pub(crate) mod grammar;
mod json;
pub(crate) mod parser;
pub(crate) mod prompt;

use candela_models::chat_template::ToolFormat;

use crate::structured::{Advance, ChoiceConstraint};
use parser::CallParser;

/// A request's tool calling after submit, shared by its choices.
#[derive(Debug, Clone)]
pub(crate) struct CompiledTools {
    pub(crate) format: ToolFormat,
    /// `auto` in a format with a marker: the marker, and the constraint of what follows it.
    pub(crate) lazy: Option<(&'static str, ChoiceConstraint)>,
}

/// Waiting for a lazy constraint's marker.
#[derive(Debug)]
struct Pending {
    marker: &'static str,
    constraint: ChoiceConstraint,
    /// The output's last characters: enough to see a marker split across tokens.
    tail: String,
}

/// One choice's tool-calling state.
#[derive(Debug)]
pub(crate) struct ChoiceTools {
    pub(crate) parser: CallParser,
    pending: Option<Pending>,
}

impl ChoiceTools {
    /// The state at the start of a choice's output; `id_prefix` starts its call ids.
    pub(crate) fn new(compiled: &CompiledTools, id_prefix: String) -> Self {
        Self {
            parser: CallParser::new(compiled.format, id_prefix),
            pending: compiled.lazy.as_ref().map(|(marker, constraint)| Pending {
                marker,
                constraint: constraint.clone(),
                tail: String::new(),
            }),
        }
    }

    /// Sees the decoded text of one more token, before stop strings hold any back. When it
    /// completes the marker, returns the lazy constraint, already past whatever the token
    /// wrote after the marker (and whether that completed it): the choice is constrained from
    /// its next token on. `Err` when that text does not fit the constraint.
    pub(crate) fn observe(
        &mut self,
        piece: &str,
    ) -> Option<Result<(ChoiceConstraint, Advance), String>> {
        let pending = self.pending.as_mut()?;
        pending.tail.push_str(piece);
        if let Some(at) = pending.tail.find(pending.marker) {
            let after = pending.tail[at + pending.marker.len()..].to_owned();
            let mut pending = self.pending.take()?;
            return Some(
                pending
                    .constraint
                    .advance_text(&after)
                    .map(|advance| (pending.constraint, advance)),
            );
        }
        // Keep just enough to complete a marker split across tokens.
        let keep = pending.marker.len().saturating_sub(1);
        if pending.tail.len() > keep {
            let mut cut = pending.tail.len() - keep;
            while !pending.tail.is_char_boundary(cut) {
                cut -= 1;
            }
            pending.tail.drain(..cut);
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use candela_models::tokenizer::Tokenizer;
    use candle_core::quantized::gguf_file;

    use super::*;
    use crate::api::{ToolCalling, ToolChoice, ToolSpec};
    use crate::structured::Structured;

    /// The default model's vocabulary (the model file `scripts/test` fetches first).
    fn structured() -> Structured {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../models/SmolLM2-135M-Instruct.Q4_1.gguf");
        let mut file =
            std::fs::File::open(&path).expect("the default model (scripts/fetch-default-model)");
        let content = gguf_file::Content::read(&mut file).expect("GGUF header");
        let tokenizer = Arc::new(Tokenizer::from_gguf(&content).expect("tokenizer"));
        let eos = tokenizer.eos_token_ids();
        let vocab = tokenizer.vocab_size() as usize;
        Structured::new(tokenizer, vocab, &eos).expect("vocabulary trie")
    }

    fn hermes_auto(structured: &Structured) -> CompiledTools {
        let calling = ToolCalling {
            tools: vec![ToolSpec {
                name: "get_weather".into(),
                description: None,
                parameters: r#"{"type": "object", "properties": {"city": {"type": "string"}}}"#
                    .into(),
                strict: false,
            }],
            choice: ToolChoice::Auto,
            parallel: false,
        };
        let grammar = grammar::tool_grammar(ToolFormat::Hermes, &calling).expect("grammar");
        let (marker, lazy) = grammar.lazy.expect("auto is lazy in the Hermes format");
        CompiledTools {
            format: ToolFormat::Hermes,
            lazy: Some((marker, structured.compile(&lazy).expect("compiles"))),
        }
    }

    #[test]
    fn the_lazy_constraint_starts_after_a_marker_split_across_tokens() {
        let structured = structured();
        let compiled = hermes_auto(&structured);
        let mut tools = ChoiceTools::new(&compiled, "call_x_".into());
        // Free text, and a marker's start, constrain nothing.
        assert!(tools.observe("Let me look that up. <tool").is_none());
        // The marker completes inside a token that also starts the call.
        let mut constraint = match tools.observe("_call>\n{\"na") {
            Some(Ok((constraint, Advance::Continue))) => constraint,
            other => panic!("expected the constraint, got {other:?}"),
        };
        // From here the constraint holds: only a call may follow...
        let mask = constraint.compute_mask().expect("mask");
        let mut logits = vec![0.0f32; 49152];
        mask.apply(&mut logits);
        let allowed = logits.iter().filter(|l| l.is_finite()).count();
        assert!((1..100).contains(&allowed), "{allowed} tokens allowed");
        // ...and a valid call completes it (one call: parallel_tool_calls is false).
        let rest = "me\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>";
        assert_eq!(constraint.advance_text(rest), Ok(Advance::Complete));
        // A second marker does not start anything again.
        assert!(tools.observe("<tool_call>").is_none());
    }

    #[test]
    fn text_after_the_marker_that_cannot_be_a_call_is_an_error() {
        let structured = structured();
        let compiled = hermes_auto(&structured);
        let mut tools = ChoiceTools::new(&compiled, "call_x_".into());
        assert!(matches!(tools.observe("<tool_call>[oops"), Some(Err(_))));
    }
}
