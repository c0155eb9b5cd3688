//! The engine's Prometheus metrics, with vLLM's names. One [`Registry`] per engine (never the
//! process-global default), so several engines (tests, replicas in one process) do not collide.
//!
//! Every metric is rendered twice: under `candela:` (our dashboards) and under `vllm:`, the
//! exact names routers and autoscalers read (the Gateway API Inference Extension's model-server
//! protocol, vLLM's production-stack router, KEDA/HPA queries written for vLLM), plus the older
//! aliases production-stack still reads (`vllm:gpu_cache_usage_perc`,
//! `vllm:gpu_prefix_cache_{hits,queries}_total`). Both prefixes always, rather than a flag: a
//! replica must plug into those systems with no configuration, and the cost is a few dozen
//! more lines per scrape. `candela:build_info` (version, model, revision) is ours only.
//!
//! The engine thread updates the metrics; any thread may render them with [`EngineMetrics::render`].

use prometheus::proto::MetricFamily;
use prometheus::{
    Gauge, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

use crate::api::FinishReason;

/// Latency buckets in seconds (vLLM's TTFT buckets, which also cover queue and e2e times).
const LATENCY_BUCKETS_S: &[f64] = &[
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
];

/// Inter-token latency buckets in seconds (vLLM's).
const ITL_BUCKETS_S: &[f64] = &[
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
    40.0, 80.0,
];

/// Every metric the engine exports.
#[derive(Debug)]
pub struct EngineMetrics {
    registry: Registry,
    /// Sequences (choices) in the running set.
    pub num_requests_running: IntGauge,
    /// Sequences waiting to be scheduled (including preempted ones).
    pub num_requests_waiting: IntGauge,
    /// Arrival to first token, per choice.
    pub time_to_first_token_seconds: Histogram,
    /// Time between consecutive tokens of a choice.
    pub inter_token_latency_seconds: Histogram,
    /// Arrival to finish, per choice.
    pub e2e_request_latency_seconds: Histogram,
    /// Arrival to first schedule, per choice.
    pub request_queue_time_seconds: Histogram,
    /// Prompt tokens of admitted requests (each choice counted once).
    pub prompt_tokens_total: IntCounter,
    /// Generated tokens.
    pub generation_tokens_total: IntCounter,
    /// Finished choices by reason (`stop`, `length`, `abort`, `error`).
    pub request_success_total: IntCounterVec,
    /// Fraction of KV blocks in use, in [0, 1] (vLLM's name says "perc"; its value is a fraction too).
    pub kv_cache_usage_perc: Gauge,
    /// Prompt tokens looked up in the prefix cache.
    pub prefix_cache_queries_total: IntCounter,
    /// Prompt tokens found in the prefix cache.
    pub prefix_cache_hits_total: IntCounter,
    /// Sequences preempted (their KV blocks freed, to be recomputed).
    pub num_preemptions_total: IntCounter,
    /// Speculative decoding: steps of a sequence that verified at least one draft token.
    pub spec_decode_num_drafts_total: IntCounter,
    /// Speculative decoding: draft tokens verified.
    pub spec_decode_num_draft_tokens_total: IntCounter,
    /// Speculative decoding: draft tokens accepted.
    pub spec_decode_num_accepted_tokens_total: IntCounter,
    /// Speculative decoding: accepted draft tokens by their position in the draft (0-based).
    pub spec_decode_num_accepted_tokens_per_pos_total: IntCounterVec,
    /// Blocks of the sliding-window layers' own pool in use (0 without a hybrid KV cache).
    pub kv_window_blocks_used: IntGauge,
    /// Blocks of the sliding-window layers' own pool (0 without a hybrid KV cache).
    pub kv_window_blocks_total: IntGauge,
    /// 1, labelled with the KV cache's configuration (vLLM's `cache_config_info`).
    pub cache_config_info: IntGaugeVec,
    /// 1, labelled with the build and the model (ours: tells a canary's series apart).
    pub build_info: IntGaugeVec,
}

/// The KV cache's configuration, as `cache_config_info` labels it.
#[derive(Debug, Clone)]
pub struct CacheConfigLabels {
    /// Tokens per block.
    pub block_size: usize,
    /// Blocks of the (main) cache.
    pub num_gpu_blocks: usize,
    /// Element type, vLLM's spelling (`auto`, `float16`, ...).
    pub cache_dtype: String,
    /// Whether prefix caching is on.
    pub enable_prefix_caching: bool,
}

/// vLLM's older names that production-stack's router still reads: (ours, alias).
const VLLM_ALIASES: &[(&str, &str)] = &[
    ("candela:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"),
    (
        "candela:prefix_cache_hits_total",
        "vllm:gpu_prefix_cache_hits_total",
    ),
    (
        "candela:prefix_cache_queries_total",
        "vllm:gpu_prefix_cache_queries_total",
    ),
];

/// A metrics construction error (a bug: the names and buckets are constants).
pub type MetricsError = prometheus::Error;

impl EngineMetrics {
    /// Creates and registers every metric in a fresh registry.
    pub fn new() -> Result<Self, MetricsError> {
        let registry = Registry::new();
        let gauge = |name: &str, help: &str| -> Result<IntGauge, MetricsError> {
            let metric = IntGauge::new(format!("candela:{name}"), help)?;
            registry.register(Box::new(metric.clone()))?;
            Ok(metric)
        };
        let counter = |name: &str, help: &str| -> Result<IntCounter, MetricsError> {
            let metric = IntCounter::new(format!("candela:{name}"), help)?;
            registry.register(Box::new(metric.clone()))?;
            Ok(metric)
        };
        let histogram =
            |name: &str, help: &str, buckets: &[f64]| -> Result<Histogram, MetricsError> {
                let metric = Histogram::with_opts(
                    HistogramOpts::new(format!("candela:{name}"), help).buckets(buckets.to_vec()),
                )?;
                registry.register(Box::new(metric.clone()))?;
                Ok(metric)
            };
        let request_success_total = IntCounterVec::new(
            Opts::new(
                "candela:request_success_total",
                "Count of finished requests by finish reason.",
            ),
            &["finished_reason"],
        )?;
        registry.register(Box::new(request_success_total.clone()))?;
        // Every reason's series exists from the start at 0: Prometheus' rate() ignores a
        // series' first sample, so an error burst right after a (re)start would otherwise not
        // show in an error-rate query (found by scripts/rehearse-replicas).
        for reason in ["stop", "tool_calls", "length", "abort", "error"] {
            request_success_total.with_label_values(&[reason]);
        }
        let kv_cache_usage_perc = Gauge::new(
            "candela:kv_cache_usage_perc",
            "KV-cache usage. 1 means 100 percent usage.",
        )?;
        registry.register(Box::new(kv_cache_usage_perc.clone()))?;
        let cache_config_info = IntGaugeVec::new(
            Opts::new(
                "candela:cache_config_info",
                "Information of the KV cache's configuration (value 1).",
            ),
            &[
                "block_size",
                "num_gpu_blocks",
                "cache_dtype",
                "enable_prefix_caching",
            ],
        )?;
        registry.register(Box::new(cache_config_info.clone()))?;
        let build_info = IntGaugeVec::new(
            Opts::new(
                "candela:build_info",
                "The build serving (value 1): version, git revision, served model.",
            ),
            &["version", "revision", "model"],
        )?;
        registry.register(Box::new(build_info.clone()))?;
        let spec_decode_num_accepted_tokens_per_pos_total = IntCounterVec::new(
            Opts::new(
                "candela:spec_decode_num_accepted_tokens_per_pos_total",
                "Accepted number of draft tokens per draft position.",
            ),
            &["position"],
        )?;
        registry.register(Box::new(
            spec_decode_num_accepted_tokens_per_pos_total.clone(),
        ))?;
        Ok(Self {
            spec_decode_num_accepted_tokens_per_pos_total,
            cache_config_info,
            build_info,
            num_requests_running: gauge(
                "num_requests_running",
                "Number of requests in model execution batches.",
            )?,
            num_requests_waiting: gauge(
                "num_requests_waiting",
                "Number of requests waiting to be processed.",
            )?,
            time_to_first_token_seconds: histogram(
                "time_to_first_token_seconds",
                "Histogram of time to first token in seconds.",
                LATENCY_BUCKETS_S,
            )?,
            inter_token_latency_seconds: histogram(
                "inter_token_latency_seconds",
                "Histogram of inter-token latency in seconds.",
                ITL_BUCKETS_S,
            )?,
            e2e_request_latency_seconds: histogram(
                "e2e_request_latency_seconds",
                "Histogram of end to end request latency in seconds.",
                LATENCY_BUCKETS_S,
            )?,
            request_queue_time_seconds: histogram(
                "request_queue_time_seconds",
                "Histogram of time spent waiting in the queue in seconds.",
                LATENCY_BUCKETS_S,
            )?,
            prompt_tokens_total: counter(
                "prompt_tokens_total",
                "Number of prefill tokens processed.",
            )?,
            generation_tokens_total: counter(
                "generation_tokens_total",
                "Number of generation tokens processed.",
            )?,
            request_success_total,
            kv_cache_usage_perc,
            kv_window_blocks_used: gauge(
                "kv_window_blocks_used",
                "KV blocks of the sliding-window layers' own pool in use.",
            )?,
            kv_window_blocks_total: gauge(
                "kv_window_blocks_total",
                "KV blocks of the sliding-window layers' own pool.",
            )?,
            prefix_cache_queries_total: counter(
                "prefix_cache_queries_total",
                "Prefix cache queries, in terms of number of queried tokens.",
            )?,
            prefix_cache_hits_total: counter(
                "prefix_cache_hits_total",
                "Prefix cache hits, in terms of number of cached tokens.",
            )?,
            num_preemptions_total: counter(
                "num_preemptions_total",
                "Cumulative number of preemptions from the engine.",
            )?,
            spec_decode_num_drafts_total: counter(
                "spec_decode_num_drafts_total",
                "Number of spec decoding drafts.",
            )?,
            spec_decode_num_draft_tokens_total: counter(
                "spec_decode_num_draft_tokens_total",
                "Number of draft tokens.",
            )?,
            spec_decode_num_accepted_tokens_total: counter(
                "spec_decode_num_accepted_tokens_total",
                "Number of accepted tokens.",
            )?,
            registry,
        })
    }

    /// Counts one finished choice under its reason's label.
    pub fn count_finished(&self, reason: &FinishReason) {
        self.request_success_total
            .with_label_values(&[finished_reason_label(reason)])
            .inc();
    }

    /// Labels `cache_config_info` and `build_info` (once, when the engine has loaded).
    pub fn set_info(&self, cache: &CacheConfigLabels, model: &str) {
        self.cache_config_info
            .with_label_values(&[
                cache.block_size.to_string().as_str(),
                cache.num_gpu_blocks.to_string().as_str(),
                cache.cache_dtype.as_str(),
                if cache.enable_prefix_caching {
                    "True"
                } else {
                    "False"
                },
            ])
            .set(1);
        self.build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION"), env!("CANDELA_REVISION"), model])
            .set(1);
    }

    /// All metrics in the Prometheus text exposition format, under both prefixes (see the
    /// module docs).
    pub fn render(&self) -> String {
        let ours = self.registry.gather();
        let mut families = ours.clone();
        for family in &ours {
            let name = family.name();
            if name == "candela:build_info" {
                continue;
            }
            if let Some(rest) = name.strip_prefix("candela:") {
                families.push(renamed(family, &format!("vllm:{rest}")));
            }
            if let Some((_, alias)) = VLLM_ALIASES.iter().find(|(n, _)| *n == name) {
                families.push(renamed(family, alias));
            }
        }
        let mut text = String::new();
        // Encoding into a String fails only on a malformed metric family, which our constant
        // names and labels cannot produce; an empty page is the honest fallback.
        if let Err(error) = TextEncoder::new().encode_utf8(&families, &mut text) {
            tracing::error!(%error, "encoding metrics");
            text.clear();
        }
        text
    }
}

/// `family` under another name.
fn renamed(family: &MetricFamily, name: &str) -> MetricFamily {
    let mut copy = family.clone();
    copy.set_name(name.to_owned());
    copy
}

/// The `finished_reason` label vLLM uses for each reason.
fn finished_reason_label(reason: &FinishReason) -> &'static str {
    match reason {
        FinishReason::Stop(_) => "stop",
        FinishReason::ToolCalls => "tool_calls",
        FinishReason::Length => "length",
        FinishReason::Abort => "abort",
        FinishReason::Error(_) => "error",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::StopCause;

    #[test]
    fn text_has_every_metric_with_the_prefix() {
        let metrics = EngineMetrics::new().expect("constant metric definitions");
        metrics.num_requests_running.set(3);
        metrics.prompt_tokens_total.inc_by(12);
        metrics.time_to_first_token_seconds.observe(0.03);
        metrics.count_finished(&FinishReason::Stop(StopCause::Eos(2)));
        metrics.count_finished(&FinishReason::Length);
        metrics.count_finished(&FinishReason::Length);
        metrics.kv_cache_usage_perc.set(0.25);
        let text = metrics.render();
        for name in [
            "candela:num_requests_running 3",
            "candela:num_requests_waiting 0",
            "candela:prompt_tokens_total 12",
            "candela:generation_tokens_total 0",
            "candela:time_to_first_token_seconds_bucket{le=\"0.04\"} 1",
            "candela:time_to_first_token_seconds_count 1",
            "candela:inter_token_latency_seconds_count 0",
            "candela:e2e_request_latency_seconds_count 0",
            "candela:request_queue_time_seconds_count 0",
            "candela:request_success_total{finished_reason=\"stop\"} 1",
            "candela:request_success_total{finished_reason=\"length\"} 2",
            "candela:kv_cache_usage_perc 0.25",
            "candela:prefix_cache_queries_total 0",
            "candela:prefix_cache_hits_total 0",
            "candela:num_preemptions_total 0",
            "candela:spec_decode_num_drafts_total 0",
            "candela:spec_decode_num_draft_tokens_total 0",
            "candela:spec_decode_num_accepted_tokens_total 0",
            "# TYPE candela:time_to_first_token_seconds histogram",
            "# TYPE candela:prompt_tokens_total counter",
        ] {
            assert!(text.contains(name), "missing {name:?} in\n{text}");
            // The same series under vLLM's prefix.
            let vllm = name.replace("candela:", "vllm:");
            assert!(text.contains(&vllm), "missing {vllm:?} in\n{text}");
        }
        for alias in [
            "vllm:gpu_cache_usage_perc 0.25",
            "vllm:gpu_prefix_cache_hits_total 0",
            "vllm:gpu_prefix_cache_queries_total 0",
        ] {
            assert!(text.contains(alias), "missing {alias:?} in\n{text}");
        }
    }

    #[test]
    fn info_gauges_carry_the_cache_config_and_the_build() {
        let metrics = EngineMetrics::new().expect("constant metric definitions");
        metrics.set_info(
            &CacheConfigLabels {
                block_size: 16,
                num_gpu_blocks: 2731,
                cache_dtype: "float16".into(),
                enable_prefix_caching: true,
            },
            "gemma",
        );
        let text = metrics.render();
        let config = "cache_config_info{block_size=\"16\",cache_dtype=\"float16\",\
                      enable_prefix_caching=\"True\",num_gpu_blocks=\"2731\"} 1";
        for prefix in ["candela:", "vllm:"] {
            assert!(text.contains(&format!("{prefix}{config}")), "{text}");
        }
        let build = format!(
            "candela:build_info{{model=\"gemma\",revision=\"{}\",version=\"{}\"}} 1",
            env!("CANDELA_REVISION"),
            env!("CARGO_PKG_VERSION")
        );
        assert!(text.contains(&build), "{text}");
        assert!(!text.contains("vllm:build_info"), "{text}");
    }

    #[test]
    fn two_engines_have_separate_registries() {
        let a = EngineMetrics::new().expect("constant metric definitions");
        let b = EngineMetrics::new().expect("constant metric definitions");
        a.generation_tokens_total.inc();
        assert!(a.render().contains("candela:generation_tokens_total 1"));
        assert!(b.render().contains("candela:generation_tokens_total 0"));
    }
}
