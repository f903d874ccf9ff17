"""YAML -> frozen, typed config objects, validated once at startup.

msgspec does the schema work (types, unknown keys, defaults) and reports the key path of what
is wrong; this module turns that into one plain line: `<file>: <key.path>: <what is wrong>`.
No dict from YAML leaves this module. Durations and sizes are parsed by proxy.units.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
import yaml
from yarl import URL

from .routes import DEFAULT_ROUTE, Route, RouteTable, compile_path
from .units import format_duration, format_size, parse_duration, parse_size


class ConfigError(Exception):
    """A bad config, flag or environment value; __main__ prints it and exits 2."""

    def __init__(self, source: str, key_path: str, message: str) -> None:
        self.source, self.key_path, self.message = source, key_path, message
        where = f"{source}: {key_path}" if key_path else source
        super().__init__(f"{where}: {message}")


class Duration(float):
    """Seconds; written as "250ms", "5s", "2m" in YAML."""


class Size(int):
    """Bytes; written as "64KiB", "1MiB" in YAML."""


def _dec_hook(tp: type, obj: Any) -> Any:
    if tp is Duration:
        if isinstance(obj, Duration):
            return obj
        seconds = parse_duration(obj)
        if seconds <= 0:
            raise ValueError(f"expected a duration above zero, got {obj!r}")
        return Duration(seconds)
    if tp is Size:
        return obj if isinstance(obj, Size) else Size(parse_size(obj))
    raise NotImplementedError(f"unsupported type {tp!r}")


_STRUCT = dict(forbid_unknown_fields=True, frozen=True, kw_only=True)
Port = Annotated[int, msgspec.Meta(ge=0, le=65535)]
PositiveInt = Annotated[int, msgspec.Meta(ge=1)]
CategoryName = Literal[
    "connect", "network", "timeout", "server", "rate_limit", "quota_exceeded",
    "authentication", "client", "invalid_response",
]


class Listen(msgspec.Struct, **_STRUCT):
    host: str = "127.0.0.1"
    port: Port = 8080


class Admin(msgspec.Struct, **_STRUCT):
    host: str = "0.0.0.0"
    port: Port = 9090


class Upstream(msgspec.Struct, **_STRUCT):
    url: str = "https://api.openai.com"
    max_connections: PositiveInt = 256
    client: Literal["fast", "aiohttp"] = "fast"


class Timeouts(msgspec.Struct, **_STRUCT):
    connect: Duration = Duration(5)
    first_byte: Duration = Duration(600)
    idle: Duration = Duration(300)
    total: Duration = Duration(900)


class Backoff(msgspec.Struct, **_STRUCT):
    initial: Duration = Duration(0.5)
    max: Duration = Duration(8)
    multiplier: Annotated[float, msgspec.Meta(ge=1)] = 2.0


class Budget(msgspec.Struct, **_STRUCT):
    ratio: Annotated[float, msgspec.Meta(ge=0)] = 0.2
    min_per_second: Annotated[float, msgspec.Meta(ge=0)] = 10.0
    window: Duration = Duration(10)


class Retry(msgspec.Struct, **_STRUCT):
    max_attempts: PositiveInt = 3
    retry_on: tuple[CategoryName, ...] = ("connect", "network", "timeout", "server", "rate_limit")
    backoff: Backoff = Backoff()
    retry_after_max: Duration = Duration(120)
    replay_limit: Size = Size(1024 * 1024)
    budget: Budget = Budget()


class Breaker(msgspec.Struct, **_STRUCT):
    failure_threshold: PositiveInt = 5
    reset_timeout: Duration = Duration(30)
    count: tuple[CategoryName, ...] = ("connect", "network", "timeout", "server", "invalid_response")
    group: str | None = None  # routes naming the same group share one breaker (one upstream, one fate)


class Policy(msgspec.Struct, **_STRUCT):
    """What a route does: its timeouts, retry policy and breaker, merged over `defaults`."""

    timeouts: Timeouts = Timeouts()
    retry: Retry = Retry()
    breaker: Breaker = Breaker()


class _RouteSpec(msgspec.Struct, **_STRUCT):
    name: str
    path: str
    methods: tuple[str, ...] | None = None
    timeouts: dict[str, Any] | None = None
    retry: dict[str, Any] | None = None
    breaker: dict[str, Any] | None = None


LogLevel = Literal["debug", "info", "warning", "error"]


class Log(msgspec.Struct, **_STRUCT):
    level: LogLevel = "info"
    format: Literal["json", "console"] = "json"


class _File(msgspec.Struct, **_STRUCT):
    """The YAML file's top level; `defaults` and `routes` are merged before they are typed."""

    listen: Listen = Listen()
    admin: Admin = Admin()
    upstream: Upstream = Upstream()
    defaults: dict[str, Any] | None = None
    routes: list[dict[str, Any]] | None = None
    log: Log = Log()
    shutdown_grace: Duration = Duration(30)
    workers: PositiveInt = 1


