//! `candela generate` as a user runs it: the built binary on the real default model.

use std::path::PathBuf;
use std::process::{Command, Output};

use serde_json::Value;

fn model_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/SmolLM2-135M-Instruct.Q4_1.gguf")
}

fn reference(id: &str) -> Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../testdata/reference/smollm2-greedy.jsonl");
    let text = std::fs::read_to_string(path).expect("the reference file exists");
    text.lines()
        .map(|line| serde_json::from_str::<Value>(line).expect("valid JSON line"))
        .find(|record| record["id"] == id)
        .unwrap_or_else(|| panic!("no record {id}"))
}

fn candela(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_candela"))
        .arg("generate")
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("the binary runs")
}

fn ids(value: &Value) -> Vec<u64> {
    value
        .as_array()
        .expect("an id array")
        .iter()
        .map(|x| x.as_u64().expect("an id"))
        .collect()
}

/// The reference's output ids up to its first near-tie (top-2 logprobs within 0.1 nats).
fn comparable_output(record: &Value) -> Vec<u64> {
    let output = ids(&record["output_token_ids"]);
    let entries = record["output_top_logprobs"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let mut next = 0;
    let mut end = output.len();
    for (i, &token) in output.iter().enumerate() {
        let Some(entry) = entries.get(next) else {
            break;
        };
        if entry["id"].as_u64() != Some(token) {
            continue;
        }
        next += 1;
        let top = &entry["top"];
        if let (Some(a), Some(b)) = (top[0][1].as_f64(), top[1][1].as_f64()) {
            if (a - b).abs() < 0.1 {
                end = i;
                break;
            }
        }
    }
    output[..end].to_vec()
}

fn json_line(output: &Output) -> Value {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "failed: {stderr}");
    let stdout = String::from_utf8(output.stdout.clone()).expect("UTF-8 output");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 1, "one JSON line, got {stdout:?}");
    serde_json::from_str(lines[0]).expect("valid JSON")
}

#[test]
fn json_output_matches_the_reference_for_a_completion() {
    let record = reference("q02-completion");
    let prompt = record["prompt"].as_str().expect("a prompt");
    let model = model_path();
    let output = candela(&[
        "--model",
        model.to_str().expect("UTF-8 path"),
        "--prompt",
        prompt,
        "--max-tokens",
        "48",
        "--temperature",
        "0",
        "--json",
    ]);
    let line = json_line(&output);
    assert_eq!(
        ids(&line["prompt_token_ids"]),
        ids(&record["prompt_token_ids"])
    );
    let expected = comparable_output(&record);
    let got = ids(&line["output_token_ids"]);
    assert!(got.len() >= expected.len(), "{got:?} vs {expected:?}");
    assert_eq!(got[..expected.len()], expected[..]);
    if expected.len() == ids(&record["output_token_ids"]).len() {
        assert_eq!(line["text"], record["output_text"]);
        assert_eq!(line["finish_reason"], record["finish_reason"]);
    }
    for key in ["ttft_ms", "prompt_tokens_per_s", "generation_tokens_per_s"] {
        let value = line["timings"][key].as_f64().unwrap_or(-1.0);
        assert!(value > 0.0, "timings.{key} = {}", line["timings"][key]);
    }
}

#[test]
fn messages_go_through_the_chat_template() {
    let record = reference("q04-chat");
    let messages = serde_json::to_string(&record["messages"]).expect("serializable");
    let model = model_path();
    let output = candela(&[
        "--model",
        model.to_str().expect("UTF-8 path"),
        "--messages",
        &messages,
        "--max-tokens",
        "6",
        "--json",
    ]);
    let line = json_line(&output);
    assert_eq!(
        ids(&line["prompt_token_ids"]),
        ids(&record["prompt_token_ids"])
    );
    let expected = comparable_output(&record);
    let got = ids(&line["output_token_ids"]);
    let n = expected.len().min(6);
    assert_eq!(got[..n], expected[..n]);
    assert_eq!(line["finish_reason"], "length");
}

