//! Rebuilds a Hugging Face `tokenizers` pipeline from GGUF `tokenizer.ggml.*` metadata.
//!
//! The pipeline mirrors llama.cpp's `llama-vocab.cpp`, whose output is our reference:
//!
//! * `gpt2` (byte-level BPE): the text is split by the regex list that `tokenizer.ggml.pre`
//!   selects, each regex isolating its matches and keeping the text between them (llama.cpp's
//!   `unicode_regex_split`), then mapped to byte-level characters (no prefix space) and merged
//!   by the rank of `tokenizer.ggml.merges`.
//! * `llama` (SentencePiece BPE): a `▁` is put before each run of text that starts the input
//!   or follows a special token (`add_space_prefix`), spaces become `▁`, and adjacent
//!   pieces merge by the score of the piece they form; characters outside the vocabulary fall
//!   back to `<0xXX>` byte tokens. GGUF stores scores, not merges, so the merge list is derived
//!   from the vocabulary: every split `l + r` of a piece with both halves in the vocabulary,
//!   ranked by the piece's score (the `transformers` LlamaConverter does the same).
//!
//! Control and unknown tokens (`token_type` 3 and 2) become special added tokens and
//! user-defined ones (4) plain added tokens, so both are matched in the raw text first.

use std::collections::HashMap;

use candle_core::quantized::gguf_file::{Content, Value};
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::byte_level::ByteLevel;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::decoders::DecoderWrapper;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::{
    NormalizerWrapper, Prepend, Replace, Sequence as NormalizerSequence,
};
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizerSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::processors::template::{SpecialToken as TemplateToken, TemplateProcessing};
use tokenizers::processors::PostProcessorWrapper;
use tokenizers::{AddedToken, SplitDelimiterBehavior};

use super::{Result, SpecialToken, TokenizerError, END_OF_TURN_TEXTS};

const KEY_MODEL: &str = "tokenizer.ggml.model";
const KEY_PRE: &str = "tokenizer.ggml.pre";
const KEY_TOKENS: &str = "tokenizer.ggml.tokens";
const KEY_TOKEN_TYPE: &str = "tokenizer.ggml.token_type";
const KEY_SCORES: &str = "tokenizer.ggml.scores";
const KEY_MERGES: &str = "tokenizer.ggml.merges";
const KEY_BOS_ID: &str = "tokenizer.ggml.bos_token_id";
const KEY_EOS_ID: &str = "tokenizer.ggml.eos_token_id";
const KEY_UNK_ID: &str = "tokenizer.ggml.unknown_token_id";
const KEY_EOT_ID: &str = "tokenizer.ggml.eot_token_id";
const KEY_EOM_ID: &str = "tokenizer.ggml.eom_token_id";
const KEY_ADD_BOS: &str = "tokenizer.ggml.add_bos_token";
const KEY_ADD_EOS: &str = "tokenizer.ggml.add_eos_token";
const KEY_ADD_SPACE_PREFIX: &str = "tokenizer.ggml.add_space_prefix";

/// What [`build`] hands back to [`super::Tokenizer`].
pub(super) struct Built {
    pub tokenizer: tokenizers::Tokenizer,
    pub bos: Option<SpecialToken>,
    pub eos: Option<SpecialToken>,
    /// End-of-turn / end-of-message ids other than EOS.
    pub eot_ids: Vec<u32>,
}

/// `llama_token_type` as GGUF stores it in `tokenizer.ggml.token_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TokenType {
    Normal,
    Unknown,
    Control,
    UserDefined,
    Unused,
    Byte,
    Undefined,
}

impl TokenType {
    fn from_raw(raw: i64) -> Self {
        match raw {
            1 => Self::Normal,
            2 => Self::Unknown,
            3 => Self::Control,
            4 => Self::UserDefined,
            5 => Self::Unused,
            6 => Self::Byte,
            _ => Self::Undefined,
        }
    }
}

/// Per-model defaults that llama.cpp applies before reading the optional keys.
struct Defaults {
    add_bos: bool,
    bos_id: Option<u32>,
    eos_id: Option<u32>,
    unk_id: Option<u32>,
}