@dataclass(frozen=True, slots=True)
class ProxyConfig:
    listen: Listen
    admin: Admin
    upstream: Upstream
    defaults: Policy
    routes: RouteTable[Policy]
    log: Log
    shutdown_grace: float
    workers: int
    source: str  # the file it came from, or "built-in defaults"


_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
_METHOD = re.compile(r"^[A-Z]+$")
_MSGSPEC_PATH = re.compile(r"^(?P<msg>.*?)(?: - at `\$(?P<path>[^`]*)`)?$", re.S)


_CHOICES = {
    "retry_on": ", ".join(CategoryName.__args__), "count": ", ".join(CategoryName.__args__),
    "level": ", ".join(LogLevel.__args__), "format": "json, console", "client": "fast, aiohttp",
}
_TYPE_WORDS = {"`int`": "an integer", "`float`": "a number", "`str`": "a string", "`bool`": "true or false",
               "`object`": "a mapping", "`array`": "a list", "`null`": "nothing"}
_PATH_PART = re.compile(r"\.([^.\[]+)|\[(\d+)\]")


def _convert(obj: Any, tp: type, source: str, prefix: str) -> Any:
    try:
        return msgspec.convert(obj, tp, dec_hook=_dec_hook)
    except msgspec.ValidationError as exc:
        m = _MSGSPEC_PATH.match(str(exc))
        assert m is not None
        rel = m.group("path") or ""
        raise ConfigError(source, (prefix + rel).lstrip("."), _humanize(m.group("msg"), rel, obj)) from None


def _humanize(msg: str, path: str, root: Any) -> str:
    """msgspec's wording -> a sentence naming the expected form and the value found."""
    m = re.match(r"Object contains unknown field `(.+)`", msg)
    if m:
        return f"unknown key {m.group(1)!r}"
    m = re.match(r"Object missing required field `(.+)`", msg)
    if m:
        return f"missing required key {m.group(1)!r}"
    keys = [k or int(i) for k, i in _PATH_PART.findall(path)]
    value: Any = root
    for k in keys:
        try:
            value = value[k]
        except (KeyError, IndexError, TypeError):
            value = None
            break
    if msg.startswith("Invalid enum value"):
        names = [k for k in keys if isinstance(k, str)]
        choices = _CHOICES.get(names[-1]) if names else None
        return f"expected one of {choices}, got {value!r}" if choices else f"invalid value {value!r}"
    if msg.startswith("Expected "):
        msg = msg.split(", got `")[0]
        for word, text in _TYPE_WORDS.items():
            msg = msg.replace(word, text)
        return f"expected {msg[len('Expected '):]}, got {value!r}"
    if msg.startswith("expected") or msg.startswith("must"):  # our own dec_hook messages
        return msg
    return msg[:1].lower() + msg[1:]


def _merge(base: Any, override: Any) -> Any:
    """Key-by-key merge of mappings; anything else in `override` replaces `base` whole."""
    if isinstance(base, dict) and isinstance(override, dict):
        out = dict(base)
        for k, v in override.items():
            out[k] = _merge(base.get(k), v) if k in base else v
        return out
    return copy.deepcopy(override)


def to_builtins(obj: Any) -> Any:
    """Typed config -> plain data with durations and sizes spelled as in YAML."""
    if isinstance(obj, Duration):
        return format_duration(obj)
    if isinstance(obj, Size):
        return format_size(obj)
    if isinstance(obj, msgspec.Struct):
        return {f: to_builtins(getattr(obj, f)) for f in obj.__struct_fields__}
    if isinstance(obj, (tuple, list)):
        return [to_builtins(v) for v in obj]
    return obj


