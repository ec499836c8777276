"""The polargrid-local command: pull, list, show, rm, chat, speak, transcribe, serve, ps, cache, doctor,
install-llama."""
from __future__ import annotations

import argparse
import sys
import time

from polargrid.errors import PolarGridError

from ..limits import DEFAULT_LIMITS
from ..store.pull import PullError, is_pulled, pull
from ..store.registry import Registry, RegistryError
from .cache import add_cache_command
from .commands import add_commands

API_KEYS_ENV = "POLARGRID_LOCAL_API_KEYS"


def _registry(args: argparse.Namespace) -> Registry:
    return Registry.load(args.models, args.cache_dir, models_only=args.models_only)


def _client(args: argparse.Namespace, **local):
    from ..client import PolarGridSync

    return PolarGridSync(models=args.models, cache_dir=args.cache_dir, models_only=args.models_only, **local)


def _spec_or_exit(registry: Registry, name: str):
    spec = registry.get(name)
    if spec is None:
        print(f"unknown model {name!r}; `polargrid-local list` shows the registry", file=sys.stderr)
    return spec


def default_models(registry: Registry) -> list:
    """The default model of each kind, and the models they hand work to (the multilingual STT fallback)."""
    specs = [s for s in (registry.default(k) for k in ("chat", "embedding", "stt", "tts")) if s is not None]
    for spec in list(specs):
        fallback = registry.get(spec.engine.get("multilingual_fallback", "") or "")
        if fallback is not None and fallback not in specs:
            specs.append(fallback)
    return specs