#[test]
fn text_streams_to_stdout_and_timings_go_to_stderr() {
    // No near-tie on the way: the whole text must match.
    let record = reference("a04-completion-qa");
    let prompt = record["prompt"].as_str().expect("a prompt");
    let model = model_path();
    let output = candela(&[
        "--model",
        model.to_str().expect("UTF-8 path"),
        "--prompt",
        prompt,
        "--max-tokens",
        "48",
    ]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(
        stderr.contains("TTFT") && stderr.contains("tokens/s"),
        "{stderr}"
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    let expected = record["output_text"].as_str().expect("a text");
    assert_eq!(stdout, format!("{expected}\n"));
}

/// Runs with bad input and checks for a clean failure whose message contains `expected`.
fn assert_fails_cleanly(args: &[&str], expected: &str) {
    let output = candela(args);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "succeeded with {args:?}");
    assert!(!stderr.contains("panicked"), "panicked: {stderr}");
    assert!(
        stderr.to_lowercase().contains(&expected.to_lowercase()),
        "expected {expected:?} in: {stderr}"
    );
}

#[test]
fn bad_inputs_fail_with_clear_messages() {
    let model = model_path();
    let model = model.to_str().expect("UTF-8 path");
    let dir = tempfile::tempdir().expect("a temp dir");

    let missing = dir.path().join("nope.gguf");
    assert_fails_cleanly(
        &[
            "--model",
            missing.to_str().expect("UTF-8"),
            "--prompt",
            "hi",
        ],
        "not found",
    );

    let truncated = dir.path().join("truncated.gguf");
    let bytes = std::fs::read(model_path()).expect("the model file");
    std::fs::write(&truncated, &bytes[..bytes.len() / 3]).expect("writes");
    assert_fails_cleanly(
        &[
            "--model",
            truncated.to_str().expect("UTF-8"),
            "--prompt",
            "hi",
        ],
        "truncated",
    );

    assert_fails_cleanly(
        &[
            "--model",
            model,
            "--messages",
            "[{\"role\": \"user\", \"content\": ",
        ],
        "not valid JSON",
    );

    let template = dir.path().join("raises.jinja");
    std::fs::write(
        &template,
        "{% if messages[0]['role'] != 'system' %}{{ raise_exception('a system message must come first') }}{% endif %}",
    )
    .expect("writes");
    assert_fails_cleanly(
        &[
            "--model",
            model,
            "--chat-template",
            template.to_str().expect("UTF-8"),
            "--messages",
            "[{\"role\": \"user\", \"content\": \"hi\"}]",
        ],
        "a system message must come first",
    );

    let long_prompt = "hello ".repeat(9000);
    assert_fails_cleanly(
        &[
            "--model",
            model,
            "--prompt",
            &long_prompt,
            "--max-tokens",
            "16",
        ],
        "too long",
    );
}

/// The default model exported as an f32 safetensors checkpoint (config, weights, tokenizer,
/// chat template), shared by the `--quantize` tests and kept across runs in the build tree.
fn float_checkpoint() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("smollm2-135m-f32");
    candela_models::export::gguf_to_safetensors_once(&model_path(), &dir).expect("export");
    dir
}

#[test]
fn quantize_runs_a_float_checkpoint_end_to_end_and_reports_each_path() {
    let dir = float_checkpoint();
    let model = dir.to_str().expect("utf-8");
    // The reference's top-2 logprobs stay at least 0.5 nats apart for this answer's first 18
    // tokens, so int8's rounding (about 0.03 nats on average) cannot change them.
    let messages = r#"[{"role":"user","content":"What is 12 + 35?"}]"#;
    let run = |extra: &[&str]| {
        let mut args = vec![
            "--model",
            model,
            "--messages",
            messages,
            "--max-tokens",
            "10",
        ];
        args.extend_from_slice(&["--temperature", "0", "--json"]);
        args.extend_from_slice(extra);
        let out = Command::new(env!("CARGO_BIN_EXE_candela"))
            .arg("generate")
            .args(&args)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .output()
            .expect("the binary runs");
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "{extra:?}: {stderr}");
        let line: Value = serde_json::from_slice(&out.stdout).expect("one JSON line");
        (ids(&line["output_token_ids"]), stderr)
    };
    let (float, log) = run(&[]);
    assert!(log.contains("211 x dense F32 matmul"), "{log}");
    let (int8, log) = run(&["--quantize", "int8"]);
    assert!(log.contains("210 x packed int8 g32 (--quantize)"), "{log}");
    assert!(
        log.contains("1 x dense F32 matmul (first: model.embed_tokens.weight (tied LM head))"),
        "{log}"
    );
    // k = 576 takes 64 for groups of 128; the MLP down projection (k = 1536) takes 128.
    let (_, log) = run(&["--quantize", "int4", "--quant-group-size", "128"]);
    assert!(log.contains("180 x packed int4 g64 (--quantize)"), "{log}");
    assert!(log.contains("30 x packed int4 g128 (--quantize)"), "{log}");
    assert_eq!(float.len(), 10);
    assert_eq!(float, int8);
}

