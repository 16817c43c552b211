"""Prometheus metrics of one replica, each defined where it is declared (README lists them).

Cache counters are read from the cache's own cumulative stats at scrape time, so the
exported numbers are exactly the cache's (no second bookkeeping to drift); latencies
are histograms observed once per request or per load.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
RATE_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)


class _CacheCollector:
    def __init__(self, service):
        self.service = service

    def collect(self):
        stats = self.service.cache.stats
        for name, value, doc in (
            ("hits", stats.hits, "Document requests served from memory, or by joining a load already in flight."),
            ("misses", stats.misses, "Document loads started (checksums and fingerprint verified)."),
            ("evictions", stats.evictions, "Documents evicted to stay within the byte budget."),
            ("load_errors", stats.load_errors, "Document loads that failed (not found, corrupt, mismatch)."),
        ):
            yield CounterMetricFamily(f"ctxtree_tree_cache_{name}", doc, value=value)
        yield GaugeMetricFamily("ctxtree_tree_cache_bytes", "Bytes of context trees resident in memory.",
                                value=stats.bytes)
        yield GaugeMetricFamily("ctxtree_tree_cache_budget_bytes", "The tree cache's byte budget.",
                                value=self.service.cache.budget_bytes)


class Metrics:
    def __init__(self, service):
        self.service = service
        self.registry = CollectorRegistry()
        self.registry.register(_CacheCollector(service))
        self.requests = Counter("ctxtree_requests", "HTTP responses, by route and status code.",
                                ["path", "status"], registry=self.registry)
        self.load = Histogram("ctxtree_tree_load_seconds", "Time to load and verify one document on a cache miss.",
                              buckets=LATENCY_BUCKETS, registry=self.registry)
        self.ttft = Histogram("ctxtree_time_to_first_token_seconds",
                              "From a request reaching the replica to its first answer token "
                              "(tree loads, search and prefill included).", buckets=LATENCY_BUCKETS,
                              registry=self.registry)
        self.rate = Histogram("ctxtree_decode_tokens_per_second",
                              "Per answer: tokens generated per second after the first.",
                              buckets=RATE_BUCKETS, registry=self.registry)
        self.tokens = Counter("ctxtree_completion_tokens", "Answer tokens generated.", registry=self.registry)

    def count(self, path: str, status: int) -> None:
        # document ids stay out of label values (unbounded cardinality)
        route = "/v1/documents/{id}" if path.startswith("/v1/documents/") else path
        self.requests.labels(route, str(status)).inc()

    def observe(self, end) -> None:
        self.ttft.observe(end.timings["ttft_ms"] / 1000)
        if end.completion_tokens > 1:
            self.rate.observe(end.timings["tokens_per_s"])
        self.tokens.inc(end.completion_tokens)

    def render(self) -> bytes:
        loads = self.service.cache.stats.load_ms
        while loads:
            self.load.observe(loads.pop(0) / 1000)
        return generate_latest(self.registry)
