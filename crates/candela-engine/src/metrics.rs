//! The engine's Prometheus metrics, with vLLM's names under a `candela:` prefix so existing
//! dashboards and autoscalers work with a rename. One [`Registry`] per engine (never the
//! process-global default), so several engines (tests, replicas in one process) do not collide.
//!
//! The engine thread updates the metrics; any thread may render them with [`EngineMetrics::render`].

use prometheus::{
    Gauge, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
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
    /// Blocks of the sliding-window layers' own pool in use (0 without a hybrid KV cache).
    pub kv_window_blocks_used: IntGauge,
    /// Blocks of the sliding-window layers' own pool (0 without a hybrid KV cache).
    pub kv_window_blocks_total: IntGauge,
}

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
        let kv_cache_usage_perc = Gauge::new(
            "candela:kv_cache_usage_perc",
            "KV-cache usage. 1 means 100 percent usage.",
        )?;
        registry.register(Box::new(kv_cache_usage_perc.clone()))?;
        Ok(Self {
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
            registry,
        })
    }

    /// Counts one finished choice under its reason's label.
    pub fn count_finished(&self, reason: &FinishReason) {
        self.request_success_total
            .with_label_values(&[finished_reason_label(reason)])
            .inc();
    }

    /// All metrics in the Prometheus text exposition format.
    pub fn render(&self) -> String {
        let mut text = String::new();
        // Encoding into a String fails only on a malformed metric family, which our constant
        // names and labels cannot produce; an empty page is the honest fallback.
        if let Err(error) = TextEncoder::new().encode_utf8(&self.registry.gather(), &mut text) {
            tracing::error!(%error, "encoding metrics");
            text.clear();
        }
        text
    }
}

/// The `finished_reason` label vLLM uses for each reason.
fn finished_reason_label(reason: &FinishReason) -> &'static str {
    match reason {
        FinishReason::Stop(_) => "stop",
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
            "# TYPE candela:time_to_first_token_seconds histogram",
            "# TYPE candela:prompt_tokens_total counter",
        ] {
            assert!(text.contains(name), "missing {name:?} in\n{text}");
        }
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