#[test]
fn quantize_flags_are_checked_before_loading() {
    let out = candela(&["--prompt", "hi", "--quant-group-size", "64"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--quantize"));
    let out = candela(&[
        "--prompt",
        "hi",
        "--quantize",
        "int4",
        "--quant-group-size",
        "48",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("possible values: 32, 64, 128"));
    let out = candela(&["--prompt", "hi", "--quantize", "int3"]);
    assert!(!out.status.success());
}

#[test]
fn kv_cache_dtypes_give_the_reference_output_and_f16_twice_the_blocks() {
    let record = reference("q02-completion");
    let prompt = record["prompt"].as_str().expect("a prompt");
    let model = model_path();
    let run = |kv: &str| {
        let out = Command::new(env!("CARGO_BIN_EXE_candela"))
            .arg("generate")
            .args([
                "--model",
                model.to_str().expect("UTF-8 path"),
                "--prompt",
                prompt,
                "--max-tokens",
                "24",
                "--temperature",
                "0",
                "--json",
                "--kv-cache-dtype",
                kv,
            ])
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .output()
            .expect("the binary runs");
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "{kv}: {stderr}");
        let blocks: u64 = stderr
            .split("num_blocks=")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no num_blocks in: {stderr}"));
        (json_line(&out), blocks, stderr)
    };
    let (f32_line, f32_blocks, log) = run("f32");
    assert!(log.contains("kv_dtype=F32"), "{log}");
    let (line, blocks, log) = run("auto");
    assert!(log.contains("kv_dtype=F16"), "the CPU default: {log}");
    assert_eq!(blocks, 2 * f32_blocks);
    let expected = comparable_output(&record);
    let got = ids(&line["output_token_ids"]);
    let n = expected.len().min(got.len());
    assert_eq!(got[..n], expected[..n]);
    assert_eq!(ids(&f32_line["output_token_ids"])[..n], expected[..n]);

    let out = candela(&["--prompt", "hi", "--kv-cache-dtype", "fp8"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("possible values: auto, f32, f16, bf16"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn json_schema_regex_and_grammar_constrain_the_output() {
    let model = model_path().to_string_lossy().into_owned();
    let schema = r#"{"type":"object","properties":{"name":{"type":"string","maxLength":16},"age":{"type":"integer"}},"required":["name","age"],"additionalProperties":false}"#;
    let messages = r#"[{"role":"user","content":"A person as JSON, please."}]"#;
    let out = json_line(&candela(&[
        "--model",
        &model,
        "--messages",
        messages,
        "--json-schema",
        schema,
        "--json",
    ]));
    let text = out["text"].as_str().expect("text");
    let person: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{text:?}: {e}"));
    assert!(
        person["name"]
            .as_str()
            .is_some_and(|n| n.chars().count() <= 16),
        "{person}"
    );
    assert!(person["age"].is_i64(), "{person}");
    assert_eq!(out["finish_reason"], "stop", "{out}");

    let out = json_line(&candela(&[
        "--model",
        &model,
        "--prompt",
        "The year is",
        "--regex",
        " (19|20)[0-9]{2}",
        "--json",
    ]));
    let text = out["text"].as_str().expect("text");
    assert!(
        text.len() == 5 && text[1..].parse::<u32>().is_ok(),
        "{text:?}"
    );

    let dir = tempfile::tempdir().expect("temp dir");
    let grammar = dir.path().join("yes-no.lark");
    std::fs::write(&grammar, "start: \" yes\" | \" no\"\n").expect("write grammar");
    let grammar = grammar.to_string_lossy().into_owned();
    let out = json_line(&candela(&[
        "--model",
        &model,
        "--prompt",
        "Is water wet? Answer:",
        "--grammar-file",
        &grammar,
        "--json",
    ]));
    assert!(
        matches!(out["text"].as_str(), Some(" yes" | " no")),
        "{out}"
    );

    // A bad constraint is a clear error, not a crash; two at once are refused by the parser.
    let bad = candela(&["--model", &model, "--prompt", "x", "--regex", "(unclosed"]);
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("constraint"),
        "{bad:?}"
    );
    let both = candela(&[
        "--model",
        &model,
        "--prompt",
        "x",
        "--regex",
        "a",
        "--json-schema",
        "{}",
    ]);
    assert!(!both.status.success());
}
