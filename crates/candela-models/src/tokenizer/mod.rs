//! Text <-> token ids for the models we serve.
//!
//! A [`Tokenizer`] comes from a Hugging Face `tokenizer.json` when the model ships one,
//! else it is rebuilt from the GGUF metadata the way llama.cpp reads it: byte-level BPE for
//! `tokenizer.ggml.model = "gpt2"` (with the regex pre-tokenizer that `tokenizer.ggml.pre`
//! names) and SentencePiece-style BPE with byte fallback for `"llama"`. llama.cpp is the
//! reference here (its records are our ground truth), so the GGUF path mirrors its
//! `llama-vocab.cpp` rather than any one `tokenizer.json`: no normalizer for BPE, no
//! GPT-2 `add_prefix_space`, BOS/EOS only when the file's `add_bos_token`/`add_eos_token`
//! flags say so, and control/user-defined tokens matched in the text before anything else.
//!
//! Special tokens written in the text (`<|im_start|>`) are always parsed, because chat
//! prompts come out of the template as text. [`IncrementalDecoder`] turns a stream of
//! generated ids into UTF-8-safe text deltas.

mod gguf;
mod incremental;

use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file;

pub use incremental::IncrementalDecoder;

/// Why a tokenizer could not be built or could not encode/decode.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    /// A GGUF metadata key the tokenizer needs is absent.
    #[error("GGUF metadata has no `{key}`: the file carries no usable tokenizer")]
    MissingMetadata {
        /// The missing key, e.g. `tokenizer.ggml.tokens`.
        key: String,
    },
    /// A GGUF metadata value has the wrong type or an impossible value.
    #[error("GGUF metadata `{key}` is invalid: {reason}")]
    InvalidMetadata {
        /// The offending key.
        key: String,
        /// What is wrong with it.
        reason: String,
    },
    /// `tokenizer.ggml.model` names a vocabulary type we do not implement.
    #[error(
        "unsupported tokenizer model `{model}` in `tokenizer.ggml.model` (supported: gpt2, llama)"
    )]
    UnsupportedModel {
        /// The value of `tokenizer.ggml.model`.
        model: String,
    },
    /// `tokenizer.ggml.pre` names a pre-tokenizer we do not know.
    #[error("unsupported pre-tokenizer `{pre}` in `tokenizer.ggml.pre`")]
    UnsupportedPreTokenizer {
        /// The value of `tokenizer.ggml.pre`.
        pre: String,
    },
    /// A tokenizer or config file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// `tokenizer_config.json` is not the JSON we expect.
    #[error("invalid {path}: {reason}")]
    InvalidConfig {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A token id is not in the vocabulary.
    #[error("token id {id} is outside the vocabulary (size {vocab_size})")]
    TokenOutOfRange {
        /// The id given.
        id: u32,
        /// The vocabulary size, added tokens included.
        vocab_size: u32,
    },
    /// The `tokenizers` library failed (building, loading, encoding or decoding).
    #[error("tokenizer {op} failed: {source}")]
    Backend {
        /// What we were doing.
        op: &'static str,
        /// The library's error.
        #[source]
        source: tokenizers::Error,
    },
}

/// Result alias for this module.
pub type Result<T> = std::result::Result<T, TokenizerError>;

/// A special token: its id and its text in the vocabulary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecialToken {
    /// Token id.
    pub id: u32,
    /// Token text, e.g. `<|im_end|>`.
    pub text: String,
}

/// A tokenizer for one model. Cheap to share behind an `Arc`; `Send + Sync`.
#[derive(Debug, Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    bos: Option<SpecialToken>,
    eos: Option<SpecialToken>,
    /// End-of-generation ids, EOS first; never empty when `eos` is set.
    eog_ids: Vec<u32>,
    vocab_size: u32,
}

/// Token texts that end a turn in the chat formats we know of. llama.cpp keeps the same
/// list (`special_eog_ids`), because GGUF files rarely record an end-of-turn id.
const END_OF_TURN_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|eom_id|>",
    "<EOT>",
    "<|end_of_text|>",
    "<end_of_utterance>",
    "<｜end▁of▁sentence｜>",
];

impl Tokenizer {
    /// Builds the tokenizer from GGUF metadata (`tokenizer.ggml.*`).
    pub fn from_gguf(content: &gguf_file::Content) -> Result<Self> {
        let built = gguf::build(content)?;
        let mut eog_ids = Vec::new();
        if let Some(eos) = &built.eos {
            eog_ids.push(eos.id);
        }
        eog_ids.extend(built.eot_ids.iter().copied());
        Ok(Self::assemble(
            built.tokenizer,
            built.bos,
            built.eos,
            eog_ids,
        ))
    }

