//! The `candela` binary: one subcommand per way a user meets the engine
//! (serve, generate, chat, batch, bench). Each subcommand lives in its own module;
//! this file only parses arguments and dispatches.

mod batch;
mod bench;
mod chat;
mod generate;
mod roofline;
mod serve;
mod speculative;
mod storage;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "candela", version, about = "LLM token-generation engine")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate a completion for one prompt or chat, in-process.
    Generate(generate::Args),
    /// Serve the OpenAI-compatible HTTP API.
    Serve(serve::Args),
    /// Run an offline batch job (OpenAI Batch API JSONL), in-process.
    Batch(batch::Args),
    /// Load-test an OpenAI-compatible server at fixed concurrency levels.
    Bench(bench::Args),
    /// Chat with a model in the terminal, in-process.
    Chat(chat::Args),
    /// Measure this machine's read bandwidth and int8 matmul ceiling (JSON on stdout).
    Roofline(roofline::Args),
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Generate(args) => generate::run(args),
        Command::Serve(args) => serve::run(args),
        Command::Batch(args) => batch::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Chat(args) => chat::run(args),
        Command::Roofline(args) => roofline::run(args),
    }
}