_BUILTIN_POLICY = to_builtins(Policy())

_JOBS = {"retry_on": ["connect", "rate_limit"]}
_POLL = {"max_attempts": 6, "retry_on": ["connect", "network", "timeout", "server", "rate_limit", "invalid_response"]}
# The built-in route table; config/default.yaml writes it out with the reasons (a test keeps them equal).
# A config file with its own `routes:` replaces the whole list.
BUILTIN_ROUTES: list[dict[str, Any]] = [
    {"name": "videos_create", "methods": ["POST"], "path": "/v1/videos/*", "retry": _JOBS},
    {"name": "batches_create", "methods": ["POST"], "path": "/v1/batches", "retry": _JOBS},
    {"name": "fine_tuning_create", "methods": ["POST"], "path": "/v1/fine_tuning/jobs", "retry": _JOBS},
    {"name": "videos_content", "methods": ["GET"], "path": "/v1/videos/{id}/content", "retry": {"max_attempts": 5}},
    {"name": "videos_poll", "methods": ["GET"], "path": "/v1/videos/{id}", "retry": _POLL},
    {"name": "responses_poll", "methods": ["GET"], "path": "/v1/responses/{id}", "retry": _POLL},
    {"name": "files_content", "methods": ["GET"], "path": "/v1/files/{id}/content", "retry": {"max_attempts": 5}},
    {"name": "chat_completions", "methods": ["POST"], "path": "/v1/chat/completions"},
    {"name": "completions", "methods": ["POST"], "path": "/v1/completions"},
    {"name": "responses", "methods": ["POST"], "path": "/v1/responses"},
    {"name": "embeddings", "methods": ["POST"], "path": "/v1/embeddings", "retry": {"max_attempts": 4}},
    {"name": "audio", "methods": ["POST"], "path": "/v1/audio/*", "retry": {"replay_limit": "25MiB"}},
    {"name": "images", "methods": ["POST"], "path": "/v1/images/*",
     "retry": {"retry_on": ["connect", "server", "rate_limit"], "replay_limit": "50MiB"}},
]


def _check_policy(policy: Policy, source: str, prefix: str) -> None:
    b = policy.retry.backoff
    if b.max < b.initial:
        raise ConfigError(source, f"{prefix}retry.backoff.max",
                          f"must not be less than backoff.initial ({format_duration(b.initial)})")


def _check_url(url: str, source: str, key: str) -> None:
    try:
        u = URL(url)
    except (ValueError, TypeError):
        u = None
    if u is None or u.scheme not in ("http", "https") or not u.host or u.query_string or u.fragment:
        raise ConfigError(source, key, f"expected an http:// or https:// base URL without query, got {url!r}")


def _build_routes(specs: list[dict[str, Any]], defaults_raw: dict[str, Any], defaults: Policy,
                  source: str) -> RouteTable[Policy]:
    routes: list[Route[Policy]] = []
    names: set[str] = set()
    for i, raw in enumerate(specs):
        key = f"routes[{i}]"
        spec = _convert(raw, _RouteSpec, source, key)
        if not _NAME.match(spec.name) or spec.name == DEFAULT_ROUTE:
            raise ConfigError(source, f"{key}.name",
                              f"expected letters, digits, '_', '.' or '-' and not {DEFAULT_ROUTE!r}, got {spec.name!r}")
        if spec.name in names:
            raise ConfigError(source, f"{key}.name", f"duplicate route name {spec.name!r}")
        names.add(spec.name)
        try:
            pattern = compile_path(spec.path)
        except ValueError as exc:
            raise ConfigError(source, f"{key}.path", str(exc)) from None
        methods = None
        if spec.methods is not None:
            for j, m in enumerate(spec.methods):
                if not _METHOD.match(m):
                    raise ConfigError(source, f"{key}.methods[{j}]", f"expected an upper-case HTTP method, got {m!r}")
            methods = frozenset(spec.methods)
        sections = {k: v for k in ("timeouts", "retry", "breaker") if (v := getattr(spec, k)) is not None}
        policy = _convert(_merge(defaults_raw, sections), Policy, source, key) if sections else defaults
        _check_policy(policy, source, key + ".")
        routes.append(Route(spec.name, methods, pattern, policy))
    default = Route(DEFAULT_ROUTE, None, None, defaults)
    _check_groups([*((f"routes[{i}]", r) for i, r in enumerate(routes)), ("defaults", default)], source)
    return RouteTable(routes, default)


