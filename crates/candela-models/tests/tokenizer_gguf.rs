//! Tokenizers built from GGUF-style metadata made here: a llama-style SentencePiece
//! vocabulary checked against SentencePiece itself, and the errors for metadata that cannot
//! make a tokenizer.
//!
//! `tokenizer_fixtures/spm_tiny.json` holds a tiny SentencePiece BPE model (pieces, scores,
//! token types; identity normalization, dummy prefix, byte fallback, one user-defined
//! piece `<tool>`) and, for a few texts, the ids llama.cpp's SPM tokenizer produces: the
//! SentencePiece ids of each run of text between special pieces, each run with its own dummy
//! prefix (llama.cpp's `add_space_prefix` after a special token). Where a text has no special
//! piece those are SentencePiece's own ids. `make_spm_tiny.py` regenerates it.

use std::collections::HashMap;
use std::sync::Arc;

use candela_models::tokenizer::{IncrementalDecoder, Tokenizer, TokenizerError};
use candle_core::quantized::gguf_file::{Content, Value, VersionedMagic};

fn content(metadata: Vec<(&str, Value)>) -> Content {
    Content {
        magic: VersionedMagic::GgufV3,
        metadata: metadata
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect::<HashMap<_, _>>(),
        tensor_infos: HashMap::new(),
        tensor_data_offset: 0,
    }
}

fn strings(items: &[&str]) -> Value {
    Value::Array(
        items
            .iter()
            .map(|s| Value::String((*s).to_owned()))
            .collect(),
    )
}

struct Case {
    text: String,
    ids: Vec<u32>,
    sentencepiece_ids: Vec<u32>,
}

fn spm_fixture() -> (Content, Vec<Case>) {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/tokenizer_fixtures/spm_tiny.json"
    );
    let text = std::fs::read_to_string(path).expect("fixture");
    let json: serde_json::Value = serde_json::from_str(&text).expect("fixture JSON");
    let array = |key: &str| json[key].as_array().expect("array").clone();
    let tokens = array("tokens")
        .iter()
        .map(|t| Value::String(t.as_str().expect("piece").to_owned()))
        .collect();
    let scores = array("scores")
        .iter()
        .map(|s| Value::F32(s.as_f64().expect("score") as f32))
        .collect();
    let types = array("token_types")
        .iter()
        .map(|t| Value::I32(t.as_i64().expect("type") as i32))
        .collect();
    let ids = |v: &serde_json::Value| -> Vec<u32> {
        v.as_array()
            .expect("ids")
            .iter()
            .map(|x| x.as_u64().expect("id") as u32)
            .collect()
    };
    let cases = array("cases")
        .iter()
        .map(|c| Case {
            text: c["text"].as_str().expect("text").to_owned(),
            ids: ids(&c["ids"]),
            sentencepiece_ids: ids(&c["sentencepiece_ids"]),
        })
        .collect();
    let content = content(vec![
        ("tokenizer.ggml.model", Value::String("llama".to_owned())),
        ("tokenizer.ggml.tokens", Value::Array(tokens)),
        ("tokenizer.ggml.scores", Value::Array(scores)),
        ("tokenizer.ggml.token_type", Value::Array(types)),
        ("tokenizer.ggml.bos_token_id", Value::U32(1)),
        ("tokenizer.ggml.eos_token_id", Value::U32(2)),
        ("tokenizer.ggml.unknown_token_id", Value::U32(0)),
    ]);
    (content, cases)
}

#[test]
fn spm_vocabulary_encodes_like_llama_cpp() {
    let (content, cases) = spm_fixture();
    let tokenizer = Tokenizer::from_gguf(&content).expect("SPM tokenizer");
    assert!(cases.len() >= 8);
    for case in &cases {
        let ids = tokenizer.encode(&case.text, false).expect("encode");
        assert_eq!(ids, case.ids, "{:?}", case.text);
        // A llama vocabulary adds BOS by default (no add_bos_token key here).
        let with_bos = tokenizer.encode(&case.text, true).expect("encode");
        assert_eq!(with_bos[0], 1, "{:?}", case.text);
        assert_eq!(&with_bos[1..], case.ids.as_slice(), "{:?}", case.text);
    }
    // The fixture exercises byte fallback (`<0xE4>`... ids 4..=259) and a special-token run.
    assert!(cases
        .iter()
        .any(|c| c.ids.iter().any(|&id| (4..260).contains(&id))));
    assert!(cases.iter().any(|c| c.ids != c.sentencepiece_ids));
}

