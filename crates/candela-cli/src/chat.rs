//! `candela chat`: an interactive terminal chat with the engine running in-process.
//!
//! Each line read from stdin is a user turn (or a command: `/reset`, `/system TEXT`, `/quit`);
//! the whole history goes through the model's chat template, the reply streams to stdout, and
//! a line with TTFT and tokens/s follows it. EOF (Ctrl-D) ends the session cleanly. When the
//! history no longer fits the context, the oldest turns are dropped.

use std::io::{BufRead, IsTerminal, Read, Write};
use std::num::NonZeroU32;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use candela_engine::api::{FinishReason, GenerateEvent, GenerateRequest, SamplingParams};
use candela_engine::{ChatMessage, EngineConfig, EngineHandle};

/// How long loading and warm-up may take.
const READY_TIMEOUT: Duration = Duration::from_secs(300);
/// Longest accepted input line, in bytes.
const LINE_BYTES_MAX: usize = 1 << 20;

/// Arguments of `candela chat`.
#[derive(clap::Args)]
pub struct Args {
    /// A GGUF file, a directory with safetensors, or a Hugging Face model id.
    #[arg(long, default_value = "models/SmolLM2-135M-Instruct.Q4_1.gguf")]
    model: String,
    #[command(flatten)]
    storage: crate::storage::StorageArgs,
    #[command(flatten)]
    speculative: crate::speculative::SpeculativeArgs,
    /// A system prompt to start with.
    #[arg(long)]
    system: Option<String>,
    /// A Jinja chat template file that replaces the model's own.
    #[arg(long)]
    chat_template: Option<PathBuf>,
    /// Most tokens per reply.
    #[arg(long, default_value_t = 512)]
    max_tokens: u32,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.7)]
    temperature: f32,
    /// Nucleus sampling mass.
    #[arg(long, default_value_t = 0.9)]
    top_p: f32,
    /// Seed of the sampler.
    #[arg(long)]
    seed: Option<u64>,
    /// Memory for the KV cache, in MiB.
    #[arg(long, default_value_t = 256)]
    kv_cache_memory_mib: u64,
}

/// What one input line asks for.
#[derive(Debug, PartialEq, Eq)]
enum Input<'a> {
    Say(&'a str),
    Reset,
    System(&'a str),
    Quit,
    Help,
    Nothing,
}

fn parse_input(line: &str) -> Input<'_> {
    let line = line.trim();
    if line.is_empty() {
        return Input::Nothing;
    }
    let (command, rest) = line.split_once(char::is_whitespace).unwrap_or((line, ""));
    match command {
        "/quit" | "/exit" => Input::Quit,
        "/reset" => Input::Reset,
        "/system" => Input::System(rest.trim()),
        "/help" => Input::Help,
        _ => Input::Say(line),
    }
}

/// The conversation: an optional system prompt and alternating user/assistant turns.
#[derive(Debug, Default)]
struct History {
    system: Option<String>,
    turns: Vec<ChatMessage>,
}

impl History {
    fn messages(&self) -> Vec<ChatMessage> {
        self.system
            .iter()
            .map(|s| ChatMessage::new("system", s.clone()))
            .chain(self.turns.iter().cloned())
            .collect()
    }
}

/// Runs `candela chat`.
pub fn run(args: Args) -> anyhow::Result<()> {
    let max_tokens = NonZeroU32::new(args.max_tokens).context("--max-tokens must be at least 1")?;
    let chat_template = crate::generate::read_chat_template(args.chat_template.as_deref())?;
    let config = EngineConfig {
        model: args.model.clone(),
        quantize: args.storage.to_quantize()?,
        kv_cache_dtype: args.storage.kv_cache_dtype(),
        speculative: args.speculative.to_config()?,
        kv_cache_memory_bytes: args.kv_cache_memory_mib << 20,
        queue_waiting_max: 1,
        chat_template,
        ..EngineConfig::default()
    };
    let engine = EngineHandle::start(config)
        .with_context(|| format!("cannot load model `{}`", args.model))?;
    let outcome = engine
        .wait_ready(READY_TIMEOUT)
        .context("the engine did not become ready")
        .and_then(|()| chat(&engine, &args, max_tokens));
    engine.shutdown(Instant::now() + Duration::from_secs(1));
    outcome
}

