//! `--speculative ngram` and its settings, shared by every subcommand that runs an engine
//! (`serve`, `generate`, `batch`, `chat`).

use candela_engine::{SpeculativeConfig, SpeculativeMethod};

/// Speculative decoding methods.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum MethodArg {
    /// N-gram prompt lookup: drafts are the tokens that followed the latest earlier
    /// occurrence of the sequence's last n tokens (no draft model).
    Ngram,
}

/// Speculative decoding (off unless `--speculative` is given).
#[derive(clap::Args, Clone, Debug)]
pub struct SpeculativeArgs {
    /// Speculative decoding method (off by default). Choices with structured outputs, tools
    /// or logprobs decode without it.
    #[arg(long, value_enum)]
    speculative: Option<MethodArg>,
    /// Most draft tokens verified per sequence and step (1 to 16); each sequence drafts
    /// fewer after rejections.
    #[arg(long, default_value_t = SpeculativeConfig::default().num_speculative_tokens, requires = "speculative",
          value_parser = clap::value_parser!(u32).range(1..=i64::from(SpeculativeConfig::TOKENS_MAX)))]
    num_speculative_tokens: u32,
    /// Longest n-gram looked up (tried first).
    #[arg(long, default_value_t = 4, requires = "speculative",
          value_parser = clap::value_parser!(u32).range(1..=i64::from(SpeculativeConfig::NGRAM_MAX)))]
    ngram_max: u32,
    /// Shortest n-gram looked up (at most --ngram-max).
    #[arg(long, default_value_t = 2, requires = "speculative",
          value_parser = clap::value_parser!(u32).range(1..=i64::from(SpeculativeConfig::NGRAM_MAX)))]
    ngram_min: u32,
}

impl SpeculativeArgs {
    /// The engine's setting: `None` without `--speculative`.
    pub fn to_config(&self) -> anyhow::Result<Option<SpeculativeConfig>> {
        let Some(method) = self.speculative else {
            return Ok(None);
        };
        anyhow::ensure!(
            self.ngram_min <= self.ngram_max,
            "--ngram-min ({}) must be at most --ngram-max ({})",
            self.ngram_min,
            self.ngram_max
        );
        let config = SpeculativeConfig {
            method: match method {
                MethodArg::Ngram => SpeculativeMethod::Ngram,
            },
            num_speculative_tokens: self.num_speculative_tokens,
            ngram_min: self.ngram_min,
            ngram_max: self.ngram_max,
        };
        config.validate()?;
        Ok(Some(config))
    }
}
