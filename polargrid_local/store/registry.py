"""The model registry: ``models.toml`` parsed into ModelSpec entries, resolved by id or alias."""
from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ModelKind = Literal["chat", "embedding", "stt", "tts", "rerank"]
KINDS: tuple[str, ...] = ("chat", "embedding", "stt", "tts", "rerank")

MODELS_FILE_ENV = "POLARGRID_LOCAL_MODELS"
PACKAGE_DIR = Path(__file__).resolve().parent.parent
PACKAGED_MODELS = PACKAGE_DIR / "models.toml"          # copied in by setup.py's build_py
CHECKOUT_MODELS = PACKAGE_DIR.parent / "models.toml"   # the source, in a git checkout
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
# PEP 508's name pattern: a package name can never be a path (no '/', no '..').
PACKAGE_NAME = re.compile(r"^([A-Z0-9]|[A-Z0-9][A-Z0-9._-]*[A-Z0-9])$", re.IGNORECASE)
# What a PEP 440 version may contain (pip checks the rest); it is part of a folder name under downloads/.
PACKAGE_VERSION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.!+_-]*$")
# The cache's own folders beside the model folders: a model with one of these ids would share (and `rm`
# would delete) the blob store or the pull's download folder.
RESERVED_IDS = frozenset({"blobs", "downloads", "tmp", "locks"})
CACHE_DIR_ENV = "POLARGRID_LOCAL_CACHE"


class RegistryError(ValueError):
    """models.toml is missing, malformed, or names something it does not define."""


@dataclass(frozen=True)
class PyPIPart:
    """One member of a wheel: ``package==version:path/inside/wheel``."""

    package: str
    version: str
    member: str

    @classmethod
    def parse(cls, text: str) -> PyPIPart:
        try:
            requirement, member = text.split(":", 1)
            package, version = requirement.split("==", 1)
        except ValueError:
            raise RegistryError(f"pypi source {text!r} must read 'package==version:member/path'") from None
        package, version = package.strip(), version.strip()
        if not PACKAGE_NAME.match(package):
            raise RegistryError(f"pypi source {text!r}: {package!r} is not a package name (PEP 508: letters, digits, "
                                "'.', '_' and '-', starting and ending with a letter or digit)")
        if not PACKAGE_VERSION.match(version):
            raise RegistryError(f"pypi source {text!r}: {version!r} is not a package version")
        return cls(package, version, member.strip())


@dataclass(frozen=True)
class FileSpec:
    """One file of a model, where to get it, and its sha256."""

    path: str
    sha256: str | None = None
    size: int | None = None
    pypi: tuple[PyPIPart, ...] = ()
    hf: str | None = None  # "owner/repo[@revision]:path/in/repo"
    convert: str | None = None  # "converter:folder": made at pull time from files pulled before it (convert.py)

    @property
    def source_kind(self) -> str:
        return "pypi" if self.pypi else "hf" if self.hf else "convert" if self.convert else "none"


@dataclass(frozen=True)
class RemoteSpec:
    """An OpenAI-compatible server that serves a model: ``[models.remote]`` in models.toml."""

    base_url: str                   # the /v1 root, e.g. http://gpu-box:8000/v1
    model: str                      # the model's name on that server
    api_key_env: str | None = None  # the NAME of the environment variable holding the key, never the key
    timeout: float = 60.0           # seconds per connect/read; also the deadline for retries
    max_retries: int = 3            # connection errors, 429 and 503 are retried with backoff
    # Bounds on what the remote may send back (past one the caller gets a 502 that names it):
    max_response_bytes: int = 64 * 1024 * 1024  # one answer's body: JSON, a whole event stream, or audio
    max_sse_line_bytes: int = 1024 * 1024       # one line of an event stream, counted as it arrives
    max_sse_event_bytes: int = 4 * 1024 * 1024  # one event: its lines together, up to the blank line
    max_chunks: int = 100_000                   # chunks collected for a non-streamed chat or completion


