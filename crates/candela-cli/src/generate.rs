//! `candela generate`: one prompt (raw text) or one chat (OpenAI messages rendered through the
//! model's chat template) through the engine, in-process, on the same code path the server
//! uses (`EngineHandle::submit` and its event channel).
//!
//! Without `--json` the text streams to stdout and the timings go to stderr; with `--json` one
//! JSON line holds the token ids, the text, the finish reason and the timings.

use std::io::Write;
use std::num::NonZeroU32;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use candela_engine::api::{
    FinishReason, GenerateEvent, GenerateRequest, OutputConstraint, SamplingParams, StopCause,
    SubmitError, Timings,
};
use candela_engine::{ChatMessage, ContentPart, EngineConfig, EngineHandle, MessageContent};
use serde_json::{json, Value};

/// How long the warm-up step may take before we give up.
const READY_TIMEOUT: Duration = Duration::from_secs(300);

/// Arguments of `candela generate`.
#[derive(clap::Args)]
pub struct Args {
    /// Model: a .gguf file, a directory with safetensors, or a Hugging Face model id.
    #[arg(long, default_value = "models/SmolLM2-135M-Instruct.Q4_1.gguf")]
    model: String,
    #[command(flatten)]
    storage: crate::storage::StorageArgs,
    #[command(flatten)]
    speculative: crate::speculative::SpeculativeArgs,
    /// Raw completion prompt (no chat template).
    #[arg(
        long,
        conflicts_with = "messages",
        required_unless_present = "messages"
    )]
    prompt: Option<String>,
    /// An OpenAI message array as JSON, e.g. '[{"role":"user","content":"Hi"}]', rendered
    /// through the model's chat template with the assistant turn opened.
    #[arg(long)]
    messages: Option<String>,
    /// A Jinja chat template file that replaces the model's own.
    #[arg(long)]
    chat_template: Option<PathBuf>,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 128)]
    max_tokens: u32,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Nucleus sampling mass.
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// Keep only the k most likely tokens.
    #[arg(long)]
    top_k: Option<u32>,
    /// Seed of the sampler (same seed, same output).
    #[arg(long)]
    seed: Option<u64>,
    /// A stop string (repeatable).
    #[arg(long)]
    stop: Vec<String>,
    /// Keep generating past the end-of-sequence token.
    #[arg(long)]
    ignore_eos: bool,
    /// Constrain the output to JSON valid under this JSON schema (a file, or the JSON itself).
    #[arg(long, group = "constraint")]
    json_schema: Option<String>,
    /// Constrain the output to match this regular expression.
    #[arg(long, group = "constraint")]
    regex: Option<String>,
    /// Constrain the output to a sentence of this Lark grammar (a file).
    #[arg(long, group = "constraint")]
    grammar_file: Option<PathBuf>,
    /// Memory for the KV cache, in MiB (CPU).
    #[arg(long, default_value_t = 256)]
    kv_cache_memory_mib: u64,
    /// `cpu`, `cuda` or `cuda:N` (CUDA needs a build with `--features cuda`).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// On CUDA: the fraction of the GPU's memory the engine may use (weights, activations
    /// and the KV cache, which gets the rest); replaces --kv-cache-memory-mib there.
    #[arg(long, default_value_t = 0.9)]
    gpu_memory_utilization: f64,
    /// Print one JSON line (ids, text, finish reason, timings) instead of streaming text.
    #[arg(long)]
    json: bool,
}

/// The `--chat-template` file's text, read before the (slow) model load.
pub(crate) fn read_chat_template(path: Option<&std::path::Path>) -> anyhow::Result<Option<String>> {
    path.map(|path| {
        std::fs::read_to_string(path)
            .with_context(|| format!("reading the chat template {}", path.display()))
    })
    .transpose()
}

/// The `--json-schema`, `--regex` or `--grammar-file` constraint (clap allows one at most).
fn output_constraint(args: &Args) -> anyhow::Result<Option<OutputConstraint>> {
    if let Some(schema) = &args.json_schema {
        let text = if schema.trim_start().starts_with('{') {
            schema.clone()
        } else {
            std::fs::read_to_string(schema)
                .with_context(|| format!("reading the --json-schema file {schema}"))?
        };
        return Ok(Some(OutputConstraint::JsonSchema(text)));
    }
    if let Some(regex) = &args.regex {
        return Ok(Some(OutputConstraint::Regex(regex.clone())));
    }
    if let Some(path) = &args.grammar_file {
        let grammar = std::fs::read_to_string(path)
            .with_context(|| format!("reading the --grammar-file {}", path.display()))?;
        return Ok(Some(OutputConstraint::Lark(grammar)));
    }
    Ok(None)
}

