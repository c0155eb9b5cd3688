//! The tokenizer and chat template of the loaded model, as the handle exposes them: synchronous
//! and thread-safe (callers on an async runtime use `spawn_blocking`).
//!
//! They are built from the same files the model was loaded from: a GGUF file's metadata, or a
//! directory's `tokenizer.json` / `tokenizer_config.json`.

use std::path::Path;
use std::sync::Arc;

use candela_models::chat_template::{ChatTemplate, TemplateError, ToolFormat};
use candela_models::tokenizer::Tokenizer;
use candela_models::ModelFiles;
use candle_core::quantized::gguf_file;

use crate::api::{TokenId, ToolCalling};
use crate::error::EngineError;
use crate::ChatMessage;

/// Tokenizer and chat template of the loaded model.
#[derive(Debug)]
pub(crate) struct TextTools {
    pub(crate) tokenizer: Arc<Tokenizer>,
    chat_template: Option<ChatTemplate>,
}

impl TextTools {
    /// Builds both from the model's files; `template_override` replaces the model's template.
    pub(crate) fn load(
        files: &ModelFiles,
        template_override: Option<&str>,
    ) -> Result<Self, EngineError> {
        let mut tools = Self::load_from_files(files)?;
        if let Some(source) = template_override {
            let bos = tools.tokenizer.bos_token().map(|t| t.text.clone());
            let eos = tools.tokenizer.eos_token().map(|t| t.text.clone());
            let template = ChatTemplate::new(source, bos.as_deref(), eos.as_deref())
                .map_err(|e| EngineError::Load(format!("the given chat template: {e}")))?;
            tools.chat_template = Some(template);
        }
        Ok(tools)
    }

    fn load_from_files(files: &ModelFiles) -> Result<Self, EngineError> {
        let load_error =
            |what: &str, e: &dyn std::fmt::Display| EngineError::Load(format!("{what}: {e}"));
        match files {
            ModelFiles::Gguf { path } => {
                let mut file = std::fs::File::open(path)
                    .map_err(|e| load_error(&path.display().to_string(), &e))?;
                // Reads the header only (metadata and tensor infos), not the weights.
                let content = gguf_file::Content::read(&mut file)
                    .map_err(|e| load_error(&path.display().to_string(), &e))?;
                let tokenizer = Tokenizer::from_gguf(&content)
                    .map_err(|e| load_error("tokenizer from GGUF metadata", &e))?;
                let chat_template = ChatTemplate::from_gguf(&content)
                    .map_err(|e| load_error("chat template from GGUF metadata", &e))?;
                Ok(Self {
                    tokenizer: Arc::new(tokenizer),
                    chat_template,
                })
            }
            ModelFiles::Safetensors { dir } => {
                let config = dir.join("tokenizer_config.json");
                let config = config.is_file().then_some(config);
                let tokenizer =
                    Tokenizer::from_file(&dir.join("tokenizer.json"), config.as_deref())
                        .map_err(|e| load_error("tokenizer.json", &e))?;
                let chat_template = match config.as_deref() {
                    Some(path) => template_from_config(path)?,
                    None => None,
                };
                Ok(Self {
                    tokenizer: Arc::new(tokenizer),
                    chat_template,
                })
            }
        }
    }

    pub(crate) fn tokenize(
        &self,
        text: &str,
        add_special_tokens: bool,
    ) -> Result<Vec<TokenId>, EngineError> {
        self.tokenizer
            .encode(text, add_special_tokens)
            .map_err(|e| EngineError::Tokenizer(e.to_string()))
    }

    pub(crate) fn detokenize(&self, ids: &[TokenId]) -> Result<String, EngineError> {
        self.tokenizer
            .decode(ids, false)
            .map_err(|e| EngineError::Tokenizer(e.to_string()))
    }

