"""The Ollama-style commands of polargrid-local: ps, show, rm, speak, transcribe, doctor, install-llama."""
from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

from ..runtime.keep_alive import describe
from ..store.registry import ModelSpec, Registry

DEFAULT_URL = "http://127.0.0.1:55111"
SPEECH_FORMATS = ("mp3", "opus", "aac", "flac", "wav", "pcm")


def _registry(args: argparse.Namespace) -> Registry:
    from .main import _registry

    return _registry(args)


def _lookup(registry: Registry, name: str) -> ModelSpec | None:
    spec = registry.get(name)
    if spec is None:
        print(f"unknown model {name!r}; `polargrid-local list` shows the registry", file=sys.stderr)
    return spec


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


# -- ps -----------------------------------------------------------------------------------

def cmd_ps(args: argparse.Namespace) -> int:
    """Loaded models of a running `polargrid-local serve` (models live in the serving process)."""
    url = args.url.rstrip("/") + "/v1/models/status"
    request = urllib.request.Request(url)
    key = args.api_key or next((k.strip() for k in os.environ.get("POLARGRID_LOCAL_API_KEYS", "").split(",")
                                if k.strip()), None)
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            status = json.load(response)
    except urllib.error.HTTPError as exc:
        print(f"error: {url} answered HTTP {exc.code}" + (" (pass --api-key)" if exc.code == 401 else ""),
              file=sys.stderr)
        return 1
    except OSError:
        print(f"nothing is running at {args.url} (start one with `polargrid-local serve`)")
        return 0
    models = status.get("models") or [{"model": m} for m in status.get("loaded", [])]
    if not models:
        print("no model is loaded")
        return 0
    now = datetime.now(timezone.utc)
    print(f"{'NAME':28} {'KIND':10} {'MEMORY':>9}  {'LAST USED':12} {'KEEP ALIVE':12} UNLOADS IN")
    for m in models:
        last = m.get("last_used")
        ago = f"{(now - datetime.fromisoformat(last)).total_seconds():.0f}s ago" if last else "?"
        left = "busy" if m.get("in_flight") else describe(m.get("expires_in_s"))
        print(f"{m['model']:28} {m.get('kind', '?'):10} {m.get('memory_mb', 0):>6} MB  {ago:12} "
              f"{describe(m.get('keep_alive_s')):12} {'never' if left == 'forever' else left}")
    return 0


# -- show, rm -----------------------------------------------------------------------------

def cmd_show(args: argparse.Namespace) -> int:
    from ..store.pull import model_dir

    registry = _registry(args)
    spec = _lookup(registry, args.id)
    if spec is None:
        return 2
    print(f"id:          {spec.id}\nkind:        {spec.kind}\naliases:     {', '.join(spec.aliases) or '-'}")
    print(f"description: {spec.description or '-'}\nowned by:    {spec.owned_by}")
    if spec.parameters:
        print(f"parameters:  {spec.parameters:,}")
    print(f"registry:    {registry.source}\npath:        {spec.path_in(registry.cache_dir)}")
    print("files:")
    for f in spec.files:
        target = model_dir(registry, spec) / f.path
        present = "pulled" if target.is_file() else "not pulled"
        source = f"hf {f.hf}" if f.hf else "pypi " + " + ".join(f"{p.package}=={p.version}" for p in f.pypi)
        print(f"  {f.path}  {_size(f.size) if f.size else '?'}  {present}\n    sha256 {f.sha256 or '-'}\n    {source}")
    if spec.local:
        print(f"  local file, used in place: {spec.local}")
    if spec.engine:
        print("engine:")
        for key, value in spec.engine.items():
            if key != "chat_template":
                print(f"  {key} = {json.dumps(value)}")
    if spec.kind == "chat":
        print(f"template:\n  {_template(registry, spec) or '(none)'}")
    return 0


def _template(registry: Registry, spec: ModelSpec) -> str | None:
    if spec.engine.get("chat_template"):
        return spec.engine["chat_template"] + "\n  (from models.toml)"
    path = spec.path_in(registry.cache_dir)
    if not path.is_file():
        return "(in the GGUF; pull the model to see it)"
    from ..runtime.memory import gguf_metadata

    try:
        template = gguf_metadata(str(path)).get("tokenizer.chat_template")
    except (OSError, ValueError):
        return None
    return f"{template}\n  (from the GGUF)" if template else None


def cmd_rm(args: argparse.Namespace) -> int:
    """Delete a pulled model's files; a blob stays while another pulled model links it."""
    import shutil

    from ..store.pull import model_dir

    registry = _registry(args)
    status = 0
    for name in args.ids:
        spec = _lookup(registry, name)
        if spec is None:
            status = 2
            continue
        if spec.local:
            print(f"{spec.id} is a local file used in place ({spec.local}); nothing to remove")
            continue
        folder = model_dir(registry, spec)
        if not folder.exists():
            print(f"{spec.id} is not pulled")
            continue
        freed = 0
        for f in spec.files:
            target = folder / f.path
            if not target.is_file():
                continue
            blob = registry.cache_dir / "blobs" / f.sha256 if f.sha256 else None
            same = blob is not None and blob.is_file() and os.path.samefile(blob, target)
            if target.stat().st_nlink <= (2 if same else 1):  # the last name of these bytes besides the blob
                freed += target.stat().st_size
            target.unlink()
            if blob is not None and blob.is_file() and blob.stat().st_nlink <= 1:  # no other model links it
                if not same:
                    freed += blob.stat().st_size
                blob.unlink()
        shutil.rmtree(folder, ignore_errors=True)
        print(f"removed {spec.id}; freed {_size(freed)}")
    return status