def cmd_pull(args: argparse.Namespace) -> int:
    registry = _registry(args)
    if args.all:
        specs = list(registry.models)
    elif args.ids:
        specs = []
        for name in args.ids:
            spec = registry.get(name)
            if spec is None:
                print(f"unknown model {name!r}; `polargrid-local list` shows the registry", file=sys.stderr)
                return 2
            specs.append(spec)
    else:
        specs = default_models(registry)
    for spec in specs:
        try:
            path = pull(registry, spec, force=args.force, verify=args.verify)
        except PullError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        print(f"{spec.id}: {path}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    registry = _registry(args)
    print(f"registry: {registry.source}\ncache:    {registry.cache_dir}\n")
    print(f"{'id':28} {'kind':10} {'pulled':7} aliases")
    for spec in registry.models:
        mark = "remote" if spec.remote else "yes" if is_pulled(registry, spec) else "no"
        default = " (default)" if registry.defaults.get(spec.kind) == spec.id else ""
        print(f"{spec.id:28} {spec.kind:10} {mark:7} {', '.join(spec.aliases)}{default}")
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    with _client(args, n_threads=args.threads) as client:
        request = {"model": args.model or client.engine.registry.default("chat").id,
                   "messages": [{"role": "user", "content": args.prompt}],
                   "max_tokens": args.max_tokens, "temperature": args.temperature}
        started = time.perf_counter()
        first = None
        for chunk in client.chat_completion_stream(request, stream_options={"include_usage": True}):
            for choice in chunk.choices:
                if choice.delta.content:
                    first = first or time.perf_counter()
                    print(choice.delta.content, end="", flush=True)
            if chunk.usage:
                total = time.perf_counter() - started
                print(f"\n[{chunk.usage.completion_tokens} tokens in {total:.2f}s, "
                      f"first token after {((first or started) - started):.2f}s]", file=sys.stderr)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import dataclasses
    import logging
    import os

    from ..engine import LocalEngine
    from ..limits import DEFAULT_LIMITS
    from ..server import ServerConfig, serve

    logging.basicConfig(level=getattr(logging, args.log_level.upper()), format="%(asctime)s %(levelname)s %(message)s")
    keys = list(args.api_key or []) + [k for k in os.environ.get(API_KEYS_ENV, "").split(",") if k.strip()]
    engine = LocalEngine(args.models, cache_dir=args.cache_dir, n_threads=args.threads, preload=args.preload or (),
                         fake=args.fake, keep_alive=args.keep_alive,
                         models_only=args.models_only, prompt_cache=args.prompt_cache,
                         prompt_cache_dir=args.prompt_cache_dir, prompt_cache_bytes=args.prompt_cache_bytes,
                         prompt_cache_min_tokens=args.prompt_cache_min_tokens)
    http_limits = {name: getattr(args, name) for name in HTTP_LIMIT_FLAGS if getattr(args, name) is not None}
    limits = dataclasses.replace(getattr(engine, "limits", None) or DEFAULT_LIMITS, **http_limits)
    config = ServerConfig(host=args.host, port=args.port, api_keys=[k.strip() for k in keys],
                          rate_limit=args.rate_limit, limits=limits, metrics_open=args.metrics_open)

    def ready(server) -> None:
        print(f"polargrid-local serving on {server.url} ({'API keys required' if keys else 'no API key required'}); "
              f"playground: {server.url}/", file=sys.stderr, flush=True)

    return serve(engine, config, on_ready=ready)


# `serve` flags that set a field of Limits (the HTTP section): flag --max-body-bytes sets max_body_bytes.
HTTP_LIMIT_FLAGS = {
    "max_body_bytes": (int, "largest request body in bytes"),
    "header_timeout_s": (float, "seconds for a request line and headers to arrive"),
    "body_timeout_s": (float, "seconds for a whole request body to arrive"),
    "keep_alive_timeout_s": (float, "seconds an idle connection stays open"),
    "socket_timeout_s": (float, "seconds a single read or write may stall"),
    "max_connections": (int, "open connections; past it a new one gets 503"),
    "max_connections_per_address": (int, "open connections from one address (IPv6: one /64); past it 503"),
    "auth_failures_per_minute": (int, "failed API key checks per client address per minute before 429"),
    "auth_failures_global_per_minute": (int, "failed API key checks from all addresses per minute before 429"),
    "drain_timeout_s": (float, "on SIGTERM, seconds in-flight requests may run before they are stopped"),
}


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(args.models, args.cache_dir)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="polargrid-local", description="PolarGrid, running in this process.",
                                     allow_abbrev=False)  # else `speak --model` reads as the global --models
    parser.add_argument("--models", help="models.toml to use (default: $POLARGRID_LOCAL_MODELS or ./models.toml)")
    parser.add_argument("--cache-dir", help="model cache (default: $POLARGRID_LOCAL_CACHE or ~/.cache/polargrid-local)")
    parser.add_argument("--models-only", action="store_true",
                        help="use only the --models file, not the registry that ships with the package")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pull", help="download models into the cache (default: the default model of each kind)")
    p.add_argument("ids", nargs="*", help="model ids or aliases")
    p.add_argument("--all", action="store_true", help="every model in the registry")
    p.add_argument("--force", action="store_true", help="download again even if present")
    p.add_argument("--verify", action="store_true", help="re-check the sha256 of files already present")
    p.set_defaults(func=cmd_pull)

    p = sub.add_parser("list", help="show the registry and what is pulled")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("chat", help="stream one chat reply to stdout")
    p.add_argument("prompt")
    p.add_argument("--model")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--threads", type=int)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("serve", help="serve the PolarGrid REST API (OpenAI-compatible) over HTTP")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=55111)
    p.add_argument("--api-key", action="append", help=f"require this Bearer key (repeatable; also ${API_KEYS_ENV})")
    p.add_argument("--rate-limit", type=int, help="requests per minute per key (or per client without keys)")
    p.add_argument("--metrics-open", action="store_true", help="serve /metrics without an API key (for a scraper)")
    for name, (kind, text) in HTTP_LIMIT_FLAGS.items():
        flag = "--" + name.replace("_", "-")
        p.add_argument(flag, dest=name, type=kind, help=f"{text} (default {getattr(DEFAULT_LIMITS, name)})")
    p.add_argument("--max-body", dest="max_body_bytes", type=int, help=argparse.SUPPRESS)  # the old spelling
    p.add_argument("--threads", type=int, help="CPU threads per model")
    p.add_argument("--preload", nargs="+", action="extend", metavar="ID", help="load these models at start")
    p.add_argument("--keep-alive", help="unload a model idle this long ('5m', seconds; -1 never, the default)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--fake", action="store_true", help="serve polargrid_local.testing's fake engines (no model files)")
    p.add_argument("--prompt-cache", action=argparse.BooleanOptionalAction, default=None,
                   help="keep processed prompts' KV states on disk and restore them by prefix (default: on)")
    p.add_argument("--prompt-cache-dir", help="its folder (default: a prompt-cache folder in the model cache)")
    p.add_argument("--prompt-cache-bytes", type=int, help="the most it may hold on disk (default 1 GiB)")
    p.add_argument("--prompt-cache-min-tokens", type=int, help="shorter prompts are not saved (default 256)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("demo", help="chat, and speech and transcription where installed, all offline")
    p.set_defaults(func=cmd_demo)
    add_commands(sub)
    add_cache_command(sub)

    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except RegistryError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except PolarGridError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
