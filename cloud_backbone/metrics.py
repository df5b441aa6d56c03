"""The service's Prometheus metrics, in a registry of their own (one per service instance)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.active_sessions = Gauge("plora_active_sessions", "Open device sessions.", registry=self.registry)
        self.tokens = Counter(
            "plora_tokens", "Tokens through the cloud layers (rate() gives tokens/s).", ["step"], registry=self.registry
        )
        self.wire_bytes = Counter("plora_wire_bytes", "Bytes of session messages.", ["direction"], registry=self.registry)
        self.round_trip = Histogram(
            "plora_adapter_round_trip_seconds",
            "Time from sending u to a device until its reply arrived, per layer.",
            ["layer"],
            buckets=(1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 0.1, 1.0),
            registry=self.registry,
        )
        self.step_errors = Counter("plora_step_errors", "Failed steps, by error kind.", ["kind"], registry=self.registry)
        self.accounted_bytes = Gauge(
            "plora_accounted_bytes", "Bytes the sessions hold, by kind (kv, graph, pending).", ["kind"], registry=self.registry
        )

    def track_batching(self, counts: Callable[[], dict[str, int]]) -> None:
        """Report what the batchers ran, read at each scrape: rows ÷ batches is the steps a pass held."""
        batched = Gauge(
            "plora_batched",
            "Since the service started: passes shared by several sessions' steps (batches) and the steps they ran "
            "(rows); batched backwards of training steps and their steps (backward_rows).",
            ["what"], registry=self.registry,
        )
        for what in counts():
            batched.labels(what).set_function(lambda what=what: counts()[what])

    def track_memory(self, used: Callable[[], dict[str, int]]) -> None:
        """Report the memory budget's figures, read at each scrape."""
        for kind in used():
            self.accounted_bytes.labels(kind).set_function(lambda kind=kind: used()[kind])

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
