"""YAML -> frozen, typed config objects, validated once at startup.

Each value is typed by walking the Structs below, so an error names its key path and what the schema expects.
"""

from __future__ import annotations

import functools
import types
import typing
from collections.abc import Iterable
from importlib.resources import files
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

import msgspec
import yaml
from yarl import URL

from .masking import Secret
from .routes import DEFAULT_ROUTE, PathPattern, Route, RouteTable, compile_path
from .units import Duration, Size, format_duration, format_size, to_duration, to_size
from .upstreams import (DEFAULT_UPSTREAM, CaFile, Credential, ForwardProxy, HttpUrl, NamedUpstream, Problem,
                        UpstreamName, ca_file, check_failover_on, check_upstream_list, credential,
                        forward_proxy_setting, http_url, object_path, proxy_via)


class ConfigError(Exception):
    """A bad config, flag or environment value; __main__ prints it and exits 2."""

    def __init__(self, source: str, key_path: str, message: str) -> None:
        super().__init__(f"{source}: {key_path}: {message}" if key_path else f"{source}: {message}")


Port = Annotated[int, msgspec.Meta(ge=0, le=65535, description="a port number")]
PositiveInt = Annotated[int, msgspec.Meta(ge=1)]
RouteName = Annotated[str, msgspec.Meta(pattern=rf"^(?!{DEFAULT_ROUTE}\Z)[A-Za-z0-9_.-]+\Z",
                                        description=f"letters, digits, '_', '.' or '-' and not {DEFAULT_ROUTE!r}")]
Method = Annotated[str, msgspec.Meta(pattern=r"^[A-Z]+\Z", description="an upper-case HTTP method")]
CategoryName = Literal["connect", "network", "timeout", "server", "rate_limit", "quota_exceeded",
                       "authentication", "client", "invalid_response"]
FailoverCategory = Literal[CategoryName, "circuit_open"]
LogLevel = Literal["debug", "info", "warning", "error"]
LogFormat = Literal["json", "console"]
Override = tuple[str, tuple[str, ...], Any]  # (source label, key path, value): a flag or variable
_NOUNS = {int: "an integer", float: "a number", str: "a string", dict: "a mapping"}  # for error messages


# Types msgspec cannot check itself: each parser raises ValueError with the whole message.
_PARSE = {Duration: to_duration, Size: to_size, HttpUrl: http_url, PathPattern: compile_path,
          ForwardProxy: forward_proxy_setting, CaFile: ca_file}
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
    """What a route does: its timeouts, retry policy and breaker, merged over `defaults`, and the
    upstreams it tries in order, moving on at once after a failure of a `failover_on` category."""

    timeouts: Timeouts = BUILTIN
    retry: Retry = BUILTIN
    breaker: Breaker = BUILTIN
    upstreams: tuple[UpstreamName, ...] = BUILTIN
    failover_on: tuple[FailoverCategory, ...] = BUILTIN


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
    upstreams: list[Any] | None = None
    failover_on: list[Any] | None = None


class _File(msgspec.Struct, frozen=True, kw_only=True):
    """The top level as written, typed once merged over proxy/default.yaml (every key is there)."""

    listen: Listen
    admin: Admin
    upstream: Upstream
    upstreams: dict[UpstreamName, NamedUpstream]
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
    credentials: dict[str, Credential]  # upstream name -> the header sent instead of the client's (no repr)


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
    if origin is dict:  # `upstreams`: names -> sections
        if not isinstance(value, dict):
            raise ConfigError(source, path, f"expected a mapping, got {value!r}")
        return {_typed(args[0], k, f"{path}.{k}", source): _typed(args[1], v, f"{path}.{k}", source, strict)
                for k, v in value.items()}
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
    try:
        check_failover_on(policy.failover_on)
    except Problem as p:
        raise ConfigError(source, f"{key}.failover_on{p.key}", p.message) from None


def _check_upstreams(route: Route[Policy], key: str, own: bool, known: frozenset[str], source: str) -> None:
    """`key` is the route's (`routes[3]`), or `defaults` for the default route; `own`: the route
    sets `upstreams` itself, else it inherits defaults.upstreams."""
    try:
        check_upstream_list(route.policy.upstreams, known, object_path=object_path(route.pattern))
    except Problem as problem:
        where = f"{key}.upstreams{problem.key}" if own else key
        inherited = "" if own else " (from defaults.upstreams)"
        raise ConfigError(source, where, f"route {route.name!r}{inherited}: {problem.message}") from None


