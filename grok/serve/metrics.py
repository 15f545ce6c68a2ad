"""Prometheus metrics of the server, in a registry of its own (so that several servers in
one process, as in tests, never collide in the global one)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily

from grok.routing import PHASES, ExpertUsage

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Seconds: from a fast CPU decode step to a long generation on a loaded server.
_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            30.0, 60.0, 120.0)
_E2E = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)


class Metrics:
    """Everything /metrics shows. Updated by the device thread (gauges, latencies, tokens)
    and the handlers (rejections); prometheus_client's types are thread-safe."""

    def __init__(self, max_batch: int):
        r = self.registry = CollectorRegistry()
        self.running = Gauge("grok_requests_running", "Requests holding a slot", registry=r)
        self.waiting = Gauge("grok_requests_waiting", "Requests waiting for a slot",
                             registry=r)
        self.slots_in_use = Gauge("grok_slots_in_use", "KV-cache slots in use", registry=r)
        self.slots = Gauge("grok_slots", "KV-cache slots in all (--max-batch)", registry=r)
        self.slots.set(max_batch)
        self.ttft = Histogram("grok_time_to_first_token_seconds",
                              "From a request's arrival to its first token", buckets=_LATENCY,
                              registry=r)
        self.itl = Histogram("grok_inter_token_latency_seconds",
                             "Between consecutive tokens of a request", buckets=_LATENCY,
                             registry=r)
        self.e2e = Histogram("grok_request_latency_seconds",
                             "From a request's arrival to its last token", buckets=_E2E,
                             registry=r)
        self.prompt_tokens = Counter("grok_prompt_tokens", "Prompt tokens of admitted requests",
                                     registry=r)
        self.generation_tokens = Counter("grok_generation_tokens", "Tokens generated",
                                         registry=r)
        self.prompt_tokens_computed = Counter(
            "grok_prompt_tokens_computed", "Prompt tokens prefilled (not served by the prefix "
            "cache)", registry=r)
        self.prefix_queries = Counter(
            "grok_prefix_cache_queries", "Prompt tokens of requests admitted with the prefix "
            "cache on (vLLM's prefix_cache_queries)", registry=r)
        self.prefix_hits = Counter(
            "grok_prefix_cache_hits", "Prompt tokens served by the prefix cache (vLLM's "
            "prefix_cache_hits)", registry=r)
        self.prefix_evictions = Counter(
            "grok_prefix_cache_evictions", "Cached blocks dropped for newer ones", registry=r)
        self.prefix_blocks = Gauge("grok_prefix_cache_blocks",
                                   "Blocks the prefix cache holds in all", registry=r)
        self.prefix_blocks_in_use = Gauge(
            "grok_prefix_cache_blocks_in_use", "Blocks holding cached tokens", registry=r)
        self.prefix_blocks_held = Gauge(
            "grok_prefix_cache_blocks_held", "Blocks running requests hold (never evicted)",
            registry=r)
        self.finished = Counter(
            "grok_requests_finished",
            "Requests ended, by reason: the engine's eos, stop or length, or cancelled "
            "(client gone or shutdown) or failed", ["reason"], registry=r)
        self.rejected = Counter("grok_requests_rejected",
                                "Requests answered without generating, by HTTP status",
                                ["status"], registry=r)

    def watch_routing(self, usage: Callable[[], ExpertUsage | None]) -> None:
        """Exposes the model's expert-routing tallies, read from `usage` at each scrape
        (None while the model loads)."""
        self.registry.register(_RoutingCollector(usage))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _RoutingCollector:
    """Expert-routing tallies as counters labelled by phase, layer and expert, so that a
    deployment's routing can be graphed over time (rates of `grok_expert_tokens_total`)."""

    def __init__(self, usage: Callable[[], ExpertUsage | None]):
        self.usage = usage

    def describe(self):
        return []  # values appear once the model has loaded

    def collect(self):
        tokens = CounterMetricFamily(
            "grok_expert_tokens", "Tokens routed to the expert (one of their top-2 choices)",
            labels=["phase", "layer", "expert"])
        gates = CounterMetricFamily(
            "grok_expert_gate_mass", "Summed gate weight of the tokens routed to the expert",
            labels=["phase", "layer", "expert"])
        entropy = CounterMetricFamily(
            "grok_router_entropy_nats", "Summed entropy of the layer's router distribution",
            labels=["phase", "layer"])
        routed = CounterMetricFamily("grok_routed_tokens", "Tokens whose routing was counted",
                                     labels=["phase"])
        usage = self.usage()
        if usage is not None:
            for phase in PHASES:
                counts = usage.counts(phase)
                mass = getattr(usage, f"{phase}_gate_mass")
                n = getattr(usage, f"{phase}_tokens")
                routed.add_metric([phase], n)
                for layer in range(counts.shape[0]):
                    entropy.add_metric([phase, str(layer)],
                                       float(getattr(usage, f"{phase}_entropy")[layer] * n))
                    for expert in range(counts.shape[1]):
                        labels = [phase, str(layer), str(expert)]
                        tokens.add_metric(labels, int(counts[layer, expert]))
                        gates.add_metric(labels, float(mass[layer, expert]))
        yield from (tokens, gates, entropy, routed)