    /// Loads a Hugging Face `tokenizer.json`. `tokenizer_config.json`, when given, names the
    /// BOS and EOS tokens (`bos_token`, `eos_token`); BOS/EOS insertion itself follows the
    /// `post_processor` of `tokenizer.json`, as in `transformers`.
    pub fn from_file(tokenizer_json: &Path, tokenizer_config: Option<&Path>) -> Result<Self> {
        let bytes = std::fs::read(tokenizer_json).map_err(|source| TokenizerError::Io {
            path: tokenizer_json.to_path_buf(),
            source,
        })?;
        let inner = tokenizers::Tokenizer::from_bytes(&bytes).map_err(|source| {
            TokenizerError::Backend {
                op: "loading tokenizer.json",
                source,
            }
        })?;
        let (bos_text, eos_text) = match tokenizer_config {
            Some(path) => read_config_bos_eos(path)?,
            None => (None, None),
        };
        let lookup = |text: Option<String>| {
            text.and_then(|text| inner.token_to_id(&text).map(|id| SpecialToken { id, text }))
        };
        let bos = lookup(bos_text);
        let eos = lookup(eos_text);
        let mut eog_ids: Vec<u32> = eos.iter().map(|t| t.id).collect();
        for text in END_OF_TURN_TEXTS {
            if let Some(id) = inner.token_to_id(text) {
                eog_ids.push(id);
            }
        }
        Ok(Self::assemble(inner, bos, eos, eog_ids))
    }

    fn assemble(
        inner: tokenizers::Tokenizer,
        bos: Option<SpecialToken>,
        eos: Option<SpecialToken>,
        mut eog_ids: Vec<u32>,
    ) -> Self {
        // Keep the first occurrence of each id so EOS stays first.
        let mut seen = std::collections::HashSet::new();
        eog_ids.retain(|id| seen.insert(*id));
        let vocab_size = u32::try_from(inner.get_vocab_size(true)).unwrap_or(u32::MAX);
        Self {
            inner,
            bos,
            eos,
            eog_ids,
            vocab_size,
        }
    }

    /// Token ids of `text`. Special tokens written in the text are always parsed.
    /// `add_special_tokens` adds BOS/EOS as the model file says (none for SmolLM2).
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let encoding = self
            .inner
            .encode_fast(text, add_special_tokens)
            .map_err(|source| TokenizerError::Backend {
                op: "encode",
                source,
            })?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Text of `ids`. With `skip_special_tokens`, control tokens (`<|im_end|>`) are left out.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.check_ids(ids)?;
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|source| TokenizerError::Backend {
                op: "decode",
                source,
            })
    }

    fn check_ids(&self, ids: &[u32]) -> Result<()> {
        match ids.iter().find(|&&id| id >= self.vocab_size) {
            Some(&id) => Err(TokenizerError::TokenOutOfRange {
                id,
                vocab_size: self.vocab_size,
            }),
            None => Ok(()),
        }
    }

    /// Whether `id` is a special (control) token, the kind `decode(.., true)` leaves out.
    pub fn is_special(&self, id: u32) -> bool {
        self.inner
            .get_added_vocabulary()
            .simple_id_to_token(id)
            .is_some_and(|text| self.inner.get_added_vocabulary().is_special_token(&text))
    }

    /// The vocabulary piece of `id` as stored (byte-level pieces such as `Ġthe` as they are).
    pub fn id_to_piece(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// The id of a vocabulary piece, e.g. `<|im_end|>`.
    pub fn piece_to_id(&self, piece: &str) -> Option<u32> {
        self.inner.token_to_id(piece)
    }

    /// Ids that end generation: the EOS id first, then end-of-turn tokens found in the
    /// vocabulary (`<|im_end|>`, `<|eot_id|>`, `<end_of_turn>`, ...), as llama.cpp does.
    pub fn eos_token_ids(&self) -> Vec<u32> {
        self.eog_ids.clone()
    }

    /// The BOS token, when the model has one.
    pub fn bos_token(&self) -> Option<&SpecialToken> {
        self.bos.as_ref()
    }

    /// The EOS token, when the model has one.
    pub fn eos_token(&self) -> Option<&SpecialToken> {
        self.eos.as_ref()
    }

    /// Number of token ids, added tokens included; every valid id is below it.
    pub fn vocab_size(&self) -> u32 {
        self.vocab_size
    }

    /// The tokenizer as `tokenizer.json` text, e.g. to cache one built from GGUF.
    pub fn to_json(&self) -> Result<String> {
        self.inner
            .to_string(false)
            .map_err(|source| TokenizerError::Backend {
                op: "serializing tokenizer.json",
                source,
            })
    }
}

/// `bos_token` / `eos_token` of a `tokenizer_config.json`: a string, or an object with
/// `content` (the `AddedToken` form).
fn read_config_bos_eos(path: &Path) -> Result<(Option<String>, Option<String>)> {
    let text = std::fs::read_to_string(path).map_err(|source| TokenizerError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let json: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| TokenizerError::InvalidConfig {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
    Ok((
        config_token_text(&json, "bos_token"),
        config_token_text(&json, "eos_token"),
    ))
}

pub(crate) fn config_token_text(json: &serde_json::Value, key: &str) -> Option<String> {
    match json.get(key)? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o.get("content")?.as_str().map(str::to_owned),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokenizer_is_send_and_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Tokenizer>();
        assert_send_sync::<IncrementalDecoder>();
    }

    #[test]
    fn config_token_text_reads_both_forms() {
        let json = serde_json::json!({
            "bos_token": "<s>",
            "eos_token": {"content": "</s>", "lstrip": false},
            "pad_token": null,
        });
        assert_eq!(
            config_token_text(&json, "bos_token").as_deref(),
            Some("<s>")
        );
        assert_eq!(
            config_token_text(&json, "eos_token").as_deref(),
            Some("</s>")
        );
        assert_eq!(config_token_text(&json, "pad_token"), None);
        assert_eq!(config_token_text(&json, "unk_token"), None);
    }
}