/// Runs `candela generate`.
pub fn run(args: Args) -> anyhow::Result<()> {
    // Parse everything the user gave before the (slow) model load.
    let messages = args.messages.as_deref().map(parse_messages).transpose()?;
    let max_tokens = NonZeroU32::new(args.max_tokens).context("--max-tokens must be at least 1")?;
    let chat_template = read_chat_template(args.chat_template.as_deref())?;

    let config = EngineConfig {
        model: args.model.clone(),
        quantize: args.storage.to_quantize()?,
        kv_cache_dtype: args.storage.kv_cache_dtype(),
        speculative: args.speculative.to_config()?,
        kv_cache_memory_bytes: args.kv_cache_memory_mib << 20,
        device: crate::serve::parse_device(&args.device)?,
        gpu_memory_utilization: Some(args.gpu_memory_utilization),
        queue_waiting_max: 1,
        chat_template,
        ..EngineConfig::default()
    };
    let engine = EngineHandle::start(config)
        .with_context(|| format!("cannot load model `{}`", args.model))?;
    engine
        .wait_ready(READY_TIMEOUT)
        .context("the engine did not become ready")?;
    let outcome = generate(&engine, &args, messages.as_deref(), max_tokens);
    engine.shutdown(Instant::now() + Duration::from_secs(1));
    outcome
}

fn generate(
    engine: &EngineHandle,
    args: &Args,
    messages: Option<&[ChatMessage]>,
    max_tokens: NonZeroU32,
) -> anyhow::Result<()> {
    let arrival = Instant::now();
    let prompt_token_ids = match (messages, args.prompt.as_deref()) {
        (Some(messages), _) => {
            let text = engine
                .apply_chat_template(messages, true)
                .context("cannot render the chat template")?;
            // The template writes BOS itself when the model wants one.
            engine.tokenize(&text, false)?
        }
        (None, Some(prompt)) => engine.tokenize(prompt, true)?,
        (None, None) => bail!("give --prompt or --messages"),
    };
    let sampling = SamplingParams {
        temperature: args.temperature,
        top_p: args.top_p,
        top_k: args.top_k.and_then(NonZeroU32::new),
        seed: args.seed,
        max_tokens: Some(max_tokens),
        stop: args.stop.clone(),
        ignore_eos: args.ignore_eos,
        constraint: output_constraint(args)?,
        ..SamplingParams::default()
    };
    let request = GenerateRequest {
        prompt_token_ids: prompt_token_ids.clone(),
        sampling,
        n: NonZeroU32::MIN,
        priority: 0,
        arrival,
    };
    let (_, mut events) = engine.submit(request).map_err(|error| match error {
        SubmitError::PromptTooLong { .. } => {
            anyhow::anyhow!("the prompt is too long for this model: {error}")
        }
        other => anyhow::anyhow!("the engine refused the request: {other}"),
    })?;

    let mut output_token_ids = Vec::new();
    let mut text = String::new();
    let mut stdout = std::io::stdout().lock();
    let (reason, timings) = loop {
        match events.blocking_recv() {
            Some(GenerateEvent::Delta {
                token_ids,
                text: piece,
                ..
            }) => {
                output_token_ids.extend_from_slice(&token_ids);
                if !args.json {
                    stdout.write_all(piece.as_bytes())?;
                    stdout.flush()?;
                }
                text.push_str(&piece);
            }
            Some(GenerateEvent::Finished {
                reason, timings, ..
            }) => break (reason, timings),
            None => bail!("the engine stopped before the request finished"),
        }
    };
    if let FinishReason::Error(message) = &reason {
        bail!("generation failed: {message}");
    }
    if args.json {
        let line = json!({
            "prompt_token_ids": prompt_token_ids,
            "output_token_ids": output_token_ids,
            "text": text,
            "finish_reason": finish_reason_name(&reason),
            "stop": stop_detail(&reason),
            "timings": timings_json(&timings),
        });
        writeln!(stdout, "{line}")?;
    } else {
        writeln!(stdout)?;
        eprintln!(
            "[{} prompt tokens, {} generated, finish: {}] TTFT {:.1} ms, prompt {:.1} tokens/s, generation {:.1} tokens/s",
            prompt_token_ids.len(),
            output_token_ids.len(),
            finish_reason_name(&reason),
            timings.ttft_ms,
            timings.prompt_tokens_per_s,
            timings.generation_tokens_per_s,
        );
    }
    Ok(())
}

