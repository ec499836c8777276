"""polargrid-local cache ls|rm|clear: the prompt cache on disk (no model is loaded to look at it)."""
from __future__ import annotations

import argparse
import sys
from datetime import datetime
from typing import Any

from .commands import _size


def _config(args: argparse.Namespace) -> Any:
    from ..llm.prompt_cache import PromptCacheConfig
    from .main import _registry

    registry = _registry(args)
    return PromptCacheConfig.resolve(True, args.dir, None, None, registry.settings, registry.cache_dir)


def cmd_cache_ls(args: argparse.Namespace) -> int:
    from ..llm.prompt_cache import store_for

    config = _config(args)
    store = store_for(config)
    entries = [e for e in store.entries() if not args.model or e.model == args.model]
    print(f"prompt cache: {config.directory}\nuse:          {_size(store.used_bytes())} of "
          f"{_size(config.max_bytes)}\n")
    if not entries:
        print("no saved prompts")
        return 0
    print(f"{'KEY':34} {'MODEL':28} {'TOKENS':>7} {'SIZE':>10}  {'PINNED':6} LAST USED")
    for e in entries:
        used = datetime.fromtimestamp(e.last_used).strftime("%Y-%m-%d %H:%M")
        print(f"{e.key:34} {e.model[:28]:28} {len(e.tokens):>7} {_size(e.size):>10}  {'yes' if e.pinned else '':6} "
              f"{used}")
    return 0


def cmd_cache_rm(args: argparse.Namespace) -> int:
    from ..llm.prompt_cache import store_for

    store = store_for(_config(args))
    entries = store.entries()
    chosen, status = [], 0
    for key in args.keys:
        matches = [e for e in entries if e.key.startswith(key)]
        if len(matches) != 1:
            print(f"{key!r} matches {len(matches)} saved prompts; `polargrid-local cache ls` shows their keys",
                  file=sys.stderr)
            status = 2
            continue
        chosen.append(matches[0])
    removed = store.remove(chosen) if chosen else 0
    print(f"removed {removed} saved prompt(s)")
    return status


def cmd_cache_clear(args: argparse.Namespace) -> int:
    from ..llm.prompt_cache import store_for

    store = store_for(_config(args))
    entries = [e for e in store.entries() if (not args.model or e.model == args.model)
               and not (args.keep_pinned and e.pinned)]
    removed = store.remove(entries) if entries else 0
    print(f"removed {removed} saved prompt(s); {_size(store.used_bytes())} left")
    return 0


def add_cache_command(sub: Any) -> None:
    """Register `cache ls|rm|clear` on the main parser's subparsers."""
    p = sub.add_parser("cache", help="the prompt cache on disk: list, remove or clear saved prompts")
    p.add_argument("--dir", help="the prompt cache folder (default: $POLARGRID_LOCAL_PROMPT_CACHE_DIR, "
                                 "models.toml's prompt_cache_dir, or a prompt-cache folder in the model cache)")
    verbs = p.add_subparsers(dest="verb", required=True)
    ls = verbs.add_parser("ls", help="saved prompts, most recently used first")
    ls.add_argument("--model", help="only this model's (its id)")
    ls.set_defaults(func=cmd_cache_ls)
    rm = verbs.add_parser("rm", help="remove saved prompts by key (a unique start of it is enough)")
    rm.add_argument("keys", nargs="+")
    rm.set_defaults(func=cmd_cache_rm)
    clear = verbs.add_parser("clear", help="remove every saved prompt (of one model with --model)")
    clear.add_argument("--model", help="only this model's (its id)")
    clear.add_argument("--keep-pinned", action="store_true", help="keep prompts pinned with cache_prompt")
    clear.set_defaults(func=cmd_cache_clear)
