"""Upstreams as config describes them: their URLs, the egress (forward proxy, CA file) every one
shares, the credential the proxy sends to each, which of them a route may list, and how a client's
path joins an upstream's base URL. Pure: config.py turns a `Problem` into a ConfigError naming the
file and key path.
"""

from __future__ import annotations

import contextlib
import os
import re
import ssl
import urllib.request
from pathlib import Path
from typing import Annotated, Any, NamedTuple, NewType

import msgspec
from yarl import URL

from .masking import Secret, mask
from .routes import PathPattern

DEFAULT_UPSTREAM = "default"  # the `upstream:` section's upstream
HeaderName = Annotated[str, msgspec.Meta(pattern=r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+\Z",
                                         description="an HTTP header name such as api-key")]
UpstreamName = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_.-]+\Z",
                                           description="letters, digits, '_', '.' or '-'")]
# A client's credentials, removed when the proxy sends an upstream's own. The organization and project
# headers name the client's account: sent with another account's key, OpenAI refuses the request (401).
CLIENT_CREDENTIALS = frozenset({"authorization", "api-key", "openai-organization", "openai-project"})
CALLERS_ERRORS = ("client", "authentication")  # another upstream would answer them the same way
HttpUrl = NewType("HttpUrl", str)  # checked by http_url; a plain str at run time
ForwardProxy = NewType("ForwardProxy", str)  # none, env or http://[user:pass@]host:port (forward_proxy_setting)
CaFile = NewType("CaFile", str)  # a readable PEM file of CA certificates (ca_file)
_MIN_SECRET = 8  # shorter, it could not be told from ordinary text when masked
_UNSAFE = re.compile(r"[\x00-\x1f\x7f]")


class Problem(Exception):
    """A bad upstream setting: `key` is the key path below the one being checked ("" for itself)."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key, self.message = key, message


class Auth(msgspec.Struct, frozen=True, kw_only=True):
    """The credential header the proxy sends to an upstream instead of the client's."""

    header: HeaderName
    value_from_env: str | None = None  # the name of an environment variable holding the secret
    value_from_file: str | None = None  # a file holding it (a mounted Kubernetes Secret)
    format: str | None = None  # "{}" stands for the secret; default "Bearer {}" for Authorization, else "{}"


class NamedUpstream(msgspec.Struct, frozen=True, kw_only=True):
    """An entry of `upstreams:`; upstream.proxy and upstream.ca_file apply to it too."""

    url: HttpUrl
    max_connections: Annotated[int, msgspec.Meta(ge=1)] | None = None  # None: upstream.max_connections
    auth: Auth | None = None  # send this credential instead of the client's


class Credential(NamedTuple):
    """The header (name, value) an upstream gets; the value is a Secret, hidden from every repr."""

    header: str
    value: Secret


def credential(auth: Auth) -> Credential:
    """Read the secret (at startup and at each reload). Problem names the key at fault, never the value."""
    if (auth.value_from_env is None) == (auth.value_from_file is None):
        raise Problem("", "set exactly one of value_from_env and value_from_file")
    fmt = auth.format if auth.format is not None else "Bearer {}" if auth.header.lower() == "authorization" else "{}"
    if fmt.count("{}") != 1 or _UNSAFE.search(fmt):
        raise Problem("format", f"expected one '{{}}' where the secret goes, like 'Bearer {{}}', got {fmt!r}")
    if auth.value_from_env is not None:
        key = "value_from_env"
        value = os.environ.get(auth.value_from_env, "").strip()
        if not value:
            raise Problem(key, f"the environment variable {auth.value_from_env} is not set or is empty")
    else:
        key, path = "value_from_file", auth.value_from_file or ""
        try:
            value = Path(path).read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            raise Problem(key, f"file not found: {path!r}") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise Problem(key, f"cannot read {path!r} ({type(exc).__name__})") from None
        if not value:
            raise Problem(key, f"{path!r} is empty")
    if _UNSAFE.search(value) or not value.isprintable():
        raise Problem(key, "the secret holds a line break or another control character")
    if len(value) < _MIN_SECRET:
        raise Problem(key, f"the secret has {len(value)} characters; one under {_MIN_SECRET} could not be "
                           "masked reliably in logs")
    Secret(value)  # masked everywhere, also where it appears without the format around it
    return Credential(auth.header, Secret(fmt.replace("{}", value)))