    /// The bytes of each token on its own. Byte-level BPE pieces (`Ġthe`, `Ã©`) map back
    /// to bytes through the GPT-2 byte table; SentencePiece byte tokens (`<0xE2>`) to their
    /// byte; anything else is its decoded text.
    pub(crate) fn token_bytes(&self, ids: &[TokenId]) -> Result<Vec<Vec<u8>>, EngineError> {
        ids.iter()
            .map(|&id| {
                let text = self
                    .tokenizer
                    .decode(&[id], false)
                    .map_err(|e| EngineError::Tokenizer(e.to_string()))?;
                if !text.contains(char::REPLACEMENT_CHARACTER) {
                    return Ok(text.into_bytes());
                }
                // An incomplete UTF-8 piece: recover its raw bytes from the vocabulary piece.
                let piece = self.tokenizer.id_to_piece(id).unwrap_or_default();
                Ok(piece_bytes(&piece).unwrap_or_else(|| text.into_bytes()))
            })
            .collect()
    }

    pub(crate) fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        tools: Option<&ToolCalling>,
        add_generation_prompt: bool,
    ) -> Result<String, EngineError> {
        let template = self
            .chat_template
            .as_ref()
            .ok_or(EngineError::NoChatTemplate)?;
        let (messages, tools) =
            crate::tools::prompt::prompt_messages(template.tool_format(), messages, tools);
        template
            .render_with_tools(&messages, tools.as_ref(), add_generation_prompt)
            .map_err(|e| EngineError::Template(e.to_string()))
    }

    /// How the model writes tool calls: its template's format, or the generic one.
    pub(crate) fn tool_format(&self) -> ToolFormat {
        self.chat_template
            .as_ref()
            .map_or(ToolFormat::Generic, ChatTemplate::tool_format)
    }

    /// Ids that end generation (EOS, end-of-turn).
    pub(crate) fn eos_token_ids(&self) -> Vec<TokenId> {
        self.tokenizer.eos_token_ids()
    }
}

fn template_from_config(path: &Path) -> Result<Option<ChatTemplate>, EngineError> {
    ChatTemplate::from_tokenizer_config(path).map_err(|e: TemplateError| {
        EngineError::Load(format!("chat template in {}: {e}", path.display()))
    })
}

/// Raw bytes of a vocabulary piece: `<0xNN>` byte tokens, or GPT-2 byte-level pieces.
fn piece_bytes(piece: &str) -> Option<Vec<u8>> {
    if let Some(hex) = piece.strip_prefix("<0x").and_then(|p| p.strip_suffix('>')) {
        return u8::from_str_radix(hex, 16).ok().map(|b| vec![b]);
    }
    piece.chars().map(gpt2_char_to_byte).collect()
}

/// Inverse of GPT-2's `bytes_to_unicode`: printable Latin-1 bytes map to themselves, the
/// other 68 bytes to U+0100.. in order.
fn gpt2_char_to_byte(c: char) -> Option<u8> {
    let code = c as u32;
    let printable = |b: u32| {
        (0x21..=0x7E).contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b)
    };
    if code < 256 && printable(code) {
        return Some(code as u8);
    }
    let offset = code.checked_sub(256)?;
    (0u32..256)
        .filter(|&b| !printable(b))
        .nth(offset as usize)
        .map(|b| b as u8)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpt2_byte_pieces_map_back_to_bytes() {
        // 'Ġ' (U+0120) is the space byte; 'Ċ' (U+010A) is the newline.
        assert_eq!(piece_bytes("Ġthe"), Some(b" the".to_vec()));
        assert_eq!(piece_bytes("Ċ"), Some(b"\n".to_vec()));
        // "é" is C3 A9, written by byte-level BPE as 'Ã' (C3) and '©' (A9).
        assert_eq!(piece_bytes("Ã©"), Some(vec![0xC3, 0xA9]));
        assert_eq!(piece_bytes("<0xE2>"), Some(vec![0xE2]));
    }
}