def _check_groups(routes: list[tuple[str, Route[Policy]]], source: str) -> None:
    """Routes sharing a breaker group must agree on its settings: one breaker has one threshold."""
    seen: dict[str, tuple[str, Breaker]] = {}
    for key, route in routes:
        b = route.policy.breaker
        if b.group is None:
            continue
        if b.group in seen and seen[b.group][1] != b:
            raise ConfigError(source, f"{key}.breaker", f"breaker group {b.group!r} is set up differently in "
                                                        f"{seen[b.group][0]}.breaker; a group has one configuration")
        seen.setdefault(b.group, (key, b))


def read_yaml(path: str) -> dict[str, Any]:
    """The file as a mapping, or a ConfigError naming the file (and the line for syntax errors)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(path, "", "file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(path, "", f"cannot read the file ({exc.__class__.__name__})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or "invalid YAML"
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(path, where, f"YAML syntax error: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(path, "", f"expected a mapping of settings at the top level, got {type(data).__name__}")
    return data


Override = tuple[str, tuple[str, ...], Any]  # (source label, key path, value)


def load(path: str | None, overrides: Iterable[Override] = ()) -> ProxyConfig:
    """Defaults < file < each override in order (environment, then flags)."""
    source = path or "built-in defaults"
    raw = read_yaml(path) if path else {}
    for label, keys, value in overrides:
        value = _coerce_override(label, keys, value)  # a bad value names its own source, not the file
        node = raw
        for k in keys[:-1]:
            if not isinstance(node.get(k), dict):
                node[k] = {}
            node = node[k]
        node[keys[-1]] = value
    top = _convert(raw, _File, source, "")
    defaults_raw = _merge(_BUILTIN_POLICY, top.defaults or {})
    defaults = _convert(defaults_raw, Policy, source, "defaults")
    _check_policy(defaults, source, "defaults.")
    _check_url(top.upstream.url, source, "upstream.url")
    specs = top.routes if top.routes is not None else BUILTIN_ROUTES
    table = _build_routes(specs, defaults_raw, defaults, source)
    return ProxyConfig(
        listen=top.listen, admin=top.admin, upstream=top.upstream, defaults=defaults, routes=table,
        log=top.log, shutdown_grace=float(top.shutdown_grace), workers=top.workers, source=source,
    )


_OVERRIDE_TYPES: Mapping[tuple[str, ...], tuple[Any, str]] = {
    ("listen", "port"): (Port, "a port number from 0 to 65535"),
    ("admin", "port"): (Port, "a port number from 0 to 65535"),
    ("workers",): (PositiveInt, "a whole number of at least 1"),
    ("listen", "host"): (str, "a host name or address"),
    ("upstream", "url"): (str, "a URL"),
    ("log", "level"): (LogLevel, "one of debug, info, warning, error"),
}


def _coerce_override(label: str, keys: tuple[str, ...], value: Any) -> Any:
    entry = _OVERRIDE_TYPES.get(keys)
    if entry is None:
        return value
    tp, expected = entry
    try:
        value = msgspec.convert(value, tp, strict=False)
    except msgspec.ValidationError:
        raise ConfigError(label, "", f"expected {expected}, got {value!r}") from None
    if keys == ("upstream", "url"):
        _check_url(value, label, "")
    return value


def effective(config: ProxyConfig) -> dict[str, Any]:
    """The effective config as plain data: what --check-config prints and the startup log shows."""
    routes = []
    for r in config.routes.routes:
        assert r.pattern is not None
        entry: dict[str, Any] = {"name": r.name, "path": r.pattern.text}
        if r.methods is not None:
            entry["methods"] = sorted(r.methods)
        entry.update(to_builtins(r.policy))
        routes.append(entry)
    return {
        "listen": to_builtins(config.listen),
        "admin": to_builtins(config.admin),
        "upstream": to_builtins(config.upstream),
        "defaults": to_builtins(config.defaults),
        "routes": routes,
        "log": to_builtins(config.log),
        "shutdown_grace": format_duration(config.shutdown_grace),
        "workers": config.workers,
    }