/// Builds the tokenizer described by `content`'s `tokenizer.ggml.*` keys.
pub(super) fn build(content: &Content) -> Result<Built> {
    let model = string(content, KEY_MODEL)?.to_owned();
    let tokens = string_array(content, KEY_TOKENS)?;
    let n_tokens =
        u32::try_from(tokens.len()).map_err(|_| invalid(KEY_TOKENS, "too many tokens"))?;
    let types = token_types(content, tokens.len())?;
    let vocab = vocab_map(&tokens)?;

    let (mut tokenizer, defaults) = match model.as_str() {
        "gpt2" => build_bpe(content, &tokens, &vocab)?,
        "llama" => build_spm(content, &tokens, &types, &vocab)?,
        _ => return Err(TokenizerError::UnsupportedModel { model }),
    };

    let special_id = |key: &str, default: Option<u32>| -> Result<Option<u32>> {
        let id = match optional(content, key) {
            Some(value) => Some(value_u32(key, value)?),
            None => default,
        };
        match id {
            Some(id) if id >= n_tokens => Err(invalid(
                key,
                &format!("id {id} is outside the vocabulary of {n_tokens} tokens"),
            )),
            other => Ok(other),
        }
    };
    let bos_id = special_id(KEY_BOS_ID, defaults.bos_id)?;
    let eos_id = special_id(KEY_EOS_ID, defaults.eos_id)?;
    // Checked for range only: the SPM model reads its unknown piece itself.
    special_id(KEY_UNK_ID, defaults.unk_id)?;
    let eot_id = special_id(KEY_EOT_ID, None)?;
    let eom_id = special_id(KEY_EOM_ID, None)?;
    let add_bos = optional_bool(content, KEY_ADD_BOS)?.unwrap_or(defaults.add_bos);
    let add_eos = optional_bool(content, KEY_ADD_EOS)?.unwrap_or(false);

    let token = |id: Option<u32>| {
        id.map(|id| SpecialToken {
            id,
            text: tokens[id as usize].clone(),
        })
    };
    let bos = token(bos_id);
    let eos = token(eos_id);
    if add_bos && bos.is_none() {
        return Err(invalid(
            KEY_ADD_BOS,
            &format!("is true but `{KEY_BOS_ID}` is not set"),
        ));
    }
    if add_eos && eos.is_none() {
        return Err(invalid(
            KEY_ADD_EOS,
            &format!("is true but `{KEY_EOS_ID}` is not set"),
        ));
    }

    let mut specials = Vec::new();
    let mut user_defined = Vec::new();
    for (piece, ty) in tokens.iter().zip(&types) {
        match ty {
            TokenType::Control | TokenType::Unknown => {
                specials.push(AddedToken::from(piece.clone(), true).normalized(false))
            }
            TokenType::UserDefined => {
                user_defined.push(AddedToken::from(piece.clone(), false).normalized(false))
            }
            _ => {}
        }
    }
    tokenizer.add_special_tokens(&specials);
    tokenizer.add_tokens(&user_defined);

    if add_bos || add_eos {
        let processor = template_processor(
            bos.as_ref().filter(|_| add_bos),
            eos.as_ref().filter(|_| add_eos),
        )?;
        tokenizer.with_post_processor(Some(PostProcessorWrapper::Template(processor)));
    }

    let mut eot_ids: Vec<u32> = [eot_id, eom_id].into_iter().flatten().collect();
    for text in END_OF_TURN_TEXTS {
        if let Some(&id) = vocab.get(*text) {
            eot_ids.push(id);
        }
    }

    Ok(Built {
        tokenizer,
        bos,
        eos,
        eot_ids,
    })
}

/// The regex list llama.cpp applies for a `tokenizer.ggml.pre` value, plus the flags that
/// value implies there.
struct PreSpec {
    regexes: &'static [&'static str],
    add_bos: bool,
    ignore_merges: bool,
}

