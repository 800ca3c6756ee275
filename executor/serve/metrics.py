"""The server's metrics, in the Prometheus text exposition format (version 0.0.4).

Counters and the latency histogram are updated as invocations finish; gauges (in flight, queued,
pools, workers, memory) are read from the server when /metrics is scraped.
"""
from __future__ import annotations

import collections
import threading

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
PREFIX = "executor_serve_"


class Histogram:
    def __init__(self, buckets=LATENCY_BUCKETS):
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1
                break
        else:
            self.counts[-1] += 1
        self.sum += value
        self.count += 1


class Metrics:
    def __init__(self):
        self._lock = threading.Lock()
        self.invocations: collections.Counter = collections.Counter()  # (outcome, code)
        self.latency: dict[str, Histogram] = collections.defaultdict(Histogram)  # by isolation
        self.rejected: collections.Counter = collections.Counter()  # reason
        self.pool_requests: collections.Counter = collections.Counter()  # hit | miss
        self.bundle_cache: collections.Counter = collections.Counter()  # hit | miss
        self.inprocess_dispatch: collections.Counter = collections.Counter()  # leased | worker
        self.cancels = 0

    def finished(self, outcome: str, code: str | None, isolation: str, latency_s: float) -> None:
        with self._lock:
            self.invocations[(outcome, code or "")] += 1
            self.latency[isolation].observe(latency_s)

    def count(self, counter: str, label: str) -> None:
        with self._lock:
            getattr(self, counter)[label] += 1

    def render(self, gauges: dict[str, tuple[str, float]], recycled: dict[str, int]) -> str:
        out: list[str] = []

        def family(name: str, kind: str, doc: str) -> None:
            out.append(f"# HELP {PREFIX}{name} {doc}")
            out.append(f"# TYPE {PREFIX}{name} {kind}")

        with self._lock:
            family("invocations_total", "counter", "Invocations finished, by outcome and error code.")
            for (outcome, code), n in sorted(self.invocations.items()):
                out.append(f'{PREFIX}invocations_total{{outcome="{outcome}",code="{code}"}} {n}')
            family("invocation_duration_seconds", "histogram",
                   "Time from acceptance to the finished result (queueing included), by isolation.")
            for isolation, h in sorted(self.latency.items()):
                cumulative = 0
                for bound, n in zip(h.buckets, h.counts):
                    cumulative += n
                    out.append(f'{PREFIX}invocation_duration_seconds_bucket{{isolation="{isolation}",le="{bound:g}"}} {cumulative}')
                out.append(f'{PREFIX}invocation_duration_seconds_bucket{{isolation="{isolation}",le="+Inf"}} {h.count}')
                out.append(f'{PREFIX}invocation_duration_seconds_sum{{isolation="{isolation}"}} {h.sum:.6f}')
                out.append(f'{PREFIX}invocation_duration_seconds_count{{isolation="{isolation}"}} {h.count}')
            for name, counter, label, doc in (
                ("rejected_total", self.rejected, "reason", "POSTs refused: busy (429) or draining (503)."),
                ("pool_requests_total", self.pool_requests, "result",
                 "Invocations sent to a pool that was already up (hit) or had to be started (miss)."),
                ("bundle_cache_total", self.bundle_cache, "result",
                 "Code bundles a new pool found in the node cache (hit) or fetched (miss)."),
                ("inprocess_dispatch_total", self.inprocess_dispatch, "path",
                 "In-process invocations sent straight to an idle runner lent to the server (leased) or "
                 "through its fork server (worker)."),
                ("worker_recycles_total", recycled, "reason",
                 "Warm workers retired: max_invocations, rss, or lru (pool eviction)."),
            ):
                family(name, "counter", doc)
                for value, n in sorted(counter.items()):
                    out.append(f'{PREFIX}{name}{{{label}="{value}"}} {n}')
        for name, (doc, value) in gauges.items():
            kind_name = name if name.startswith("process_") else PREFIX + name
            out.append(f"# HELP {kind_name} {doc}")
            out.append(f"# TYPE {kind_name} gauge")
            out.append(f"{kind_name} {value:g}")
        return "\n".join(out) + "\n"