@dataclass(frozen=True)
class ModelSpec:
    """A registry entry: identity, kind, engine settings, and where its files come from."""

    id: str
    kind: ModelKind
    aliases: tuple[str, ...] = ()
    owned_by: str = "local"
    description: str = ""
    parameters: int | None = None
    entry: str | None = None
    files: tuple[FileSpec, ...] = ()
    local: str | None = None
    engine: dict[str, Any] = field(default_factory=dict)
    created: int = 0
    remote: RemoteSpec | None = None
    fallback: tuple[str, ...] = ()  # models that answer when this one is full, refused, unpulled or unreachable

    @property
    def names(self) -> tuple[str, ...]:
        return (self.id, *self.aliases)

    def path_in(self, cache_dir: Path) -> Path:
        """Where the model's entry file (or folder) lives once pulled."""
        if self.local:
            return Path(os.path.expanduser(self.local))
        base = cache_dir / self.id
        return base / self.entry if self.entry else base


def default_cache_dir() -> Path:
    """Where pulled models live: $POLARGRID_LOCAL_CACHE, else the user's cache home."""
    env = os.environ.get(CACHE_DIR_ENV)
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or (Path.home() / ".cache")
    return Path(base) / "polargrid-local" / "models"


def packaged_models_file() -> Path:
    """The registry that ships with the library: inside the installed package, else the checkout's root file."""
    return PACKAGED_MODELS if PACKAGED_MODELS.is_file() else CHECKOUT_MODELS


def user_models_file() -> Path | None:
    """The user's registry, if any: $POLARGRID_LOCAL_MODELS, else ./models.toml."""
    env = os.environ.get(MODELS_FILE_ENV)
    if env:
        return Path(env).expanduser()
    cwd = Path.cwd() / "models.toml"
    return cwd if cwd.is_file() else None


def default_models_file() -> Path:
    """The user's registry if there is one, else the packaged one."""
    return user_models_file() or packaged_models_file()