const RE_GPT2: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";
const RE_LLAMA3: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const RE_QWEN2: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const RE_QWEN35: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const RE_GPT4O: &str = r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const RE_TEKKEN: &str = r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+|[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// llama.cpp's pre-tokenizer table (`llm_tokenizer_bpe`), for the names we support.
fn pre_spec(pre: &str) -> Option<PreSpec> {
    let spec = |regexes, add_bos, ignore_merges| {
        Some(PreSpec {
            regexes,
            add_bos,
            ignore_merges,
        })
    };
    match pre {
        "default" => spec(
            &[
                r"[\p{P}\$\+<=>\^~\|]+",
                RE_GPT2,
                r"\p{N}+",
                r"[0-9][0-9][0-9]",
            ],
            false,
            false,
        ),
        "gpt-2" | "phi-2" | "jina-es" | "jina-de" | "gigachat" | "jina-v2-es" | "jina-v2-de"
        | "a.x-4.0" | "mellum" | "modern-bert" | "mpt" | "olmo" | "jais" | "trillion"
        | "granite-docling" | "exaone4" | "jina-v1-en" | "jina-v2-code" | "roberta-bpe" => {
            spec(&[RE_GPT2], false, false)
        }
        // Digits one by one, then the GPT-2 regex (SmolLM's Digits + ByteLevel pipeline).
        "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone" | "minerva-7b"
        | "mellum2" => spec(&[r"\p{N}", RE_GPT2], false, false),
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral" | "midm-2.0"
        | "lfm2" | "jina-v5-nano" => spec(&[RE_LLAMA3], true, true),
        "dbrx" | "smaug-bpe" | "glm4" | "chatglm-bpe" => spec(&[RE_LLAMA3], false, false),
        "qwen2" | "deepseek-r1-qwen" | "kormo" | "f2llmv2" | "megrez" | "stablelm2" => {
            spec(&[RE_QWEN2], false, false)
        }
        "qwen35" => spec(&[RE_QWEN35], false, false),
        "falcon" => spec(
            &[r"[\p{P}\$\+<=>\^~\|`]+", RE_GPT2, r"[0-9][0-9][0-9]"],
            false,
            false,
        ),
        "deepseek-coder" => spec(
            &[
                r"[\r\n]",
                r"\s?\p{L}+",
                r"\s?\p{P}+",
                r"[一-龥ࠀ-一가-퟿]+",
                r"\p{N}",
            ],
            false,
            false,
        ),
        "gpt-4o" | "llama4" | "kanana2" | "talkie" => spec(&[RE_GPT4O], false, false),
        "tekken" => spec(&[RE_TEKKEN], true, true),
        _ => None,
    }
}

fn build_bpe(
    content: &Content,
    tokens: &[String],
    vocab: &HashMap<&str, u32>,
) -> Result<(tokenizers::Tokenizer, Defaults)> {
    // llama.cpp warns and uses its "default" regexes when the key is absent.
    let pre = optional(content, KEY_PRE)
        .map(|v| value_string(KEY_PRE, v).map(str::to_owned))
        .transpose()?
        .unwrap_or_else(|| "default".to_owned());
    let spec = pre_spec(&pre).ok_or(TokenizerError::UnsupportedPreTokenizer { pre })?;

    let merges: Vec<(String, String)> = string_array(content, KEY_MERGES)?
        .into_iter()
        .filter_map(|merge| {
            // llama.cpp splits at the first space after the first byte, so a merge may start
            // with a space.
            let pos = merge.char_indices().skip(1).find(|&(_, c)| c == ' ')?.0;
            let (left, right) = (&merge[..pos], &merge[pos + 1..]);
            // The `tokenizers` BPE refuses merges whose pieces are unknown; llama.cpp could
            // never emit them as tokens either.
            let known = vocab.contains_key(left)
                && vocab.contains_key(right)
                && vocab.contains_key(format!("{left}{right}").as_str());
            known.then(|| (left.to_owned(), right.to_owned()))
        })
        .collect();

    let model = BPE::builder()
        .vocab_and_merges(hf_vocab(tokens), merges)
        .ignore_merges(spec.ignore_merges)
        .build()
        .map_err(|source| TokenizerError::Backend {
            op: "building the BPE model",
            source,
        })?;
    let mut tokenizer = tokenizers::Tokenizer::new(model);

    let mut steps: Vec<PreTokenizerWrapper> = Vec::with_capacity(spec.regexes.len() + 1);
    for regex in spec.regexes {
        let split = Split::new(
            SplitPattern::Regex((*regex).to_owned()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map_err(|source| TokenizerError::Backend {
            op: "compiling a pre-tokenizer regex",
            source,
        })?;
        steps.push(split.into());
    }
    // The regexes already split words; byte-level only maps bytes to printable characters.
    steps.push(ByteLevel::new(false, true, false).into());
    tokenizer.with_pre_tokenizer(Some(PreTokenizerSequence::new(steps)));
    tokenizer.with_decoder(Some(ByteLevel::default()));

    Ok((
        tokenizer,
        Defaults {
            add_bos: spec.add_bos,
            bos_id: None,
            eos_id: None,
            unk_id: None,
        },
    ))
}

fn build_spm(
    content: &Content,
    tokens: &[String],
    types: &[TokenType],
    vocab: &HashMap<&str, u32>,
) -> Result<(tokenizers::Tokenizer, Defaults)> {
    let scores = match optional(content, KEY_SCORES) {
        Some(value) => {
            let scores = value_array(KEY_SCORES, value)?
                .iter()
                .map(|v| value_f32(KEY_SCORES, v))
                .collect::<Result<Vec<_>>>()?;
            if scores.len() < tokens.len() {
                return Err(invalid(
                    KEY_SCORES,
                    &format!("{} scores for {} tokens", scores.len(), tokens.len()),
                ));
            }
            scores
        }
        None => vec![0.0; tokens.len()],
    };

    // Merge candidates: every split of a piece into two pieces of the vocabulary. Byte tokens
    // (`<0x41>`) only come from byte fallback, never from merging their spelling.
    let mergeable = |id: u32| types[id as usize] != TokenType::Byte;
    let mut candidates: Vec<(f32, u32, usize)> = Vec::new();
    for (id, piece) in tokens.iter().enumerate() {
        let id = id as u32;
        if !mergeable(id) {
            continue;
        }
        for (pos, _) in piece.char_indices().skip(1) {
            let (left, right) = piece.split_at(pos);
            let known = |p: &str| vocab.get(p).is_some_and(|&i| mergeable(i));
            if known(left) && known(right) {
                candidates.push((scores[id as usize], id, pos));
            }
        }
    }
    // Highest score first, as llama.cpp's bigram queue pops them.
    candidates.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
    let merges: Vec<(String, String)> = candidates
        .into_iter()
        .map(|(_, id, pos)| {
            let (left, right) = tokens[id as usize].split_at(pos);
            (left.to_owned(), right.to_owned())
        })
        .collect();

    let has_byte_tokens = (0u8..=255).all(|b| vocab.contains_key(format!("<0x{b:02X}>").as_str()));
    let unk_id = optional(content, KEY_UNK_ID)
        .map(|v| value_u32(KEY_UNK_ID, v))
        .transpose()?
        .or(Some(0))
        .filter(|&id| (id as usize) < tokens.len());
    let mut builder = BPE::builder()
        .vocab_and_merges(hf_vocab(tokens), merges)
        .byte_fallback(has_byte_tokens)
        .fuse_unk(true);
    if let Some(id) = unk_id {
        builder = builder.unk_token(tokens[id as usize].clone());
    }
    let model = builder.build().map_err(|source| TokenizerError::Backend {
        op: "building the SentencePiece BPE model",
        source,
    })?;
    let mut tokenizer = tokenizers::Tokenizer::new(model);

    let add_space_prefix = optional_bool(content, KEY_ADD_SPACE_PREFIX)?.unwrap_or(true);
    let replace = |from: &str, to: &str| {
        Replace::new(from, to).map_err(|source| TokenizerError::Backend {
            op: "building the whitespace escape",
            source,
        })
    };
    let mut normalizers: Vec<NormalizerWrapper> = Vec::new();
    if add_space_prefix {
        normalizers.push(Prepend::new("▁".to_owned()).into());
    }
    normalizers.push(replace(" ", "▁")?.into());
    tokenizer.with_normalizer(Some(NormalizerSequence::new(normalizers)));

    let mut decoders: Vec<DecoderWrapper> = vec![
        replace("▁", " ")?.into(),
        ByteFallback::new().into(),
        Fuse::new().into(),
    ];
    if add_space_prefix {
        decoders.push(Strip::new(' ', 1, 0).into());
    }
    tokenizer.with_decoder(Some(DecoderSequence::new(decoders)));

    Ok((
        tokenizer,
        Defaults {
            add_bos: true,
            bos_id: Some(1).filter(|&id| id < tokens.len() as u32),
            eos_id: Some(2).filter(|&id| id < tokens.len() as u32),
            unk_id,
        },
    ))
}

/// `BOS $A EOS` (each part only when added), and the same around both sequences of a pair.
fn template_processor(
    bos: Option<&SpecialToken>,
    eos: Option<&SpecialToken>,
) -> Result<TemplateProcessing> {
    // Template pieces name special tokens by a key; the key need not be the token's text,
    // and a fixed key cannot be misread as a `$A`/`:1` template marker.
    let mut single = Vec::new();
    let mut pair = Vec::new();
    let mut special_tokens = Vec::new();
    if let Some(bos) = bos {
        single.push("BOS".to_owned());
        pair.push("BOS".to_owned());
        special_tokens.push(template_token("BOS", bos)?);
    }
    single.push("$A".to_owned());
    pair.push("$A".to_owned());
    if let Some(eos) = eos {
        single.push("EOS".to_owned());
        pair.push("EOS".to_owned());
        special_tokens.push(template_token("EOS", eos)?);
    }
    if bos.is_some() {
        pair.push("BOS:1".to_owned());
    }
    pair.push("$B:1".to_owned());
    if eos.is_some() {
        pair.push("EOS:1".to_owned());
    }
    let backend = |reason: String| TokenizerError::Backend {
        op: "building the BOS/EOS template",
        source: reason.into(),
    };
    TemplateProcessing::builder()
        .try_single(single)
        .map_err(backend)?
        .try_pair(pair)
        .map_err(backend)?
        .special_tokens(special_tokens)
        .build()
        .map_err(|e| backend(e.to_string()))
}

fn template_token(key: &str, token: &SpecialToken) -> Result<TemplateToken> {
    TemplateToken::new(key.to_owned(), vec![token.id], vec![token.text.clone()]).map_err(|source| {
        TokenizerError::Backend {
            op: "building the BOS/EOS template",
            source,
        }
    })
}

fn hf_vocab(tokens: &[String]) -> Vocab {
    tokens
        .iter()
        .enumerate()
        .map(|(id, piece)| (piece.clone(), id as u32))
        .collect()
}

/// Piece -> id; llama.cpp refuses a vocabulary with a duplicate piece, and so do we.
fn vocab_map(tokens: &[String]) -> Result<HashMap<&str, u32>> {
    let mut vocab = HashMap::with_capacity(tokens.len());
    for (id, piece) in tokens.iter().enumerate() {
        if let Some(first) = vocab.insert(piece.as_str(), id as u32) {
            return Err(invalid(
                KEY_TOKENS,
                &format!("duplicate token {piece:?} at ids {first} and {id}"),
            ));
        }
    }
    Ok(vocab)
}

fn token_types(content: &Content, n_tokens: usize) -> Result<Vec<TokenType>> {
    let Some(value) = optional(content, KEY_TOKEN_TYPE) else {
        return Ok(vec![TokenType::Normal; n_tokens]);
    };
    let raw = value_array(KEY_TOKEN_TYPE, value)?;
    if raw.len() < n_tokens {
        return Err(invalid(
            KEY_TOKEN_TYPE,
            &format!("{} types for {n_tokens} tokens", raw.len()),
        ));
    }
    let mut types = raw[..n_tokens]
        .iter()
        .map(|v| value_i64(KEY_TOKEN_TYPE, v).map(TokenType::from_raw))
        .collect::<Result<Vec<_>>>()?;
    // Unused slots are ordinary pieces to the tokenizer.
    for ty in &mut types {
        if matches!(ty, TokenType::Unused | TokenType::Undefined) {
            *ty = TokenType::Normal;
        }
    }
    Ok(types)
}

fn invalid(key: &str, reason: &str) -> TokenizerError {
    TokenizerError::InvalidMetadata {
        key: key.to_owned(),
        reason: reason.to_owned(),
    }
}

fn optional<'a>(content: &'a Content, key: &str) -> Option<&'a Value> {
    content.metadata.get(key)
}

fn required<'a>(content: &'a Content, key: &str) -> Result<&'a Value> {
    optional(content, key).ok_or_else(|| TokenizerError::MissingMetadata {
        key: key.to_owned(),
    })
}

