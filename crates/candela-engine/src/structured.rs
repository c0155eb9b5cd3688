//! Structured outputs: the token masks that keep a choice's output inside a JSON schema, a
//! regular expression, a list of choices or a grammar (OpenAI's `response_format`, vLLM's
//! `guided_*` parameters).
//!
//! llguidance does the grammar work (it is what vLLM, llama.cpp and mistral.rs use): it compiles
//! a constraint against a trie of the model's vocabulary and gives, at each step, the set of
//! tokens that keep the output a prefix of something the constraint accepts. This module builds
//! that vocabulary once per engine ([`Structured`]), compiles each request's constraint in
//! `submit` (so a bad schema is a 400, never a failed step) and, per choice, masks the logits
//! row and advances the matcher with the sampled token ([`ChoiceConstraint`]).

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

use candela_models::tokenizer::Tokenizer;
use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{SimpleVob, TokEnv, TokRxInfo, TokTrie, TokenizerEnv};
use llguidance::{JsonCompileOptions, Matcher, ParserFactory};

use crate::api::{OutputConstraint, TokenId};

/// Whitespace the JSON grammars allow between two lexemes: any JSON whitespace, at most this
/// many characters (llama.cpp's JSON grammars bound it too). Unbounded, a small model can fill
/// the whole `max_tokens` with newlines inside an otherwise valid object.
const JSON_WHITESPACE: &str = r"[\x20\x0A\x0D\x09]{1,24}";

/// The model's vocabulary as llguidance needs it: each token's bytes in a trie, and the
/// tokenizer for the strings a grammar forces.
struct Vocabulary {
    trie: TokTrie,
    tokenizer: Arc<Tokenizer>,
}

impl TokenizerEnv for Vocabulary {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<u32> {
        match std::str::from_utf8(s) {
            Ok(text) => match self.tokenizer.encode(text, false) {
                Ok(ids) => ids,
                Err(_) => self.trie.greedy_tokenize(s),
            },
            // Not text on its own (a split multi-byte character): longest vocabulary matches.
            Err(_) => self.trie.greedy_tokenize(s),
        }
    }
}

/// What one engine needs to compile constraints: the parser factory over its vocabulary.
pub(crate) struct Structured {
    factory: ParserFactory,
}

impl std::fmt::Debug for Structured {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Structured")
            .field(
                "vocab_size",
                &self.factory.tok_env().tok_trie().vocab_size(),
            )
            .finish()
    }
}

impl Structured {
    /// Builds the vocabulary trie of `tokenizer`, `vocab_size` rows wide (the logits' width:
    /// ids the tokenizer lacks are never allowed). `eos_token_ids` may end a constrained output
    /// once it is complete. `Err` says why this tokenizer cannot be used.
    pub(crate) fn new(
        tokenizer: Arc<Tokenizer>,
        vocab_size: usize,
        eos_token_ids: &[TokenId],
    ) -> Result<Self, String> {
        let json = tokenizer
            .to_json()
            .map_err(|e| format!("the tokenizer as JSON: {e}"))?;
        let json: serde_json::Value =
            serde_json::from_str(&json).map_err(|e| format!("the tokenizer's JSON: {e}"))?;
        let eos = *eos_token_ids
            .first()
            .ok_or("the model has no end-of-sequence token")?;
        let vocab_size_u32 =
            u32::try_from(vocab_size).map_err(|_| format!("vocabulary of {vocab_size}"))?;
        // llguidance asserts on vocabularies it does not expect (a byte-fallback piece it cannot
        // read, a trie that fails its own validation); that must not take the engine down.
        let built = catch_unwind(AssertUnwindSafe(|| {
            let mut words = llguidance::token_bytes_from_tokenizer_json(&json)
                .map_err(|e| format!("token bytes: {e}"))?;
            words.resize(vocab_size, Vec::new());
            let info = TokRxInfo::new(vocab_size_u32, eos);
            let trie = TokTrie::from(&info, &words).with_eos_tokens(eos_token_ids);
            let env: TokEnv = Arc::new(Vocabulary { trie, tokenizer });
            let mut factory = ParserFactory::new_simple(&env).map_err(|e| e.to_string())?;
            // Errors go back to the client; llguidance's own stderr logging stays off.
            factory.quiet();
            Ok::<_, String>(factory)
        }))
        .map_err(|_| "llguidance cannot read this tokenizer's vocabulary".to_string())??;
        Ok(Self { factory: built })
    }

