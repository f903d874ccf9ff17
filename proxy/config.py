"""YAML -> frozen, typed config objects, validated once at startup.

Each value is typed by walking the Structs below, so an error names its key path and what the schema expects.
"""

from __future__ import annotations

import contextlib
import functools
import os
import ssl
import types
import typing
import urllib.request
from collections.abc import Iterable
from importlib.resources import files
from pathlib import Path
from typing import Annotated, Any, Literal, NewType, get_args, get_origin

import msgspec
import yaml
from yarl import URL

from .masking import mask
from .routes import DEFAULT_ROUTE, PathPattern, Route, RouteTable, compile_path
from .units import Duration, Size, format_duration, format_size, to_duration, to_size


class ConfigError(Exception):
    """A bad config, flag or environment value; __main__ prints it and exits 2."""

    def __init__(self, source: str, key_path: str, message: str) -> None:
        super().__init__(f"{source}: {key_path}: {message}" if key_path else f"{source}: {message}")


HttpUrl = NewType("HttpUrl", str)  # checked by _url; a plain str at run time
ForwardProxy = NewType("ForwardProxy", str)  # none, env or http://[user:pass@]host:port (_forward_proxy)
CaFile = NewType("CaFile", str)  # a readable PEM file of CA certificates (_ca_file)
Port = Annotated[int, msgspec.Meta(ge=0, le=65535, description="a port number")]
PositiveInt = Annotated[int, msgspec.Meta(ge=1)]
RouteName = Annotated[str, msgspec.Meta(pattern=rf"^(?!{DEFAULT_ROUTE}\Z)[A-Za-z0-9_.-]+\Z",
                                        description=f"letters, digits, '_', '.' or '-' and not {DEFAULT_ROUTE!r}")]
Method = Annotated[str, msgspec.Meta(pattern=r"^[A-Z]+\Z", description="an upper-case HTTP method")]
CategoryName = Literal["connect", "network", "timeout", "server", "rate_limit", "quota_exceeded",
                       "authentication", "client", "invalid_response"]
LogLevel = Literal["debug", "info", "warning", "error"]
LogFormat = Literal["json", "console"]
Override = tuple[str, tuple[str, ...], Any]  # (source label, key path, value): a flag or variable
_NOUNS = {int: "an integer", float: "a number", str: "a string", dict: "a mapping"}  # for error messages


def _url(value: Any) -> str:
    with contextlib.suppress(TypeError, ValueError):  # not a string, or not a URL
        if (u := URL(value)).scheme in ("http", "https") and u.host and not u.query_string and not u.fragment:
            return value
    raise ValueError(f"expected an http:// or https:// base URL without query, got {value!r}")


def _proxy_url(value: str) -> URL:
    """An http:// forward proxy URL (ValueError otherwise; the message never holds its credentials)."""
    try:
        u = URL(value)
    except (TypeError, ValueError):
        u = URL()
    if u.scheme != "http" or not u.host or u.path not in ("", "/") or u.query_string or u.fragment:
        why = (f"a forward proxy must be http://, not {u.scheme}://" if u.scheme and u.scheme != "http" and u.host
               else "expected none, env or http://[user:password@]host:port")
        raise ValueError(f"{why}, got {mask(value)!r}")
    return u


def _forward_proxy(value: Any) -> str:
    if value is None or value in ("none", "env"):
        return value or "none"
    _proxy_url(str(value))
    return str(value)


def _ca_file(value: Any) -> str:
    """A file of PEM CA certificates, loaded once here so a bad one fails at startup, not on the first request."""
    try:
        text = Path(value).read_text(encoding="ascii")
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cadata=text)
    except FileNotFoundError:
        raise ValueError(f"file not found: {value!r}") from None
    except (ssl.SSLError, ValueError):  # an SSLError is an OSError; ValueError: no certificate, or not ASCII
        raise ValueError(f"{value!r} holds no PEM certificate (expected -----BEGIN CERTIFICATE----- blocks)") from None
    except OSError as exc:
        raise ValueError(f"cannot read {value!r} ({type(exc).__name__})") from None
    return str(value)


# Types msgspec cannot check itself: each parser raises ValueError with the whole message.
_PARSE = {Duration: to_duration, Size: to_size, HttpUrl: _url, PathPattern: compile_path,
          ForwardProxy: _forward_proxy, CaFile: _ca_file}
BUILTIN: Any = msgspec.UNSET  # a field's default: its value is written in proxy/default.yaml


class _Section(msgspec.Struct, frozen=True, kw_only=True):
    """A field left out (`Retry()` in a test) takes proxy/default.yaml's value: none is written here."""

    def __post_init__(self) -> None:
        for name in self.__struct_fields__:
            if getattr(self, name) is BUILTIN:
                msgspec.structs.force_setattr(self, name, getattr(_builtin_sections()[type(self)], name))


