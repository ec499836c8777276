"""GET /metrics: Prometheus's text format, written by prometheus_client from a CollectorRegistry of this server's own.

Counted as requests happen: requests by method, route (its pattern, never the raw path) and status; request
latency by route; time to first token, prompt and generated tokens by model (engine events). Read when scraped:
requests in flight, open connections, each loaded model's queue depth and memory, and each remote model's
reachability. From each generation's usage: drafted and accepted tokens (speculative decoding) and prompts that
reused cached tokens, and how many (the prompt cache), through ``EngineEvents.drafted`` and ``.prompt_cache``.

The route needs the API key like every other one, unless the server was started with ``--metrics-open``.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..host.gpu import MB
from .app import Request, Response
from .routes import ROUTES

if TYPE_CHECKING:
    from .app import PolarGridHTTPServer

PREFIX = "polargrid_local"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
FIRST_TOKEN_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)


class ServerMetrics:
    """One server's metrics; ``close()`` stops listening to the engine."""

    def __init__(self, server: PolarGridHTTPServer) -> None:
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.server = server
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(f"{PREFIX}_http_requests", "HTTP requests answered, by method, route and status",
                                ["method", "route", "status"], registry=r)
        self.latency = Histogram(f"{PREFIX}_http_request_duration_seconds", "Time from a request's arrival to the "
                                 "end of its answer (a stream's last byte), by route", ["route"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.first_token = Histogram(f"{PREFIX}_time_to_first_token_seconds", "Time from a generation's submission "
                                     "(load and queue included) to its first text, by model", ["model"],
                                     buckets=FIRST_TOKEN_BUCKETS, registry=r)
        self.prompt_tokens = Counter(f"{PREFIX}_prompt_tokens", "Prompt tokens of finished generations", ["model"],
                                     registry=r)
        self.generated_tokens = Counter(f"{PREFIX}_generated_tokens", "Tokens generated", ["model"], registry=r)
        # Speculative decoding and the prompt cache feed these through EngineEvents (from each generation's usage).
        self.drafted_tokens = Counter(f"{PREFIX}_draft_tokens", "Tokens drafted (speculative decoding)", ["model"],
                                      registry=r)
        self.accepted_tokens = Counter(f"{PREFIX}_draft_tokens_accepted", "Draft tokens the model accepted",
                                       ["model"], registry=r)
        self.cache_hits = Counter(f"{PREFIX}_prompt_cache_hits", "Prompts that reused cached tokens", ["model"],
                                  registry=r)
        self.cache_tokens = Counter(f"{PREFIX}_prompt_cache_tokens", "Prompt tokens reused from the cache",
                                    ["model"], registry=r)
        r.register(_Live(server))
        self.events = getattr(server.engine, "events", None)
        if self.events is not None:
            self.events.subscribe(self.on_event)

    def on_event(self, kind: str, payload: Any) -> None:
        if kind == "generation":
            if payload.first_token_s is not None:
                self.first_token.labels(payload.model).observe(payload.first_token_s)
            self.prompt_tokens.labels(payload.model).inc(payload.prompt_tokens)
            self.generated_tokens.labels(payload.model).inc(payload.completion_tokens)
        elif kind == "drafted":
            model, drafted, accepted = payload
            self.drafted_tokens.labels(model).inc(drafted)
            self.accepted_tokens.labels(model).inc(accepted)
        elif kind == "prompt_cache":
            model, hit, reused = payload
            if hit:
                self.cache_hits.labels(model).inc()
            self.cache_tokens.labels(model).inc(reused)

    def request(self, method: str, path: str, status: int, seconds: float) -> None:
        """One answered request (status 499: the client left first)."""
        route = self.server.routes.label(method, path)
        self.requests.labels(method, route, str(status)).inc()
        self.latency.labels(route).observe(seconds)

    def exposition(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def close(self) -> None:
        if self.events is not None:
            self.events.unsubscribe(self.on_event)


class _Live:
    """What is read from the server and the engine at scrape time."""

    def __init__(self, server: PolarGridHTTPServer) -> None:
        self.server = server

    def describe(self) -> list[Any]:
        return []  # read at scrape time only: nothing to check when registering

    def collect(self):
        from prometheus_client.core import GaugeMetricFamily

        server, engine = self.server, self.server.engine
        yield GaugeMetricFamily(f"{PREFIX}_http_requests_in_flight", "Requests being answered (this scrape included)",
                                value=server.in_flight)
        yield GaugeMetricFamily(f"{PREFIX}_http_open_connections", "Open client connections",
                                value=server.open_connections)
        pool, registry = getattr(engine, "pool", None), getattr(engine, "registry", None)
        if pool is None or registry is None:
            return
        loaded = GaugeMetricFamily(f"{PREFIX}_model_loaded", "1 for each loaded model", labels=["model", "kind"])
        memory = GaugeMetricFamily(f"{PREFIX}_model_memory_bytes", "Memory a loaded model holds (the estimate "
                                   "made when it loaded)", labels=["model", "kind"])
        queue = GaugeMetricFamily(f"{PREFIX}_queue_depth", "Requests (prompts) queued or running on a loaded model",
                                  labels=["model"])
        for entry in engine.get_model_status().models:
            loaded.add_metric([entry.model, entry.kind], 1)
            memory.add_metric([entry.model, entry.kind], entry.memory_mb * MB)
            spec = registry.get(entry.model)
            queue.add_metric([entry.model], pool.queue_depth(spec) if spec is not None else 0)
        yield from (loaded, memory, queue)
        remote = GaugeMetricFamily(f"{PREFIX}_remote_up", "1 when a remote model's server answers (status: up, "
                                   "down, or offline under the offline guard)", labels=["model", "status"])
        for spec in registry.models:
            if spec.remote is not None:
                state = engine.reachability(spec)
                remote.add_metric([spec.id, state], 1 if state == "up" else 0)
        yield remote


@ROUTES.add("GET", "/metrics")
def metrics(engine: Any, request: Request) -> Response:
    body, content_type = request.server.metrics.exposition()
    return Response(200, body, content_type=content_type)