    /// Compiles a request's constraint. `Err` is the client's mistake (an invalid schema,
    /// regex or grammar), worded by llguidance.
    pub(crate) fn compile(
        &self,
        constraint: &OutputConstraint,
    ) -> Result<ChoiceConstraint, String> {
        let grammar = match constraint {
            OutputConstraint::JsonObject => json_grammar(serde_json::json!({ "type": "object" })),
            OutputConstraint::JsonSchema(schema) => {
                let schema: serde_json::Value = serde_json::from_str(schema)
                    .map_err(|e| format!("the JSON schema is not JSON: {e}"))?;
                if !(schema.is_object() || schema.is_boolean()) {
                    return Err("a JSON schema must be an object or a boolean".into());
                }
                json_grammar(schema)
            }
            OutputConstraint::Regex(regex) => TopLevelGrammar::from_regex(regex),
            OutputConstraint::Choice(choices) => {
                if choices.is_empty() {
                    return Err("give at least one choice".into());
                }
                let alternatives: Vec<String> =
                    choices.iter().map(|c| regex_syntax::escape(c)).collect();
                TopLevelGrammar::from_regex(&format!("({})", alternatives.join("|")))
            }
            OutputConstraint::Lark(grammar) => TopLevelGrammar::from_lark(grammar.clone()),
        };
        let parser = catch_unwind(AssertUnwindSafe(|| self.factory.create_parser(grammar)))
            .map_err(|_| "the constraint could not be compiled".to_string())?
            .map_err(|e| e.to_string())?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(error) = matcher.get_error() {
            return Err(error);
        }
        Ok(ChoiceConstraint { matcher })
    }
}

/// A JSON schema's grammar, with bounded whitespace unless the schema sets its own options
/// (llguidance's `x-guidance`).
fn json_grammar(mut schema: serde_json::Value) -> TopLevelGrammar {
    if let Some(object) = schema.as_object_mut() {
        if !object.contains_key("x-guidance") {
            object.insert("x-guidance".into(), json_options(false));
        }
    }
    TopLevelGrammar::from_json_schema(schema)
}

/// llguidance's JSON options as a schema's `x-guidance`: bounded whitespace; `lenient` skips
/// keywords the compiler cannot enforce instead of refusing the schema.
pub(crate) fn json_options(lenient: bool) -> serde_json::Value {
    let options = JsonCompileOptions {
        whitespace_pattern: Some(JSON_WHITESPACE.into()),
        lenient,
        ..JsonCompileOptions::default()
    };
    serde_json::to_value(options).unwrap_or_default()
}

/// What a sampled token did to a constrained choice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Advance {
    /// More output may follow.
    Continue,
    /// The output is complete and nothing may follow it: the choice stops here.
    Complete,
}

/// The constraint state of one choice: a matcher at the choice's current output.
#[derive(Clone)]
pub(crate) struct ChoiceConstraint {
    matcher: Matcher,
}

impl std::fmt::Debug for ChoiceConstraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChoiceConstraint")
            .field("stopped", &self.matcher.is_stopped())
            .finish()
    }
}

/// The tokens a constraint allows next.
pub(crate) struct TokenMask(SimpleVob);

impl TokenMask {
    /// Sets every logit the mask does not allow to -inf: 32 tokens a mask word, branch-free
    /// (a callback per disallowed token, most of a vocabulary, costs more than the mask).
    pub(crate) fn apply(&self, logits: &mut [f32]) {
        let words = self.0.as_slice();
        let mut chunks = logits.chunks_mut(32);
        for (chunk, &word) in chunks.by_ref().zip(words) {
            if word == u32::MAX {
                continue;
            }
            for (j, logit) in chunk.iter_mut().enumerate() {
                *logit = if (word >> j) & 1 != 0 {
                    *logit
                } else {
                    f32::NEG_INFINITY
                };
            }
        }
        // Tokens past the mask's end are not allowed either.
        for chunk in chunks {
            chunk.fill(f32::NEG_INFINITY);
        }
    }
}

impl ChoiceConstraint {
    /// The tokens allowed next: end-of-sequence tokens exactly when the output is complete.
    /// Tenths of a millisecond for a JSON schema over a 50k vocabulary: the engine computes
    /// the masks of a step's constrained rows in parallel.
    pub(crate) fn compute_mask(&mut self) -> Result<TokenMask, String> {
        self.matcher
            .compute_mask()
            .map(TokenMask)
            .map_err(|e| e.to_string())
    }

    /// Advances past text already generated (where a lazy constraint starts in the middle of
    /// a token), spelled in the vocabulary's tokens; `Err` when it does not fit.
    pub(crate) fn advance_text(&mut self, text: &str) -> Result<Advance, String> {
        if !text.is_empty() {
            let env = self.matcher.tok_env().map_err(|e| e.to_string())?;
            for token in env.tokenize_bytes(text.as_bytes()) {
                self.matcher
                    .consume_token(token)
                    .map_err(|e| e.to_string())?;
            }
        }
        Ok(self.state())
    }

    /// Advances past the sampled `token`. An end-of-sequence token ends the output and is
    /// not fed to the grammar.
    pub(crate) fn advance(&mut self, token: TokenId, is_eos: bool) -> Result<Advance, String> {
        if is_eos {
            return Ok(Advance::Complete);
        }
        self.matcher
            .consume_token(token)
            .map_err(|e| e.to_string())?;
        Ok(self.state())
    }

    /// Whether anything may follow the output so far.
    fn state(&self) -> Advance {
        if self.matcher.is_stopped() {
            Advance::Complete
        } else {
            Advance::Continue
        }
    }
}