def _read_toml(file: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RegistryError(f"models file not found: {file}") from None
    except tomllib.TOMLDecodeError as exc:
        raise RegistryError(f"{file}: {exc}") from None


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except OSError:
        return False


class Registry:
    """Every model the library knows, indexed by id and alias (case-insensitive)."""

    def __init__(self, models: list[ModelSpec], defaults: dict[str, str], cache_dir: Path, source: str = "",
                 settings: dict[str, Any] | None = None) -> None:
        self.models = models
        self.settings = settings or {}
        self.defaults = defaults
        self.cache_dir = cache_dir
        self.source = source
        self.files: list[Path] = []
        self._by_name: dict[str, ModelSpec] = {}
        for spec in models:
            for name in spec.names:
                key = name.lower()
                if key in self._by_name and self._by_name[key] is not spec:
                    raise RegistryError(f"{source}: name {name!r} is used by {self._by_name[key].id!r} and {spec.id!r}")
                self._by_name[key] = spec
        for spec in models:
            for other in spec.fallback:
                target = self._by_name.get(other.lower())
                if target is None or target.kind != spec.kind or target is spec:
                    raise RegistryError(f"{source}: model {spec.id!r} falls back to {other!r}, which is not "
                                        f"another {spec.kind} model of this registry")
        for kind, model_id in defaults.items():
            if kind not in KINDS:
                raise RegistryError(f"{source}: [defaults] has unknown kind {kind!r}")
            if model_id.lower() not in self._by_name:
                raise RegistryError(f"{source}: default {kind} model {model_id!r} is not defined")

    @classmethod
    def load(cls, path: str | Path | None = None, cache_dir: str | Path | None = None, *,
             models_only: bool = False) -> Registry:
        """The packaged registry, overlaid by the user's file (``path``, else $POLARGRID_LOCAL_MODELS, else
        ./models.toml). A user entry replaces the packaged entry with the same id, and takes over any alias
        it claims; [defaults] and [settings] are overridden key by key. ``models_only=True`` (or
        ``[settings] replace_defaults = true`` in the user's file) uses the user's file alone."""
        packaged = packaged_models_file()
        user = Path(path) if path else user_models_file()
        user_data = _read_toml(user) if user is not None else None
        layers: list[tuple[Path, dict[str, Any]]]
        if user is None or user_data is None or _same_file(user, packaged):
            layers = [(packaged, _read_toml(packaged))]
        elif models_only or user_data.get("settings", {}).get("replace_defaults"):
            layers = [(user, user_data)]
        else:
            layers = [(packaged, _read_toml(packaged)), (user, user_data)]
        settings: dict[str, Any] = {}
        defaults: dict[str, str] = {}
        models: dict[str, ModelSpec] = {}
        for file, data in layers:
            settings.update(data.get("settings", {}))
            defaults.update(data.get("defaults", {}))
            layer = [_parse_model(raw, str(file)) for raw in data.get("models", [])]
            claimed = {name.lower() for spec in layer for name in spec.names}
            for model_id, spec in list(models.items()):  # an earlier layer gives up names this one claims
                if model_id.lower() in claimed:
                    del models[model_id]
                elif any(a.lower() in claimed for a in spec.aliases):
                    models[model_id] = replace(spec, aliases=tuple(a for a in spec.aliases if a.lower() not in claimed))
            for spec in layer:
                if spec.id in models:
                    raise RegistryError(f"{file}: model id {spec.id!r} is defined twice")
                models[spec.id] = spec
        configured = settings.get("cache_dir") and not os.environ.get(CACHE_DIR_ENV)
        cache = Path(cache_dir) if cache_dir else (
            Path(os.path.expanduser(settings["cache_dir"])) if configured else default_cache_dir())
        source = " + ".join(str(file) for file, _ in layers)
        registry = cls(list(models.values()), defaults, cache, source, settings)
        registry.files = [file for file, _ in layers]
        return registry

    def get(self, name: str) -> ModelSpec | None:
        """The model with this id or alias, or None."""
        return self._by_name.get(name.strip().lower()) if name else None

    def default(self, kind: str) -> ModelSpec | None:
        """The default model of a kind, if the registry names one."""
        name = self.defaults.get(kind)
        if name:
            return self.get(name)
        return next((m for m in self.models if m.kind == kind), None)

    def of_kind(self, *kinds: str) -> list[ModelSpec]:
        return [m for m in self.models if m.kind in kinds]


def id_problem(model_id: str) -> str | None:
    """Why ``model_id`` cannot name a folder of the model cache, or None when it can."""
    if "/" in model_id or "\\" in model_id or model_id.startswith("."):
        return "ids may not contain path separators or start with '.'"
    if model_id.lower() in RESERVED_IDS:
        return (f"the id {model_id!r} is reserved for the model cache's own folders "
                f"({', '.join(sorted(RESERVED_IDS))}); choose another id")
    return None


def _parse_model(raw: dict[str, Any], source: str) -> ModelSpec:
    where = f"{source}: model {raw.get('id', '?')!r}"
    model_id = raw.get("id")
    if not model_id or not isinstance(model_id, str):
        raise RegistryError(f"{source}: every [[models]] entry needs a string id")
    problem = id_problem(model_id)
    if problem:
        raise RegistryError(f"{where}: {problem}")
    kind = raw.get("kind")
    if kind not in KINDS:
        raise RegistryError(f"{where}: kind must be one of {', '.join(KINDS)}")
    files = tuple(_parse_file(f, where) for f in raw.get("files", []))
    entry = raw.get("entry")
    if entry is not None and not _safe_relative(entry):
        raise RegistryError(f"{where}: entry {entry!r} must be a relative path inside the model, without '..'")
    remote = _parse_remote(raw["remote"], where) if "remote" in raw else None
    if not files and not raw.get("local") and remote is None:
        raise RegistryError(f"{where}: needs files (with pypi or hf sources), a local path, or a [models.remote] table")
    if remote is not None and (files or raw.get("local")):
        raise RegistryError(f"{where}: a remote model has no files or local path")
    fallback = raw.get("fallback", [])
    if isinstance(fallback, str):
        fallback = [fallback]
    if not isinstance(fallback, list) or not all(isinstance(f, str) and f for f in fallback):
        raise RegistryError(f"{where}: fallback must be a list of model ids")
    return ModelSpec(
        id=model_id,
        kind=kind,
        aliases=tuple(raw.get("aliases", [])),
        owned_by=raw.get("owned_by", "remote" if remote else "local"),
        description=raw.get("description", ""),
        parameters=raw.get("parameters"),
        entry=raw.get("entry"),
        files=files,
        local=raw.get("local"),
        engine=dict(raw.get("engine", {})),
        created=int(raw.get("created", 0)),
        remote=remote,
        fallback=tuple(fallback),
    )


REMOTE_BOUNDS = ("max_response_bytes", "max_sse_line_bytes", "max_sse_event_bytes", "max_chunks")


def _parse_remote(raw: Any, where: str) -> RemoteSpec:
    if not isinstance(raw, dict):
        raise RegistryError(f"{where}: remote must be a table with base_url and model")
    if "api_key" in raw:
        raise RegistryError(f"{where}: never write a key into models.toml; put it in an environment variable "
                            "and name that variable in remote.api_key_env")
    unknown = set(raw) - {"base_url", "model", "api_key_env", "timeout", "max_retries", *REMOTE_BOUNDS}
    if unknown:
        raise RegistryError(f"{where}: unknown remote settings: {', '.join(sorted(unknown))}")
    base_url = _remote_url(raw.get("base_url"), where)
    model = raw.get("model")
    if not isinstance(model, str) or not model:
        raise RegistryError(f"{where}: remote.model must name the model on the remote server")
    key_env = raw.get("api_key_env")
    if key_env is not None and (not isinstance(key_env, str) or not key_env.replace("_", "").isalnum()):
        raise RegistryError(f"{where}: remote.api_key_env must be an environment variable name")
    try:
        timeout = float(raw.get("timeout", 60.0))
        retries = int(raw.get("max_retries", 3))
    except (TypeError, ValueError):
        raise RegistryError(f"{where}: remote.timeout and remote.max_retries must be numbers") from None
    if not 0 < timeout < float("inf") or retries < 0:
        raise RegistryError(f"{where}: remote.timeout must be positive (and finite) and remote.max_retries at "
                            "least 0")
    bounds = {}
    for key in REMOTE_BOUNDS:
        if key in raw:
            value = raw[key]
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise RegistryError(f"{where}: remote.{key} must be a positive whole number")
            bounds[key] = value
    return RemoteSpec(base_url=base_url, model=model, api_key_env=key_env, timeout=timeout, max_retries=retries,
                      **bounds)


def _remote_url(base_url: Any, where: str) -> str:
    """The /v1 root, refused when it carries what belongs elsewhere: credentials (they would show in model
    listings, errors, logs and cassettes, and httpx would send them as Basic auth) or a query string."""
    if not isinstance(base_url, str) or not base_url.startswith(("http://", "https://")):
        raise RegistryError(f"{where}: remote.base_url must be an http(s) URL of the server's /v1 root")
    try:
        url = urlsplit(base_url)
        url.port  # noqa: B018 -- raises on a port that is not a number
    except ValueError as exc:
        raise RegistryError(f"{where}: remote.base_url is not a valid URL: {exc}") from None
    if "@" in url.netloc:
        raise RegistryError(f"{where}: remote.base_url must not carry a user name or password; put the key in an "
                            "environment variable and name it in remote.api_key_env")
    if url.query or url.fragment or "?" in base_url or "#" in base_url:
        raise RegistryError(f"{where}: remote.base_url must be the server's /v1 root, without a query string "
                            "or fragment; put the key in an environment variable named in remote.api_key_env")
    if not url.hostname:
        raise RegistryError(f"{where}: remote.base_url names no host")
    return base_url.rstrip("/")


def _parse_file(raw: dict[str, Any], where: str) -> FileSpec:
    path = raw.get("path", "")
    if not _safe_relative(path):
        raise RegistryError(f"{where}: file path {path!r} must be relative, without '..'")
    sha256 = raw.get("sha256")
    if sha256 is not None:
        if not isinstance(sha256, str) or not _SHA256.match(sha256.lower()):
            raise RegistryError(f"{where}: sha256 of {path!r} must be 64 hexadecimal characters")
        sha256 = sha256.lower()
    pypi = raw.get("pypi", [])
    if isinstance(pypi, str):
        pypi = [pypi]
    spec = FileSpec(path=path, sha256=sha256, size=raw.get("size"),
                    pypi=tuple(PyPIPart.parse(p) for p in pypi), hf=raw.get("hf"), convert=raw.get("convert"))
    if spec.source_kind == "none":
        raise RegistryError(f"{where}: file {path!r} needs a pypi, hf or convert source")
    if spec.convert and not spec.sha256:
        raise RegistryError(f"{where}: converted file {path!r} needs the sha256 its conversion must reproduce")
    return spec


def _safe_relative(path: Any) -> bool:
    """A non-empty relative path that stays inside its folder (no '..', no drive or root, no backslashes)."""
    if not isinstance(path, str) or not path or "\\" in path or "\0" in path:
        return False
    pure = Path(path)
    return not pure.is_absolute() and not pure.drive and ".." not in pure.parts and path not in (".",)