fn chat(engine: &EngineHandle, args: &Args, max_tokens: NonZeroU32) -> anyhow::Result<()> {
    let interactive = std::io::stdin().is_terminal();
    let mut history = History {
        system: args.system.clone(),
        turns: Vec::new(),
    };
    let mut stdout = std::io::stdout();
    if interactive {
        eprintln!(
            "chatting with {} (/system TEXT, /reset, /quit; Ctrl-D to leave)",
            engine.model_name()
        );
    }
    let mut stdin = std::io::stdin().lock();
    let mut line = String::new();
    loop {
        if interactive {
            write!(stdout, "> ")?;
            stdout.flush()?;
        }
        line.clear();
        let read = (&mut stdin)
            .take(LINE_BYTES_MAX as u64)
            .read_line(&mut line)
            .context("reading stdin")?;
        if read == 0 {
            break;
        }
        match parse_input(&line) {
            Input::Nothing => {}
            Input::Quit => break,
            Input::Help => {
                writeln!(stdout, "[/system TEXT sets the system prompt; /reset clears the conversation; /quit or Ctrl-D leaves]")?;
            }
            Input::Reset => {
                history.turns.clear();
                writeln!(stdout, "[conversation reset]")?;
            }
            Input::System(text) => {
                history.system = (!text.is_empty()).then(|| text.to_owned());
                history.turns.clear();
                match &history.system {
                    Some(_) => writeln!(stdout, "[system prompt set; conversation reset]")?,
                    None => writeln!(stdout, "[system prompt cleared; conversation reset]")?,
                }
            }
            Input::Say(text) => {
                history.turns.push(ChatMessage::new("user", text));
                match reply(engine, args, max_tokens, &mut history, &mut stdout) {
                    Ok(answer) => history.turns.push(ChatMessage::new("assistant", answer)),
                    Err(e) => {
                        history.turns.pop();
                        writeln!(stdout, "[error: {e:#}]")?;
                    }
                }
            }
        }
        stdout.flush()?;
    }
    if interactive {
        writeln!(stdout)?;
    }
    Ok(())
}

/// Renders the history, dropping the oldest turns until prompt plus `max_tokens` fits.
fn prompt_ids(
    engine: &EngineHandle,
    history: &mut History,
    max_tokens: NonZeroU32,
) -> anyhow::Result<Vec<u32>> {
    // Each pass drops a turn, so this ends within `turns.len()` passes.
    loop {
        let text = engine
            .apply_chat_template(&history.messages(), true)
            .context("cannot render the chat template")?;
        // The template writes BOS itself when the model wants one.
        let ids = engine.tokenize(&text, false)?;
        if ids.len() + max_tokens.get() as usize <= engine.model_len_max() {
            return Ok(ids);
        }
        if history.turns.len() <= 1 {
            bail!(
                "the message ({} tokens with max_tokens {max_tokens}) does not fit the context of {} tokens",
                ids.len(),
                engine.model_len_max()
            );
        }
        // Drop a whole exchange so the history still starts with a user turn.
        let drop = if history.turns.len() >= 3 { 2 } else { 1 };
        history.turns.drain(..drop);
    }
}

/// Streams one reply to `out` and returns its text.
fn reply(
    engine: &EngineHandle,
    args: &Args,
    max_tokens: NonZeroU32,
    history: &mut History,
    out: &mut impl Write,
) -> anyhow::Result<String> {
    let arrival = Instant::now();
    let prompt_token_ids = prompt_ids(engine, history, max_tokens)?;
    let request = GenerateRequest {
        prompt_token_ids,
        sampling: SamplingParams {
            temperature: args.temperature,
            top_p: args.top_p,
            seed: args.seed,
            max_tokens: Some(max_tokens),
            ..SamplingParams::default()
        },
        n: NonZeroU32::MIN,
        priority: 0,
        arrival,
    };
    let (_, mut events) = engine
        .submit(request)
        .map_err(|e| anyhow::anyhow!("the engine refused the message: {e}"))?;
    let mut answer = String::new();
    let (reason, usage, timings) = loop {
        match events.blocking_recv() {
            Some(GenerateEvent::Delta { text, .. }) => {
                out.write_all(text.as_bytes())?;
                out.flush()?;
                answer.push_str(&text);
            }
            Some(GenerateEvent::Finished {
                reason,
                usage,
                timings,
                ..
            }) => break (reason, usage, timings),
            None => bail!("the engine stopped before the reply finished"),
        }
    };
    writeln!(out)?;
    if let FinishReason::Error(message) = reason {
        bail!("generation failed: {message}");
    }
    let truncated = if reason == FinishReason::Length {
        ", cut at max_tokens"
    } else {
        ""
    };
    writeln!(
        out,
        "[{} tokens, TTFT {:.0} ms, {:.1} tokens/s{truncated}]",
        usage.completion_tokens, timings.ttft_ms, timings.generation_tokens_per_s
    )?;
    Ok(answer)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_parse() {
        assert_eq!(parse_input("  hello there \n"), Input::Say("hello there"));
        assert_eq!(parse_input("/reset\n"), Input::Reset);
        assert_eq!(
            parse_input("/system Be brief.\n"),
            Input::System("Be brief.")
        );
        assert_eq!(parse_input("/system\n"), Input::System(""));
        assert_eq!(parse_input("/quit"), Input::Quit);
        assert_eq!(parse_input("\n"), Input::Nothing);
    }

    #[test]
    fn history_puts_the_system_prompt_first() {
        let history = History {
            system: Some("Be brief.".into()),
            turns: vec![ChatMessage::new("user", "Hi")],
        };
        assert_eq!(
            history.messages(),
            vec![
                ChatMessage::new("system", "Be brief."),
                ChatMessage::new("user", "Hi")
            ]
        );
    }
}
