"""Secret masking for anything that leaves the process as text: log lines and rendered exceptions.

Keeps enough to debug (`sk-...abcd`: which key, not the key). Pure string functions.
"""

from __future__ import annotations

import re
from typing import Any, TypeVar

SECRET_HEADERS = frozenset({"authorization", "proxy-authorization", "api-key", "x-api-key", "openai-api-key"})

# OpenAI keys (sk-..., sk-proj-..., sk-svcacct-..., sk-admin-...) and look-alikes in any text
_SK = re.compile(r"\bsk-[A-Za-z0-9_\-]{8,}")
# secret header values, in "Name: value" or JSON/repr "'name': 'value'" forms
_HEADER = re.compile(rf"""(?i)(\b(?:{"|".join(sorted(SECRET_HEADERS))})\b["']?\s*[:=]\s*["']?)"""
                     r"""((?:bearer|basic)\s+)?([^\s"',;}\]]+)""")
# key=..., api_key=..., api-key=..., access_token=... in URLs and query strings
_QUERY = re.compile(r"(?i)([?&;](?:key|api_key|api-key|apikey|access_token|token)=)([^&#\s\"']+)")
# user:password@ in URLs
_USERINFO = re.compile(r"(?i)(\b[a-z][a-z0-9+.\-]*://)([^/@\s:]+):([^/@\s]+)@")

# Every pattern above needs one of these; most log strings have none and skip the regexes.
_TRIGGER = re.compile(r"(?i)sk-|auth|api|key|token|://")

_Text = TypeVar("_Text", str, None)


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
    return "sk-" in low or "auth" in low or "api" in low or "key" in low or "token" in low or "://" in low


def mask(text: _Text) -> _Text:
    """Every secret in free text masked; None and "" pass through."""
    if not text or not _may_hold_secret(text):
        return text
    text = _HEADER.sub(lambda m: m.group(1) + (m.group(2) or "") + mask_token(m.group(3)), text)
    text = _SK.sub(lambda m: mask_token(m.group(0)), text)
    text = _QUERY.sub(lambda m: m.group(1) + mask_token(m.group(2)), text)
    return _USERINFO.sub(lambda m: f"{m.group(1)}{m.group(2)}:***@", text)


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