#[test]
fn spm_vocabulary_decodes_like_sentencepiece() {
    let (content, cases) = spm_fixture();
    let tokenizer = Arc::new(Tokenizer::from_gguf(&content).expect("SPM tokenizer"));
    for case in cases.iter().filter(|c| c.ids == c.sentencepiece_ids) {
        let text = tokenizer.decode(&case.ids, true).expect("decode");
        assert_eq!(text, case.text);

        // Streaming after a prompt: the first piece's `▁` must come out as a space, and the
        // byte-fallback pieces of one character must come out together.
        let prompt = tokenizer.encode("Hello", true).expect("encode");
        let mut decoder = IncrementalDecoder::new(Arc::clone(&tokenizer), &prompt, true);
        let mut streamed = String::new();
        for &id in &case.ids {
            let delta = decoder.push(id).expect("push");
            assert!(!delta.contains('\u{FFFD}'), "{:?}", case.text);
            streamed.push_str(&delta);
        }
        streamed.push_str(&decoder.flush().expect("flush"));
        let expected = tokenizer
            .decode(&[prompt.as_slice(), case.ids.as_slice()].concat(), true)
            .expect("decode");
        assert_eq!(format!("Hello{streamed}"), expected, "{:?}", case.text);
    }
}

#[test]
fn spm_special_tokens_in_text_are_parsed() {
    let (content, _) = spm_fixture();
    let tokenizer = Tokenizer::from_gguf(&content).expect("SPM tokenizer");
    assert_eq!(tokenizer.bos_token().map(|t| t.text.as_str()), Some("<s>"));
    assert_eq!(tokenizer.eos_token().map(|t| t.text.as_str()), Some("</s>"));
    assert_eq!(tokenizer.eos_token_ids(), [2]);
    assert_eq!(tokenizer.encode("<s>", false).expect("encode"), [1]);
    assert!(tokenizer.is_special(1));
    // User-defined pieces are matched in text but are not control tokens.
    assert!(!tokenizer.is_special(3));
    assert_eq!(
        tokenizer.decode(&[1, 315, 3, 2], true).expect("decode"),
        "Hello<tool>"
    );
}

#[test]
fn spm_add_space_prefix_false_is_honoured() {
    let (mut content, _) = spm_fixture();
    content.metadata.insert(
        "tokenizer.ggml.add_space_prefix".to_owned(),
        Value::Bool(false),
    );
    let tokenizer = Tokenizer::from_gguf(&content).expect("SPM tokenizer");
    let with_prefix = Tokenizer::from_gguf(&spm_fixture().0).expect("SPM tokenizer");
    let a = tokenizer.encode("Hello", false).expect("encode");
    let b = with_prefix.encode(" Hello", false).expect("encode");
    // Without the automatic prefix, " Hello" spelled out is what "Hello" was with it.
    assert_eq!(
        tokenizer.encode(" Hello", false).expect("encode"),
        with_prefix.encode("Hello", false).expect("encode")
    );
    assert_ne!(a, b);
    assert_eq!(tokenizer.decode(&a, true).expect("decode"), "Hello");
}

#[test]
fn gguf_without_tokenizer_metadata_names_the_missing_key() {
    let err = Tokenizer::from_gguf(&content(vec![(
        "general.architecture",
        Value::String("llama".to_owned()),
    )]))
    .expect_err("no tokenizer");
    match &err {
        TokenizerError::MissingMetadata { key } => assert_eq!(key, "tokenizer.ggml.model"),
        other => panic!("expected MissingMetadata, got {other:?}"),
    }
    assert!(err.to_string().contains("tokenizer.ggml.model"));

    let err = Tokenizer::from_gguf(&content(vec![(
        "tokenizer.ggml.model",
        Value::String("gpt2".to_owned()),
    )]))
    .expect_err("no tokens");
    assert!(
        matches!(&err, TokenizerError::MissingMetadata { key } if key == "tokenizer.ggml.tokens"),
        "{err:?}"
    );

    let err = Tokenizer::from_gguf(&content(vec![
        ("tokenizer.ggml.model", Value::String("gpt2".to_owned())),
        ("tokenizer.ggml.pre", Value::String("gpt-2".to_owned())),
        ("tokenizer.ggml.tokens", strings(&["a", "b", "ab"])),
    ]))
    .expect_err("no merges");
    assert!(
        matches!(&err, TokenizerError::MissingMetadata { key } if key == "tokenizer.ggml.merges"),
        "{err:?}"
    );
}

#[test]
fn unknown_tokenizer_model_is_an_error_naming_it() {
    let err = Tokenizer::from_gguf(&content(vec![
        ("tokenizer.ggml.model", Value::String("rwkv".to_owned())),
        ("tokenizer.ggml.tokens", strings(&["a"])),
    ]))
    .expect_err("unsupported model");
    assert!(
        matches!(&err, TokenizerError::UnsupportedModel { model } if model == "rwkv"),
        "{err:?}"
    );
    assert!(err.to_string().contains("rwkv"));
}

