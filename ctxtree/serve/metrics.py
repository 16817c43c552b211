"""Prometheus metrics of the HTTP ingress, each defined where it is declared (README lists them).

Tree-cache counters are per decoder replica (label `replica`): each is the replica's
own cumulative counter as of its latest reply to this ingress (ctxtree/serve/protocol.py
ReplicaStats), so the exported numbers are exactly the caches' (no second bookkeeping
to drift), and a replica that has gone away keeps its last values. Latencies are
histograms observed once per request or per load.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
RATE_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)


class _CacheCollector:
    def __init__(self, metrics: "Metrics"):
        self.metrics = metrics

    def collect(self):
        stats = self.metrics.cache_stats()
        docs = (
            ("hits", "Document requests served from memory, or by joining a load already in flight."),
            ("misses", "Document loads started (checksums and fingerprint verified)."),
            ("evictions", "Documents evicted to stay within the byte budget."),
            ("load_errors", "Document loads that failed (not found, corrupt, mismatch)."),
        )
        for name, doc in docs:
            family = CounterMetricFamily(f"ctxtree_tree_cache_{name}", doc, labels=["replica"])
            for s in stats:
                family.add_metric([s.replica], getattr(s, name))
            yield family
        for name, attr, doc in (("bytes", "bytes", "Bytes of context trees resident in memory."),
                                ("budget_bytes", "budget_bytes", "The tree cache's byte budget.")):
            family = GaugeMetricFamily(f"ctxtree_tree_cache_{name}", doc, labels=["replica"])
            for s in stats:
                family.add_metric([s.replica], getattr(s, attr))
            yield family


class Metrics:
    def __init__(self, backend):
        self.backend = backend
        self.registry = CollectorRegistry()
        self.registry.register(_CacheCollector(self))
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

    def cache_stats(self):
        """Every replica's latest counters; load times not yet seen go into the histogram."""
        stats, loads = self.backend.replica_stats()
        for ms in loads:
            self.load.observe(ms / 1000)
        return stats

    def render(self) -> bytes:
        return generate_latest(self.registry)