class _Address(_Section):
    host: str = BUILTIN
    port: Port = BUILTIN


class Listen(_Address):
    """The traffic listener; past `max_connections` client connections a new one is answered 503."""

    max_connections: PositiveInt = BUILTIN


class Admin(_Address):
    """The admin listener: an address only."""


class Upstream(_Section):
    url: HttpUrl = BUILTIN
    max_connections: PositiveInt = BUILTIN
    proxy: ForwardProxy = BUILTIN  # egress through a forward proxy: forward_proxy() resolves it
    ca_file: CaFile | None = BUILTIN  # the CAs to trust instead of the system's (SSL_CERT_FILE) ones


class Timeouts(_Section):
    connect: Duration = BUILTIN
    first_byte: Duration = BUILTIN
    idle: Duration = BUILTIN
    total: Duration = BUILTIN


class Backoff(_Section):
    initial: Duration = BUILTIN
    max: Duration = BUILTIN
    multiplier: Annotated[float, msgspec.Meta(ge=1)] = BUILTIN


class Budget(_Section):
    ratio: Annotated[float, msgspec.Meta(ge=0)] = BUILTIN
    min_per_second: Annotated[float, msgspec.Meta(ge=0)] = BUILTIN
    window: Duration = BUILTIN


class Retry(_Section):
    max_attempts: PositiveInt = BUILTIN
    retry_on: tuple[CategoryName, ...] = BUILTIN
    backoff: Backoff = BUILTIN
    retry_after_max: Duration = BUILTIN
    replay_limit: Size = BUILTIN
    budget: Budget = BUILTIN


class Breaker(_Section):
    failure_threshold: PositiveInt = BUILTIN
    reset_timeout: Duration = BUILTIN
    count: tuple[CategoryName, ...] = BUILTIN
    group: str | None = None  # routes naming the same group share one breaker (one upstream, one fate)


class Policy(_Section):
    """What a route does: its timeouts, retry policy and breaker, merged over `defaults`."""

    timeouts: Timeouts = BUILTIN
    retry: Retry = BUILTIN
    breaker: Breaker = BUILTIN


class Log(_Section):
    level: LogLevel = BUILTIN
    format: LogFormat = BUILTIN


class Reload(_Section):
    """Hot reload: SIGHUP always; `watch` also polls the file (a ConfigMap volume swaps it in place)."""

    watch: bool = BUILTIN
    interval: Duration = BUILTIN


class _RouteSpec(msgspec.Struct, frozen=True, kw_only=True):
    name: RouteName
    path: PathPattern
    methods: tuple[Method, ...] | None = None
    timeouts: dict[str, Any] | None = None  # merged over `defaults` before they are typed
    retry: dict[str, Any] | None = None
    breaker: dict[str, Any] | None = None


class _File(msgspec.Struct, frozen=True, kw_only=True):
    """The top level as written, typed once merged over proxy/default.yaml (every key is there)."""

    listen: Listen
    admin: Admin
    upstream: Upstream
    defaults: Policy
    routes: list[_RouteSpec]
    log: Log
    reload: Reload
    shutdown_grace: Duration
    workers: PositiveInt


class ProxyConfig(_File, frozen=True, kw_only=True):
    """The file's sections once checked, with its routes compiled into a table."""

    routes: RouteTable[Policy]  # type: ignore[assignment]  # retyped: the file's list, compiled
    shutdown_grace: float  # a plain float from here on: JSON logs write it as a number
    source: str  # the file it came from, or "built-in defaults"


def _typed(tp: Any, value: Any, path: str, source: str, strict: bool = True) -> Any:
    """`value` as a `tp`, walked field by field and item by item, so an error names its key path."""
    if isinstance(tp, type) and issubclass(tp, msgspec.Struct):
        if not isinstance(value, dict):
            raise ConfigError(source, path, f"expected a mapping, got {value!r}")
        fields = {f.name: f for f in msgspec.structs.fields(tp)}
        if unknown := [k for k in value if k not in fields]:
            raise ConfigError(source, path, f"unknown key {unknown[0]!r}")
        if missing := [n for n, f in fields.items() if n not in value and (f.required or f.default is BUILTIN)]:
            raise ConfigError(source, path, f"missing required key {missing[0]!r}")
        return tp(**{k: _typed(fields[k].type, v, f"{path}.{k}".lstrip("."), source) for k, v in value.items()})
    origin, args = get_origin(tp), get_args(tp)
    if origin in (types.UnionType, typing.Union):  # `X | None` (a NewType's `|` makes a typing.Union)
        return None if value is None else _typed(args[0], value, path, source, strict)
    if origin in (list, tuple):
        if not isinstance(value, list):
            raise ConfigError(source, path, f"expected a list, got {value!r}")
        return origin(_typed(args[0], v, f"{path}[{i}]", source, strict) for i, v in enumerate(value))
    try:
        return _PARSE[tp](value) if tp in _PARSE else msgspec.convert(value, tp, strict=strict)
    except msgspec.ValidationError:
        raise ConfigError(source, path, f"expected {_describe(tp)}, got {value!r}") from None
    except ValueError as exc:  # one of _PARSE's own sentences
        raise ConfigError(source, path, str(exc)) from None