fn string<'a>(content: &'a Content, key: &str) -> Result<&'a str> {
    value_string(key, required(content, key)?)
}

fn string_array(content: &Content, key: &str) -> Result<Vec<String>> {
    value_array(key, required(content, key)?)?
        .iter()
        .map(|v| value_string(key, v).map(str::to_owned))
        .collect()
}

fn optional_bool(content: &Content, key: &str) -> Result<Option<bool>> {
    match optional(content, key) {
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(other) => Err(invalid(key, &format!("expected a bool, got {other:?}"))),
        None => Ok(None),
    }
}

fn value_string<'a>(key: &str, value: &'a Value) -> Result<&'a str> {
    match value {
        Value::String(s) => Ok(s),
        other => Err(invalid(
            key,
            &format!("expected a string, got {:?}", other.value_type()),
        )),
    }
}

fn value_array<'a>(key: &str, value: &'a Value) -> Result<&'a [Value]> {
    match value {
        Value::Array(items) => Ok(items),
        other => Err(invalid(
            key,
            &format!("expected an array, got {:?}", other.value_type()),
        )),
    }
}

fn value_i64(key: &str, value: &Value) -> Result<i64> {
    Ok(match value {
        Value::U8(v) => i64::from(*v),
        Value::I8(v) => i64::from(*v),
        Value::U16(v) => i64::from(*v),
        Value::I16(v) => i64::from(*v),
        Value::U32(v) => i64::from(*v),
        Value::I32(v) => i64::from(*v),
        Value::I64(v) => *v,
        Value::U64(v) => i64::try_from(*v).map_err(|_| invalid(key, "integer out of range"))?,
        other => {
            return Err(invalid(
                key,
                &format!("expected an integer, got {:?}", other.value_type()),
            ))
        }
    })
}

