"""GET /metrics: the runner's state in the Prometheus text format, read at scrape time."""
from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from ringllm.serve.runner import RATE_WINDOW_S, TOKENS_PER_PASS_BUCKETS


class RunnerCollector:
    def __init__(self, runner):
        self.runner = runner

    def collect(self):
        s = self.runner.stats()
        window = f" (over the last {RATE_WINDOW_S:.0f} s)"
        yield GaugeMetricFamily("ringllm_requests_running", "requests in the engine's batch", value=s.running)
        yield GaugeMetricFamily("ringllm_requests_waiting", "requests admitted, waiting for a batch row",
                                value=s.waiting)
        yield GaugeMetricFamily("ringllm_requests_in_flight", "requests admitted and not finished",
                                value=s.admitted)
        yield GaugeMetricFamily("ringllm_kv_tokens_used", "KV-cache token slots in use", value=s.kv_tokens_used)
        yield GaugeMetricFamily("ringllm_tokens_per_second", "tokens generated per second" + window,
                                value=s.tokens_per_second)
        yield GaugeMetricFamily("ringllm_passes_per_second", "engine passes per second" + window,
                                value=s.passes_per_second)
        yield GaugeMetricFamily("ringllm_seconds_per_pass", "mean seconds of an engine pass" + window,
                                value=s.seconds_per_pass or 0.0)
        yield CounterMetricFamily("ringllm_generated_tokens", "tokens generated", value=s.tokens_total)
        yield CounterMetricFamily("ringllm_passes", "engine passes", value=s.passes_total)
        yield CounterMetricFamily("ringllm_pass_seconds", "seconds spent in engine passes",
                                  value=s.pass_seconds_total)
        cumulative, buckets = 0, []
        for bound, n in zip((*map(str, TOKENS_PER_PASS_BUCKETS), "+Inf"), s.tokens_per_pass_buckets):
            cumulative += n
            buckets.append((bound, cumulative))
        yield HistogramMetricFamily("ringllm_tokens_per_pass", "tokens one pass gave one request (more than 1: "
                                    "its draft was accepted)", buckets=buckets, sum_value=s.tokens_total)
        yield CounterMetricFamily("ringllm_draft_tokens", "draft tokens verified (finished requests)",
                                  value=s.drafted_total)
        yield CounterMetricFamily("ringllm_draft_accepted_tokens", "draft tokens accepted (finished requests)",
                                  value=s.accepted_total)


def metrics_response(runner) -> tuple[bytes, str]:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(RunnerCollector(runner))
    return generate_latest(registry), CONTENT_TYPE_LATEST