def _credentials(top: _File, source: str) -> dict[str, Credential]:
    """Each upstream's secret, read now (startup, reload): a missing one stops the config here."""
    if DEFAULT_UPSTREAM in top.upstreams:
        raise ConfigError(source, f"upstreams.{DEFAULT_UPSTREAM}", "the name 'default' is the upstream of the "
                          "`upstream:` section; give this one another name (e.g. primary)")
    out = {}
    for name, entry in top.upstreams.items():
        forward_proxy(top.upstream, entry.url)  # a bad https_proxy fails here, as a bad file would
        if entry.auth is not None:
            try:
                out[name] = credential(entry.auth)
            except Problem as p:
                raise ConfigError(source, f"upstreams.{name}.auth{'.' if p.key else ''}{p.key}", p.message) from None
    return out


def _build_routes(top: _File, defaults_raw: dict[str, Any], source: str) -> RouteTable[Policy]:
    """Each route's sections merged over `defaults`, then typed; one breaker group has one configuration."""
    routes: list[Route[Policy]] = []
    known = frozenset(top.upstreams) | {DEFAULT_UPSTREAM}
    default = Route(DEFAULT_ROUTE, None, None, top.defaults)
    _check_upstreams(default, "defaults", True, known, source)
    for i, spec in enumerate(top.routes):
        key = f"routes[{i}]"
        if any(r.name == spec.name for r in routes):
            raise ConfigError(source, f"{key}.name", f"duplicate route name {spec.name!r}")
        sections = {k: v for k in _POLICY_KEYS if (v := getattr(spec, k)) is not None}
        policy = _typed(Policy, _merge(defaults_raw, sections), key, source) if sections else top.defaults
        _check_policy(policy, key, source)
        routes.append(Route(spec.name, None if spec.methods is None else frozenset(spec.methods), spec.path, policy))
        _check_upstreams(routes[-1], key, spec.upstreams is not None, known, source)
    groups: dict[str, tuple[str, Breaker]] = {}
    for key, b in [*((f"routes[{i}]", r.policy.breaker) for i, r in enumerate(routes)),
                   ("defaults", top.defaults.breaker)]:
        if b.group is not None and (first := groups.setdefault(b.group, (key, b)))[1] != b:
            raise ConfigError(source, f"{key}.breaker", f"breaker group {b.group!r} is set up differently in "
                                                        f"{first[0]}.breaker; a group has one configuration")
    return RouteTable(routes, default)


_POLICY_KEYS = ("timeouts", "retry", "breaker", "upstreams", "failover_on")  # a route's, over `defaults`


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
    credentials = _credentials(top, source)
    upstreams = {name: msgspec.structs.replace(u, max_connections=u.max_connections or top.upstream.max_connections)
                 for name, u in top.upstreams.items()}
    fields = msgspec.structs.asdict(top) | {"routes": table, "shutdown_grace": float(top.shutdown_grace),
                                            "upstreams": upstreams}
    return ProxyConfig(**fields, source=source, credentials=credentials)


def forward_proxy(upstream: Upstream, to: str | None = None) -> URL | None:
    """The forward proxy to reach `to` (default upstream.url) through, or None (direct); a bad
    https_proxy variable is a ConfigError naming it, never its credentials (upstreams.proxy_via)."""
    try:
        return proxy_via(upstream.proxy, to or upstream.url)
    except Problem as p:
        raise ConfigError(p.key, "", p.message) from None


def _spelled(obj: Any) -> Any:
    """msgspec.to_builtins' hook: durations and sizes as YAML writes them, a route table as its routes."""
    if isinstance(obj, Duration):
        return format_duration(obj)
    if isinstance(obj, Size):
        return format_size(obj)
    if isinstance(obj, Secret):
        return "***"
    if isinstance(obj, RouteTable):
        return [{"name": r.name, "path": r.pattern.text if r.pattern else None,
                 **({} if r.methods is None else {"methods": sorted(r.methods)}), **msgspec.structs.asdict(r.policy)}
                for r in obj.routes]
    raise NotImplementedError(type(obj))


def effective(config: ProxyConfig) -> dict[str, Any]:
    """The effective config as plain data: what --check-config prints and the startup log shows."""
    out: dict[str, Any] = msgspec.to_builtins(config, enc_hook=_spelled)
    del out["source"], out["credentials"]  # the auth sections say where each secret comes from, not what it is
    return out | {"shutdown_grace": format_duration(config.shutdown_grace)}