# -- speak, transcribe ----------------------------------------------------------------------

def cmd_speak(args: argparse.Namespace) -> int:
    from .main import _client

    fmt = args.format or (Path(args.output).suffix.lstrip(".").lower() if args.output else "") or "mp3"
    if fmt not in SPEECH_FORMATS:
        print(f"error: unknown format {fmt!r}; choose one of {', '.join(SPEECH_FORMATS)}", file=sys.stderr)
        return 2
    request = {"input": args.text, "voice": args.voice, "speed": args.speed, "response_format": fmt}
    if args.model:
        request["model"] = args.model
    with _client(args) as client:
        if "model" not in request:
            request["model"] = client.engine.registry.default("tts").id
        audio = client.text_to_speech(request)
    if args.output in (None, "-"):
        sys.stdout.buffer.write(audio)
        sys.stdout.buffer.flush()
    else:
        Path(args.output).write_bytes(audio)
        print(f"{args.output}: {_size(len(audio))} of {fmt}", file=sys.stderr)
    return 0


def cmd_transcribe(args: argparse.Namespace) -> int:
    from .main import _client

    request = {"response_format": args.format}
    for key in ("language", "prompt", "model"):
        if getattr(args, key):
            request[key] = getattr(args, key)
    with _client(args) as client:
        if "model" not in request:
            request["model"] = client.engine.registry.default("stt").id
        if args.translate:
            request.pop("language", None)
            result = client.translate(args.file, request)
        else:
            result = client.transcribe(args.file, request)
    text = result if isinstance(result, str) else json.dumps(result.model_dump(mode="json", exclude_none=True),
                                                             indent=2, ensure_ascii=False)
    print(text.rstrip("\n"))
    return 0


# -- doctor, install-llama ------------------------------------------------------------------

def cmd_doctor(args: argparse.Namespace) -> int:
    from ..host.doctor import FAIL, render, run_checks

    rows = run_checks(_registry(args), verify=not args.quick, port=args.port)
    print(render(rows))
    failed = [r for r in rows if r.status == FAIL]
    print(f"\n{len(failed)} problem(s) found" if failed else "\nall good")
    return 1 if failed else 0


def cmd_install_llama(args: argparse.Namespace) -> int:
    from ..host.build_llama import main as build

    argv = [*(["--cuda"] if args.cuda else []), *(["--cuda-arch", args.cuda_arch] if args.cuda_arch else []),
            *(["--allow-amx"] if args.allow_amx else []), *(["--print-flags"] if args.print_flags else [])]
    return build(argv)


def add_commands(sub) -> None:
    """Register the commands above on the main parser's subparsers."""
    p = sub.add_parser("ps", help="models loaded by a running `polargrid-local serve`")
    p.add_argument("--url", default=DEFAULT_URL, help=f"the server (default {DEFAULT_URL})")
    p.add_argument("--api-key", help="Bearer key, if the server requires one")
    p.set_defaults(func=cmd_ps)

    p = sub.add_parser("show", help="a model's registry entry, files, sizes, template and engine settings")
    p.add_argument("id")
    p.set_defaults(func=cmd_show)

    p = sub.add_parser("rm", help="delete pulled models (blobs other models share are kept)")
    p.add_argument("ids", nargs="+")
    p.set_defaults(func=cmd_rm)

    p = sub.add_parser("speak", help="text to speech into a file")
    p.add_argument("text")
    p.add_argument("-o", "--output", help="file to write (default: stdout); its suffix picks the format")
    p.add_argument("--voice", default="alloy")
    p.add_argument("--speed", type=float, default=1.0)
    p.add_argument("--format", choices=SPEECH_FORMATS)
    p.add_argument("--model")
    p.set_defaults(func=cmd_speak)

    p = sub.add_parser("transcribe", help="speech to text from an audio file")
    p.add_argument("file")
    p.add_argument("--format", default="text", choices=["json", "text", "srt", "vtt", "verbose_json"])
    p.add_argument("--language", help="ISO 639-1 code of the speech, e.g. fr")
    p.add_argument("--translate", action="store_true", help="English text, whatever the spoken language")
    p.add_argument("--prompt")
    p.add_argument("--model")
    p.set_defaults(func=cmd_transcribe)

    p = sub.add_parser("doctor", help="check this installation; exits non-zero if something is broken")
    p.add_argument("--quick", action="store_true", help="skip the sha256 check of pulled models")
    p.add_argument("--port", type=int, default=55111)
    p.set_defaults(func=cmd_doctor)

    p = sub.add_parser("install-llama", help="rebuild llama-cpp-python for this CPU (or CUDA) into this environment")
    p.add_argument("--cuda", action="store_true")
    p.add_argument("--cuda-arch")
    p.add_argument("--allow-amx", action="store_true")
    p.add_argument("--print-flags", action="store_true")
    p.set_defaults(func=cmd_install_llama)