#[test]
fn unknown_pre_tokenizer_is_an_error_naming_it() {
    let err = Tokenizer::from_gguf(&content(vec![
        ("tokenizer.ggml.model", Value::String("gpt2".to_owned())),
        ("tokenizer.ggml.pre", Value::String("martian".to_owned())),
        ("tokenizer.ggml.tokens", strings(&["a", "b", "ab"])),
        ("tokenizer.ggml.merges", strings(&["a b"])),
    ]))
    .expect_err("unsupported pre-tokenizer");
    assert!(
        matches!(&err, TokenizerError::UnsupportedPreTokenizer { pre } if pre == "martian"),
        "{err:?}"
    );
}

#[test]
fn bad_metadata_values_are_errors() {
    let base = || {
        vec![
            ("tokenizer.ggml.model", Value::String("gpt2".to_owned())),
            ("tokenizer.ggml.pre", Value::String("gpt-2".to_owned())),
            ("tokenizer.ggml.merges", strings(&["a b"])),
        ]
    };
    let mut duplicate = base();
    duplicate.push(("tokenizer.ggml.tokens", strings(&["a", "b", "a"])));
    assert!(matches!(
        Tokenizer::from_gguf(&content(duplicate)),
        Err(TokenizerError::InvalidMetadata { .. })
    ));

    let mut out_of_range = base();
    out_of_range.push(("tokenizer.ggml.tokens", strings(&["a", "b", "ab"])));
    out_of_range.push(("tokenizer.ggml.eos_token_id", Value::U32(3)));
    let err = Tokenizer::from_gguf(&content(out_of_range)).expect_err("eos id 3 of 3 tokens");
    assert!(
        matches!(&err, TokenizerError::InvalidMetadata { key, .. } if key == "tokenizer.ggml.eos_token_id"),
        "{err:?}"
    );

    let mut bos_missing = base();
    bos_missing.push(("tokenizer.ggml.tokens", strings(&["a", "b", "ab"])));
    bos_missing.push(("tokenizer.ggml.add_bos_token", Value::Bool(true)));
    assert!(matches!(
        Tokenizer::from_gguf(&content(bos_missing)),
        Err(TokenizerError::InvalidMetadata { .. })
    ));
}

#[test]
fn tiny_gpt2_vocabulary_merges_by_rank() {
    // Byte-level pieces: "Ġ" is the space byte.
    let tokens = ["<|end|>", "a", "b", "c", "Ġ", "ab", "bc", "Ġa", "Ġab"];
    let tokenizer = Tokenizer::from_gguf(&content(vec![
        ("tokenizer.ggml.model", Value::String("gpt2".to_owned())),
        ("tokenizer.ggml.pre", Value::String("gpt-2".to_owned())),
        ("tokenizer.ggml.tokens", strings(&tokens)),
        (
            "tokenizer.ggml.token_type",
            Value::Array([3, 1, 1, 1, 1, 1, 1, 1, 1].map(Value::I32).to_vec()),
        ),
        (
            "tokenizer.ggml.merges",
            strings(&["b c", "Ġ a", "a b", "Ġa b"]),
        ),
        ("tokenizer.ggml.eos_token_id", Value::U32(0)),
    ]))
    .expect("tokenizer");
    // "abc": "b c" outranks "a b"; in " ab", "Ġ a" outranks "a b", so it merges up to "Ġab";
    // `<|end|>` is parsed.
    assert_eq!(
        tokenizer.encode("abc ab<|end|>", false).expect("encode"),
        [1, 6, 8, 0]
    );
    assert_eq!(
        tokenizer.decode(&[1, 6, 8, 0], false).expect("decode"),
        "abc ab<|end|>"
    );
    assert_eq!(tokenizer.eos_token_ids(), [0]);
}

#[test]
fn incremental_decoder_does_not_hold_invalid_bytes_forever() {
    let (content, _) = spm_fixture();
    let tokenizer = Arc::new(Tokenizer::from_gguf(&content).expect("SPM tokenizer"));
    let continuation_byte = tokenizer.piece_to_id("<0x80>").expect("byte piece");
    let mut decoder = IncrementalDecoder::new(Arc::clone(&tokenizer), &[], true);
    let mut text = String::new();
    let mut pushes_before_output = None;
    for i in 0..20 {
        let delta = decoder.push(continuation_byte).expect("push");
        if !delta.is_empty() && pushes_before_output.is_none() {
            pushes_before_output = Some(i + 1);
        }
        text.push_str(&delta);
    }
    text.push_str(&decoder.flush().expect("flush"));
    // A lone continuation byte never completes a character: after a bounded wait the
    // replacement characters come out, and nothing is lost.
    assert!(
        pushes_before_output.is_some_and(|n| n <= 8),
        "{pushes_before_output:?}"
    );
    assert_eq!(text, "\u{FFFD}".repeat(20));
    assert_eq!(decoder.flush().expect("flush"), "");
}
