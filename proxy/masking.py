"""Secret masking for anything that leaves the process as text: log lines and rendered exceptions.

Keeps enough to debug (`sk-...abcd`: which key, not the key). Pure string functions.
"""

from __future__ import annotations

import re
from typing import Any, TypeVar

SECRET_HEADERS = frozenset({"authorization", "proxy-authorization", "api-key", "x-api-key", "openai-api-key"})

# The shape rules (docs/reliability.md, "Masking"), anywhere in any text, no word boundary needed:
# 1. OpenAI key prefixes (sk-, sk-proj-, sk-svcacct-, sk-admin-; sess- session keys) unless glued to a
#    letter or digit before them: `id_sk-proj-...` and `/sk-...` are keys, `risk-...` is a word.
_SK = re.compile(r"(?<![A-Za-z0-9])(?:sk-[A-Za-z0-9_\-]{8,}|sess-[A-Za-z0-9]{20,})")
# 2. Every OpenAI key holds T3BlbkFJ (base64 of "OpenAI"): the whole run of key characters around it,
#    whatever its prefix. The lookbehind starts a match only where a run starts: linear, not quadratic.
_MARKED = re.compile(r"(?<![A-Za-z0-9_\-])[A-Za-z0-9_\-]*?T3BlbkFJ[A-Za-z0-9_\-]*")
# 3. A path segment or query value that starts with 32 or more letters and digits, both kinds: a random
#    secret (an Azure key is 32 hex digits). OpenAI's ids start with a word and a separator (file-abc,
#    resp_68af..., chatcmpl-B9M..., req_...) and are kept.
_LONG = re.compile(r"(?<=[/=])[A-Za-z0-9]{32,}")
# secret header values, in "Name: value" or JSON/repr "'name': 'value'" forms
_HEADER = re.compile(rf"""(?i)(\b(?:{"|".join(sorted(SECRET_HEADERS))})\b["']?\s*[:=]\s*["']?)"""
                     r"""((?:bearer|basic)\s+)?([^\s"',;}\]]+)""")
# key=..., api_key=..., api-key=..., access_token=... in URLs and query strings
_QUERY = re.compile(r"(?i)([?&;](?:key|api_key|api-key|apikey|access_token|token)=)([^&#\s\"']+)")
# user:password@ in URLs
_USERINFO = re.compile(r"(?i)(\b[a-z][a-z0-9+.\-]*://)([^/@\s:]+):([^/@\s]+)@")

# Every pattern above needs one of these; most log strings have none and skip the regexes.
_TRIGGER = re.compile(r"(?i)sk-|sess-|auth|api|key|token|://|t3blbkfj|[/=][a-z0-9]{32}")
# rule 3's part of _TRIGGER for ASCII text, one literal first character each: sre then scans ~3x faster
_SLASH_LONG, _EQUALS_LONG = re.compile(r"/[A-Za-z0-9]{32}"), re.compile(r"=[A-Za-z0-9]{32}")

_Text = TypeVar("_Text", str, None)

# Secrets the config named (an upstream's injected credential): masked wherever they appear, whatever
# their shape. Only ever added to: a secret replaced by a reload stays masked.
_KNOWN: set[str] = set()
_known: tuple[str, ...] = ()


class Secret:
    """A credential read from the environment or a file. Creating one (unpickling too: a worker gets
    its config by pickle) registers it, so every mask() in the process hides it; its repr never shows it."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        global _known
        self._value = value
        if value not in _KNOWN:
            _KNOWN.add(value)
            _known = tuple(sorted(_KNOWN, key=len, reverse=True))  # the longest first: one may hold another

    def reveal(self) -> str:
        """The value itself: only for the header sent upstream."""
        return self._value

    def __repr__(self) -> str:
        return "Secret(***)"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    def __reduce__(self) -> tuple[type[Secret], tuple[str]]:
        return Secret, (self._value,)


def mask_token(secret: str) -> str:
    """`sk-proj-abc...wxyz` -> `sk-...wxyz`; anything else -> `...wxyz` (or `...` when short)."""
    if "..." in secret:
        return secret  # masked already
    return ("sk-" if secret.startswith("sk-") else "") + (f"...{secret[-4:]}" if len(secret) >= 12 else "...")


def _may_hold_secret(text: str) -> bool:
    """_TRIGGER, faster for ASCII text (most log strings); other text takes the regex, whose case
    folding (the Kelvin sign, dotless i) lower() does not reproduce."""
    if not text.isascii():
        return _TRIGGER.search(text) is not None
    low = text.lower()
    if ("sk-" in low or "auth" in low or "api" in low or "key" in low or "token" in low or "://" in low
            or "sess-" in low or "t3blbkfj" in low):
        return True
    return len(text) > 32 and (("/" in text and _SLASH_LONG.search(text) is not None)
                               or ("=" in text and _EQUALS_LONG.search(text) is not None))


def mask(text: _Text) -> _Text:
    """Every secret in free text masked; None and "" pass through."""
    if not text:
        return text
    if _known:
        text = _mask_known(text)
    if not _may_hold_secret(text):
        return text
    text = _HEADER.sub(lambda m: m.group(1) + (m.group(2) or "") + mask_token(m.group(3)), text)
    text = _SK.sub(_masked, text)
    if "T3BlbkFJ" in text:
        text = _MARKED.sub(_masked, text)
    text = _QUERY.sub(lambda m: m.group(1) + mask_token(m.group(2)), text)
    text = _LONG.sub(_random_masked, text)
    return _USERINFO.sub(lambda m: f"{m.group(1)}{m.group(2)}:***@", text)


def _mask_known(text: str) -> str:
    for secret in _known:
        if secret in text:
            text = text.replace(secret, mask_token(secret))
    return text


def _masked(m: re.Match[str]) -> str:
    return mask_token(m.group(0))


def _random_masked(m: re.Match[str]) -> str:
    """Rule 3 masks runs that mix letters and digits: a long word or number is no secret."""
    run = m.group(0)
    return run if run.isdigit() or run.isalpha() else mask_token(run)


def mask_value(value: Any) -> Any:
    """Mask every string inside nested dicts, lists and tuples; other values pass unchanged."""
    if isinstance(value, str):
        return mask(value)
    if isinstance(value, dict):
        return {k: (mask_token(v) if isinstance(v, str) and str(k).lower() in SECRET_HEADERS else mask_value(v))
                for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [mask_value(v) for v in value]
    return value


def mask_event(logger: Any, method_name: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    """structlog processor: the last one before the renderer, so it also sees rendered exceptions."""
    return mask_value(event_dict)  # type: ignore[no-any-return]