def _describe(tp: Any) -> str:
    """What a valid value looks like, read from the schema: "a port number from 0 to 65535"."""
    if get_origin(tp) is Literal:
        return "one of " + ", ".join(get_args(tp))
    if get_origin(tp) is not Annotated:
        return _NOUNS.get(get_origin(tp) or tp, str(tp))
    base, meta = get_args(tp)
    noun = meta.description or _NOUNS[base]
    if meta.le is not None:  # the schema's bounds: `ge` alone, or `ge` and `le`
        return f"{noun} from {meta.ge} to {meta.le}"
    return noun if meta.ge is None else f"{noun} >= {meta.ge}"


def _merge(base: Any, override: Any) -> Any:
    """Mappings merged key by key, changing neither; a list or value replaces `base`, an empty section keeps it."""
    if override is None and isinstance(base, (dict, list)):
        return base
    if isinstance(base, dict) and isinstance(override, dict):
        return {**base, **{k: _merge(base.get(k), v) for k, v in override.items()}}
    return override


@functools.cache
def _builtin_raw() -> dict[str, Any]:
    return read_yaml("proxy/default.yaml", (files(__package__) / "default.yaml").read_text(encoding="utf-8"))


@functools.cache
def _builtin_sections() -> dict[type, Any]:
    """Each section type -> its built-in value (each type occurs once), for fields left out of a Struct."""
    sections = [_typed(_File, _builtin_raw(), "", "proxy/default.yaml")]
    for section in sections:  # breadth first: the list grows while it is read
        sections += [v for f in section.__struct_fields__ if isinstance(v := getattr(section, f), msgspec.Struct)]
    return {type(s): s for s in sections}


def builtin_value(keys: tuple[str, ...]) -> Any:
    """A built-in value as proxy/default.yaml writes it (for --help)."""
    return functools.reduce(lambda node, key: node[key], keys, _builtin_raw())


def _check_policy(policy: Policy, key: str, source: str) -> None:
    if (b := policy.retry.backoff).max < b.initial:
        raise ConfigError(source, f"{key}.retry.backoff.max",
                          f"must not be less than backoff.initial ({format_duration(b.initial)})")


def _build_routes(top: _File, defaults_raw: dict[str, Any], source: str) -> RouteTable[Policy]:
    """Each route's sections merged over `defaults`, then typed; one breaker group has one configuration."""
    routes: list[Route[Policy]] = []
    for i, spec in enumerate(top.routes):
        key = f"routes[{i}]"
        if any(r.name == spec.name for r in routes):
            raise ConfigError(source, f"{key}.name", f"duplicate route name {spec.name!r}")
        sections = {k: v for k in ("timeouts", "retry", "breaker") if (v := getattr(spec, k)) is not None}
        policy = _typed(Policy, _merge(defaults_raw, sections), key, source) if sections else top.defaults
        _check_policy(policy, key, source)
        routes.append(Route(spec.name, None if spec.methods is None else frozenset(spec.methods), spec.path, policy))
    groups: dict[str, tuple[str, Breaker]] = {}
    for key, b in [*((f"routes[{i}]", r.policy.breaker) for i, r in enumerate(routes)),
                   ("defaults", top.defaults.breaker)]:
        if b.group is not None and (first := groups.setdefault(b.group, (key, b)))[1] != b:
            raise ConfigError(source, f"{key}.breaker", f"breaker group {b.group!r} is set up differently in "
                                                        f"{first[0]}.breaker; a group has one configuration")
    return RouteTable(routes, Route(DEFAULT_ROUTE, None, None, top.defaults))