fn value_u32(key: &str, value: &Value) -> Result<u32> {
    let v = value_i64(key, value)?;
    u32::try_from(v).map_err(|_| invalid(key, &format!("{v} is not a valid token id")))
}

fn value_f32(key: &str, value: &Value) -> Result<f32> {
    match value {
        Value::F32(v) => Ok(*v),
        Value::F64(v) => Ok(*v as f32),
        other => value_i64(key, other).map(|v| v as f32),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokenizers::tokenizer::{OffsetReferential, OffsetType, PreTokenizedString, PreTokenizer};

    fn splits(pre: &str, input: &str) -> Vec<String> {
        let Some(spec) = pre_spec(pre) else {
            panic!("no spec for {pre}")
        };
        let mut pre_tokenized = PreTokenizedString::from(input);
        for regex in spec.regexes {
            let split = Split::new(
                SplitPattern::Regex((*regex).to_owned()),
                SplitDelimiterBehavior::Isolated,
                false,
            )
            .unwrap();
            split.pre_tokenize(&mut pre_tokenized).unwrap();
        }
        pre_tokenized
            .get_splits(OffsetReferential::Original, OffsetType::Byte)
            .into_iter()
            .map(|(s, _, _)| s.to_owned())
            .collect()
    }

    #[test]
    fn smollm_splits_digits_and_keeps_spaces_attached() {
        assert_eq!(
            splits("smollm", "What is 12 + 35?\n\n  x"),
            ["What", " is", " ", "1", "2", " +", " ", "3", "5", "?", "\n\n ", " x"]
        );
    }

    #[test]
    fn llama3_groups_digits_by_three() {
        assert_eq!(
            splits("llama3", "Hello'Ve world 12345"),
            ["Hello", "'Ve", " world", " ", "123", "45"]
        );
    }

    #[test]
    fn every_regex_in_the_table_compiles() {
        let names = [
            "default",
            "gpt-2",
            "smollm",
            "llama3",
            "dbrx",
            "qwen2",
            "qwen35",
            "falcon",
            "deepseek-coder",
            "gpt-4o",
            "tekken",
        ];
        for name in names {
            let _ = splits(name, "It's 2024: naïve ÆBC déjà-vu\t\r\n 你好 мир");
        }
        assert!(pre_spec("no-such-pre").is_none());
    }
}
