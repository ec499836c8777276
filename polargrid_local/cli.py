"""The polargrid-local command: pull models, list them, chat, run the demo."""
from __future__ import annotations

import argparse
import sys
import time

from .pull import PullError, is_pulled, pull
from .registry import Registry, RegistryError

API_KEYS_ENV = "POLARGRID_LOCAL_API_KEYS"


def _registry(args: argparse.Namespace) -> Registry:
    return Registry.load(args.models, args.cache_dir)


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
    from .client import PolarGridSync

    with PolarGridSync(models=args.models, cache_dir=args.cache_dir, n_threads=args.threads) as client:
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
    import logging
    import os

    from .engine import LocalEngine
    from .server import ServerConfig, make_server

    logging.basicConfig(level=getattr(logging, args.log_level.upper()), format="%(asctime)s %(levelname)s %(message)s")
    keys = list(args.api_key or []) + [k for k in os.environ.get(API_KEYS_ENV, "").split(",") if k.strip()]
    engine = LocalEngine(args.models, cache_dir=args.cache_dir, n_threads=args.threads, preload=args.preload or ())
    server = make_server(engine, ServerConfig(host=args.host, port=args.port, api_keys=[k.strip() for k in keys],
                                              rate_limit=args.rate_limit, max_body=args.max_body))
    print(f"polargrid-local serving on {server.url} ({'API keys required' if keys else 'no API key required'})",
          file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        engine.close()
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(args.models, args.cache_dir)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="polargrid-local", description="PolarGrid, running in this process.")
    parser.add_argument("--models", help="models.toml to use (default: $POLARGRID_LOCAL_MODELS or ./models.toml)")
    parser.add_argument("--cache-dir", help="model cache (default: $POLARGRID_LOCAL_CACHE or ~/.cache/polargrid-local)")
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
    p.add_argument("--max-body", type=int, default=64 * 1024 * 1024, help="largest request body in bytes")
    p.add_argument("--threads", type=int, help="CPU threads per model")
    p.add_argument("--preload", action="append", help="load this model at start (repeatable)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("demo", help="chat, and speech and transcription where installed, all offline")
    p.set_defaults(func=cmd_demo)

    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except RegistryError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