/// Parses an OpenAI message array: each message an object with a string `role` and a
/// `content` that is a string or a list of `{"type": "text", "text": ...}` parts.
fn parse_messages(json_text: &str) -> anyhow::Result<Vec<ChatMessage>> {
    let value: Value = serde_json::from_str(json_text).context("--messages is not valid JSON")?;
    let Value::Array(items) = value else {
        bail!("--messages must be a JSON array of messages");
    };
    if items.is_empty() {
        bail!("--messages must hold at least one message");
    }
    items
        .iter()
        .enumerate()
        .map(|(i, item)| {
            let role = item
                .get("role")
                .and_then(Value::as_str)
                .with_context(|| format!("--messages[{i}] has no string `role`"))?;
            // Parts stay parts: the template renders them, or joins them with newlines.
            let content = match item.get("content") {
                Some(Value::String(text)) => MessageContent::Text(text.clone()),
                Some(Value::Array(parts)) => MessageContent::Parts(
                    parts
                        .iter()
                        .enumerate()
                        .map(|(j, part)| {
                            match (part.get("type").and_then(Value::as_str), part.get("text")) {
                                (Some("text"), Some(Value::String(text))) => {
                                    Ok(ContentPart::Text(text.clone()))
                                }
                                _ => bail!(
                                    "--messages[{i}].content[{j}] must be {{\"type\": \"text\", \"text\": \"...\"}}"
                                ),
                            }
                        })
                        .collect::<anyhow::Result<Vec<_>>>()?,
                ),
                Some(Value::Null) | None => MessageContent::Text(String::new()),
                Some(_) => bail!("--messages[{i}].content must be a string or a list of parts"),
            };
            Ok(ChatMessage::with_content(role, content))
        })
        .collect()
}

fn finish_reason_name(reason: &FinishReason) -> &'static str {
    match reason {
        FinishReason::Stop(_) => "stop",
        FinishReason::ToolCalls => "tool_calls",
        FinishReason::Length => "length",
        FinishReason::Abort => "abort",
        FinishReason::Error(_) => "error",
    }
}

/// The stop string or token that ended generation, when one did.
fn stop_detail(reason: &FinishReason) -> Value {
    match reason {
        FinishReason::Stop(StopCause::StopString(stop)) => json!(stop),
        FinishReason::Stop(StopCause::StopToken(id) | StopCause::Eos(id)) => json!(id),
        _ => Value::Null,
    }
}

fn timings_json(timings: &Timings) -> Value {
    json!({
        "queue_ms": timings.queue_ms,
        "ttft_ms": timings.ttft_ms,
        "prompt_tokens_per_s": timings.prompt_tokens_per_s,
        "generation_tokens_per_s": timings.generation_tokens_per_s,
        "total_ms": timings.total_ms,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_parse_strings_and_parts() {
        let messages = parse_messages(
            r#"[{"role":"system","content":"Be brief."},
                {"role":"user","content":[{"type":"text","text":"Hi"}]}]"#,
        )
        .expect("valid messages");
        assert_eq!(messages.len(), 2);
        assert_eq!(messages[0], ChatMessage::new("system", "Be brief."));
        assert_eq!(
            messages[1],
            ChatMessage::with_content(
                "user",
                MessageContent::Parts(vec![ContentPart::Text("Hi".into())])
            )
        );
    }

    #[test]
    fn bad_messages_are_clear_errors() {
        for (input, expected) in [
            ("[{", "not valid JSON"),
            ("{}", "JSON array"),
            ("[]", "at least one"),
            (r#"[{"content":"x"}]"#, "no string `role`"),
            (r#"[{"role":"user","content":5}]"#, "string or a list"),
            (
                r#"[{"role":"user","content":[{"type":"image"}]}]"#,
                "content[0]",
            ),
        ] {
            let error = parse_messages(input).expect_err(input);
            let message = format!("{error:#}");
            assert!(message.contains(expected), "{input}: {message}");
        }
    }
}
