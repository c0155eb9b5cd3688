//! The tokenizer and chat template built from the default model's GGUF against llama.cpp's
//! records (`testdata/reference/smollm2-greedy.jsonl`, see its README): every record's prompt
//! ids, every chat record's rendered prompt, and every record's output text, decoded at once
//! and incrementally.

use std::path::PathBuf;
use std::sync::Arc;

use candela_models::chat_template::{ChatMessage, ChatTemplate};
use candela_models::tokenizer::{IncrementalDecoder, Tokenizer};
use candle_core::quantized::gguf_file;
use serde_json::Value;

const RECORDS_COUNT: usize = 42;

fn workspace_path(relative: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(relative)
}

fn model_path() -> PathBuf {
    workspace_path("models/SmolLM2-135M-Instruct.Q4_1.gguf")
}

fn reference_path() -> PathBuf {
    workspace_path("testdata/reference/smollm2-greedy.jsonl")
}

fn read_gguf() -> gguf_file::Content {
    let path = model_path();
    let mut file = std::fs::File::open(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (run scripts/fetch-default-model)", path.display()));
    gguf_file::Content::read(&mut file).expect("GGUF header")
}

struct Record {
    id: String,
    mode: String,
    prompt: Option<String>,
    messages: Vec<ChatMessage>,
    formatted_prompt: Option<String>,
    prompt_token_ids: Vec<u32>,
    output_token_ids: Vec<u32>,
    output_text: String,
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .expect("array of ids")
        .iter()
        .map(|x| u32::try_from(x.as_u64().expect("id")).expect("u32 id"))
        .collect()
}

fn records() -> Vec<Record> {
    let path = reference_path();
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let records: Vec<Record> = text
        .lines()
        .filter(|line| !line.trim().is_empty())
        .map(|line| {
            let v: Value = serde_json::from_str(line).expect("record is JSON");
            let messages = v["messages"]
                .as_array()
                .map(|messages| {
                    messages
                        .iter()
                        .map(|m| {
                            ChatMessage::new(
                                m["role"].as_str().expect("role"),
                                m["content"].as_str().expect("content"),
                            )
                        })
                        .collect()
                })
                .unwrap_or_default();
            Record {
                id: v["id"].as_str().expect("id").to_owned(),
                mode: v["mode"].as_str().expect("mode").to_owned(),
                prompt: v["prompt"].as_str().map(str::to_owned),
                messages,
                formatted_prompt: v["formatted_prompt"].as_str().map(str::to_owned),
                prompt_token_ids: ids(&v["prompt_token_ids"]),
                output_token_ids: ids(&v["output_token_ids"]),
                output_text: v["output_text"].as_str().expect("output_text").to_owned(),
            }
        })
        .collect();
    assert_eq!(records.len(), RECORDS_COUNT, "reference records");
    records
}

/// The text llama.cpp tokenized for a record.
fn prompt_text(record: &Record) -> &str {
    match record.mode.as_str() {
        "chat" => record
            .formatted_prompt
            .as_deref()
            .expect("chat has formatted_prompt"),
        "completion" => record.prompt.as_deref().expect("completion has prompt"),
        other => panic!("{}: unknown mode {other}", record.id),
    }
}

#[test]
fn every_prompt_tokenizes_to_the_reference_ids() {
    let tokenizer = Tokenizer::from_gguf(&read_gguf()).expect("tokenizer from GGUF");
    let records = records();
    let modes: std::collections::HashSet<&str> = records.iter().map(|r| r.mode.as_str()).collect();
    assert_eq!(modes.len(), 2, "both completion and chat records");
    for record in &records {
        // The file sets add_bos_token = false, so adding special tokens adds nothing.
        for add_special_tokens in [true, false] {
            let ids = tokenizer
                .encode(prompt_text(record), add_special_tokens)
                .expect("encode");
            assert_eq!(ids, record.prompt_token_ids, "{}", record.id);
        }
    }
}

#[test]
fn every_chat_prompt_renders_to_the_reference_text() {
    let gguf = read_gguf();
    let template = ChatTemplate::from_gguf(&gguf)
        .expect("template compiles")
        .expect("the GGUF has a chat template");
    let mut chats = 0;
    for record in records().iter().filter(|r| r.mode == "chat") {
        let rendered = template.render(&record.messages, true).expect("render");
        assert_eq!(
            Some(&rendered),
            record.formatted_prompt.as_ref(),
            "{}",
            record.id
        );
        chats += 1;
    }
    assert_eq!(chats, RECORDS_COUNT / 3, "chat records");
}

#[test]
fn every_output_decodes_to_the_reference_text() {
    let tokenizer = Tokenizer::from_gguf(&read_gguf()).expect("tokenizer from GGUF");
    for record in &records() {
        let text = tokenizer
            .decode(&record.output_token_ids, true)
            .expect("decode");
        assert_eq!(text, record.output_text, "{}", record.id);
    }
}

#[test]
fn incremental_decoding_rebuilds_every_output_text() {
    let tokenizer = Arc::new(Tokenizer::from_gguf(&read_gguf()).expect("tokenizer from GGUF"));
    let mut multibyte_records = 0;
    for record in &records() {
        let mut decoder =
            IncrementalDecoder::new(Arc::clone(&tokenizer), &record.prompt_token_ids, true);
        let mut text = String::new();
        for &id in &record.output_token_ids {
            let delta = decoder.push(id).expect("push");
            assert!(
                !delta.contains('\u{FFFD}'),
                "{}: half a character",
                record.id
            );
            text.push_str(&delta);
        }
        text.push_str(&decoder.flush().expect("flush"));
        assert_eq!(text, record.output_text, "{}", record.id);
        multibyte_records += usize::from(!record.output_text.is_ascii());
    }
    // The held-back path must have run: some outputs have characters split over tokens.
    assert!(multibyte_records > 0);
}

#[test]
fn special_tokens_and_sizes_follow_the_file() {
    let tokenizer = Tokenizer::from_gguf(&read_gguf()).expect("tokenizer from GGUF");
    assert_eq!(tokenizer.vocab_size(), 49_152);
    let eos = tokenizer.eos_token().expect("EOS");
    assert_eq!((eos.id, eos.text.as_str()), (2, "<|im_end|>"));
    let bos = tokenizer.bos_token().expect("BOS");
    assert_eq!((bos.id, bos.text.as_str()), (1, "<|im_start|>"));
    let eog = tokenizer.eos_token_ids();
    assert_eq!(eog.first(), Some(&2), "EOS first");
    assert!(
        eog.contains(&0),
        "<|endoftext|> ends generation too: {eog:?}"
    );

    assert_eq!(
        tokenizer.encode("<|im_start|>user", false).expect("encode"),
        [1, 4093]
    );
    assert!(tokenizer.is_special(2));
    assert!(!tokenizer.is_special(4093));
    assert_eq!(
        tokenizer.decode(&[1, 4093, 2], false).expect("decode"),
        "<|im_start|>user<|im_end|>"
    );
    assert_eq!(
        tokenizer.decode(&[1, 4093, 2], true).expect("decode"),
        "user"
    );
    assert_eq!(tokenizer.id_to_piece(260).as_deref(), Some("Ġthe"));
    assert_eq!(tokenizer.piece_to_id("<|im_end|>"), Some(2));
}

#[test]
fn out_of_vocabulary_ids_are_errors() {
    let tokenizer = Arc::new(Tokenizer::from_gguf(&read_gguf()).expect("tokenizer from GGUF"));
    let err = tokenizer
        .decode(&[5, 49_152], true)
        .expect_err("id past the vocab");
    assert!(err.to_string().contains("49152"), "{err}");
    let mut decoder = IncrementalDecoder::new(Arc::clone(&tokenizer), &[], true);
    assert!(decoder.push(u32::MAX).is_err());
    assert_eq!(decoder.push(19556).expect("valid id"), "Hello");
}

#[test]
fn add_bos_and_add_eos_flags_are_honoured() {
    let mut gguf = read_gguf();
    gguf.metadata.insert(
        "tokenizer.ggml.add_bos_token".to_owned(),
        gguf_file::Value::Bool(true),
    );
    gguf.metadata.insert(
        "tokenizer.ggml.add_eos_token".to_owned(),
        gguf_file::Value::Bool(true),
    );
    let tokenizer = Tokenizer::from_gguf(&gguf).expect("tokenizer from GGUF");
    let plain = tokenizer.encode("Hello world", false).expect("encode");
    assert_eq!(plain, [19556, 905]);
    assert_eq!(
        tokenizer.encode("Hello world", true).expect("encode"),
        [1, 19556, 905, 2]
    );
}

#[test]
fn tokenizer_json_round_trip_gives_the_same_ids() {
    let from_gguf = Tokenizer::from_gguf(&read_gguf()).expect("tokenizer from GGUF");
    let dir = tempfile::tempdir().expect("tempdir");
    let json_path = dir.path().join("tokenizer.json");
    std::fs::write(&json_path, from_gguf.to_json().expect("serialize")).expect("write");
    let config_path = dir.path().join("tokenizer_config.json");
    std::fs::write(
        &config_path,
        r#"{"bos_token": "<|im_start|>", "eos_token": {"content": "<|im_end|>"}}"#,
    )
    .expect("write");
    let from_json = Tokenizer::from_file(&json_path, Some(&config_path)).expect("load");

    assert_eq!(from_json.vocab_size(), from_gguf.vocab_size());
    assert_eq!(from_json.eos_token(), from_gguf.eos_token());
    assert_eq!(from_json.bos_token(), from_gguf.bos_token());
    assert_eq!(from_json.eos_token_ids()[0], 2);
    for record in &records() {
        let ids = from_json.encode(prompt_text(record), true).expect("encode");
        assert_eq!(ids, record.prompt_token_ids, "{}", record.id);
        let text = from_json
            .decode(&record.output_token_ids, true)
            .expect("decode");
        assert_eq!(text, record.output_text, "{}", record.id);
    }
}

#[test]
fn missing_tokenizer_json_is_an_io_error_naming_the_file() {
    let err = Tokenizer::from_file(std::path::Path::new("/nonexistent/tokenizer.json"), None)
        .expect_err("no such file");
    assert!(
        err.to_string().contains("/nonexistent/tokenizer.json"),
        "{err}"
    );
}