def read_yaml(path: str, text: str | None = None) -> dict[str, Any]:
    """The file (or its `text`) as a mapping, or a ConfigError naming it (and the line of a syntax error)."""
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8") if text is None else text)
    except (OSError, UnicodeDecodeError) as exc:
        why = "file not found" if isinstance(exc, FileNotFoundError) else f"cannot read the file ({type(exc).__name__})"
        raise ConfigError(path, "", why) from None
    except yaml.YAMLError as exc:
        mark, problem = getattr(exc, "problem_mark", None), getattr(exc, "problem", None) or "invalid YAML"
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(path, where, f"YAML syntax error: {problem}") from None
    if not isinstance(data, (dict, type(None))):
        raise ConfigError(path, "", f"expected a mapping of settings at the top level, got {type(data).__name__}")
    return data or {}


def load(path: str | None, overrides: Iterable[Override] = ()) -> ProxyConfig:
    """proxy/default.yaml < file < each override in order (environment, then flags)."""
    source = path or "built-in defaults"
    raw = read_yaml(path) if path else {}
    for label, keys, value in overrides:  # typed by the file's schema, text may stand for a number
        tp = functools.reduce(lambda t, key: {f.name: f.type for f in msgspec.structs.fields(t)}[key], keys, _File)
        value = _typed(tp, value, "", label, strict=False)  # a bad value names its flag or variable
        raw = _merge(raw, functools.reduce(lambda inner, key: {key: inner}, reversed(keys), value))
    raw = _merge(_builtin_raw(), raw)
    top = _typed(_File, raw, "", source)
    _check_policy(top.defaults, "defaults", source)
    table = _build_routes(top, raw["defaults"], source)
    forward_proxy(top.upstream)  # a bad https_proxy fails here, as a bad file would
    fields = msgspec.structs.asdict(top) | {"routes": table, "shutdown_grace": float(top.shutdown_grace)}
    return ProxyConfig(**fields, source=source)


def forward_proxy(upstream: Upstream) -> URL | None:
    """The forward proxy to reach upstream.url through, or None (direct). `env` reads https_proxy /
    http_proxy / no_proxy as urllib and curl do: lower case first, then upper; a value without a scheme
    is http://. A bad value is a ConfigError naming the variable, never its credentials."""
    if upstream.proxy != "env":
        return None if upstream.proxy == "none" else _proxy_url(upstream.proxy)
    url = URL(upstream.url)
    found = urllib.request.getproxies_environment()
    value = found.get(url.scheme)
    if not value or urllib.request.proxy_bypass_environment(url.host_port_subcomponent or "", found):
        return None
    name = next((n for n in (f"{url.scheme}_proxy", f"{url.scheme.upper()}_PROXY") if os.environ.get(n)), "")
    try:
        return _proxy_url(value if "://" in value else f"http://{value}")
    except ValueError as exc:
        raise ConfigError(f"environment {name}", "", f"{exc} (upstream.proxy is env)") from None


# What a running process cannot change: its sockets, its processes, its log setup and its drain timer.
RESTART_KEYS = ("listen.host", "listen.port", "listen.max_connections", "admin.host", "admin.port", "workers",
                "shutdown_grace", "log.level", "log.format")


def changed_keys(old: ProxyConfig, new: ProxyConfig) -> list[str]:
    """The top-level sections (or, for the RESTART_KEYS, the keys) whose effective values differ."""
    a, b = effective(old), effective(new)
    out = [key for key in RESTART_KEYS if _at(a, key) != _at(b, key)]
    return out + [key for key in b if key not in ("listen", "admin", "log") and key not in RESTART_KEYS
                  and a.get(key) != b[key]]


def pinned(new: ProxyConfig, running: ProxyConfig) -> ProxyConfig:
    """`new` as a running process applies it: with its running values of the RESTART_KEYS' sections."""
    return msgspec.structs.replace(new, listen=running.listen, admin=running.admin, log=running.log,
                                   workers=running.workers, shutdown_grace=running.shutdown_grace)


def _at(tree: dict[str, Any], dotted: str) -> Any:
    return functools.reduce(lambda node, key: node[key], dotted.split("."), tree)


def _spelled(obj: Any) -> Any:
    """msgspec.to_builtins' hook: durations and sizes as YAML writes them, a route table as its routes."""
    if isinstance(obj, Duration):
        return format_duration(obj)
    if isinstance(obj, Size):
        return format_size(obj)
    if isinstance(obj, RouteTable):
        return [{"name": r.name, "path": r.pattern.text if r.pattern else None,
                 **({} if r.methods is None else {"methods": sorted(r.methods)}), **msgspec.structs.asdict(r.policy)}
                for r in obj.routes]
    raise NotImplementedError(type(obj))


def effective(config: ProxyConfig) -> dict[str, Any]:
    """The effective config as plain data: what --check-config prints and the startup log shows."""
    out: dict[str, Any] = msgspec.to_builtins(config, enc_hook=_spelled)
    del out["source"]
    return out | {"shutdown_grace": format_duration(config.shutdown_grace)}