def object_path(pattern: PathPattern | None) -> str | None:
    """Why a route can address an object (a file, a response, a video), or None when it cannot."""
    if pattern is None:
        return "the default route takes every path no route matches, object paths included"
    if None in pattern.segments:
        return f"its path {pattern.text} has a {{param}} segment"
    return f"its prefix path {pattern.text} matches object paths too" if pattern.prefix else None


def check_upstream_list(names: tuple[str, ...], known: frozenset[str], *, object_path: str | None) -> None:
    """A route's `upstreams`: known names, each once, at least one; and a route that can address an
    object (`object_path` says how) lists one: an object (a file, a response, a video) lives in the
    account that made it, another account answers 404 for it."""
    if not names:
        raise Problem("", "expected at least one upstream")
    for i, name in enumerate(names):
        if name not in known:
            raise Problem(f"[{i}]", f"unknown upstream {name!r} (defined: {', '.join(sorted(known))})")
        if name in names[:i]:
            raise Problem(f"[{i}]", f"{name!r} is listed twice")
    if object_path is not None and len(names) > 1:
        raise Problem("", f"lists {len(names)} upstreams, but {object_path}, and an object lives in one "
                          "account: list one upstream here, and several only on routes with exact paths")


def check_failover_on(categories: tuple[str, ...]) -> None:
    for i, category in enumerate(categories):
        if category in CALLERS_ERRORS:
            raise Problem(f"[{i}]", f"{category!r} is the caller's error: another upstream would answer it "
                                    "the same way, so it never fails over")


class BaseUrl(NamedTuple):
    """How a client's path joins an upstream's URL: a base path ending in /v1 (Azure OpenAI's
    https://R.openai.azure.com/openai/v1) takes the client's path after its /v1; any other URL
    takes it whole (https://api.openai.com + /v1/chat/completions)."""

    base: str  # no trailing slash
    strip: int  # characters dropped from the front of a client path that starts with /v1

    @classmethod
    def of(cls, url: str) -> BaseUrl:
        base = url.rstrip("/")
        return cls(base, 3 if base.endswith("/v1") and base.count("/") > 2 else 0)

    def join(self, path_and_query: str) -> str:
        """The upstream URL for a normalised client path (with its query, as sent)."""
        if self.strip and (path_and_query.startswith("/v1/") or path_and_query[:4] in ("/v1", "/v1?")):
            path_and_query = path_and_query[self.strip:]
        return self.base + path_and_query


def http_url(value: Any) -> str:
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


def forward_proxy_setting(value: Any) -> str:
    if value is None or value in ("none", "env"):
        return value or "none"
    _proxy_url(str(value))
    return str(value)


def ca_file(value: Any) -> str:
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


def proxy_via(setting: str, to: str) -> URL | None:
    """The forward proxy to reach URL `to` through, or None (direct). `env` reads https_proxy /
    http_proxy / no_proxy as urllib and curl do: lower case first, then upper; a value without a
    scheme is http://. A bad value is a Problem whose key is the variable, never its credentials."""
    if setting != "env":
        return None if setting == "none" else _proxy_url(setting)
    url = URL(to)
    found = urllib.request.getproxies_environment()
    value = found.get(url.scheme)
    if not value or urllib.request.proxy_bypass_environment(url.host_port_subcomponent or "", found):
        return None
    name = next((n for n in (f"{url.scheme}_proxy", f"{url.scheme.upper()}_PROXY") if os.environ.get(n)), "")
    try:
        return _proxy_url(value if "://" in value else f"http://{value}")
    except ValueError as exc:
        raise Problem(f"environment {name}", f"{exc} (upstream.proxy is env)") from None
