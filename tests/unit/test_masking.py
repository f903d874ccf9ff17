import pytest

from proxy.masking import mask, mask_event, mask_token

KEY = "sk-proj-AbCdEf0123456789_xyz-TUVWabcd"


@pytest.mark.parametrize("text, expected", [
    (f"Bearer {KEY}", "Bearer sk-...abcd"),
    (f"Authorization: Bearer {KEY}", "Authorization: Bearer sk-...abcd"),
    (f"{{'Authorization': 'Bearer {KEY}'}}", "{'Authorization': 'Bearer sk-...abcd'}"),
    ('{"authorization": "Bearer opaque-token-1234567890"}', '{"authorization": "Bearer ...7890"}'),
    ("api-key: 0123456789abcdef0123", "api-key: ...0123"),
    ("X-Api-Key=abcdefghijklmnop", "X-Api-Key=...mnop"),
    (f"Incorrect API key provided: {KEY}. You can find your API key at ...",
     "Incorrect API key provided: sk-...abcd. You can find your API key at ..."),
    ("GET /v1/models?key=AIzaSyA-very-secret-value&x=1", "GET /v1/models?key=...alue&x=1"),
    ("https://h/v1?api_key=short", "https://h/v1?api_key=..."),
    ("https://h/v1?a=1&api-key=0123456789abcdef", "https://h/v1?a=1&api-key=...cdef"),
    ("https://user:hunter2@proxy.example:8443/v1", "https://user:***@proxy.example:8443/v1"),
    ("nothing secret here: sk-8 is short", "nothing secret here: sk-8 is short"),
    ("", ""),
])
def test_mask(text, expected):
    assert mask(text) == expected
    assert mask(mask(text)) == expected  # idempotent


def test_mask_token_keeps_the_last_four():
    assert mask_token(KEY) == "sk-...abcd"
    assert mask_token("short") == "..."


def test_event_masking_is_deep_and_sees_rendered_exceptions():
    event = {
        "event": "request", "path": "/v1/x", "status": 401, "attempts": 1,
        "headers": {"Authorization": f"Bearer {KEY}", "x-api-key": "abcdefghijklmnopqrst", "X-Other": "fine"},
        "exception": f"Traceback ...\nValueError: bad key {KEY}",
        "nested": [{"url": f"https://api/v1?key={KEY}"}, ("tuple", KEY)],
    }
    out = mask_event(None, "info", event)
    assert KEY not in repr(out) and "abcdefghijklmnopqrst" not in repr(out)
    assert out["headers"]["Authorization"] == "sk-...abcd" or out["headers"]["Authorization"].endswith("...abcd")
    assert out["headers"]["X-Other"] == "fine" and out["status"] == 401 and out["attempts"] == 1


from hypothesis import given, strategies as st  # noqa: E402

from proxy.masking import _TRIGGER, _may_hold_secret  # noqa: E402

_PIECES = st.sampled_from(["sk-", "SK-", "Auth", "aPi", "KEY", "Token", "://", ":/", "s", "k", "-", "a", "/v1/chat",
                           "\u212a", "\u0131", "é", " ", "x"])


@given(st.lists(_PIECES, max_size=8).map("".join) | st.text(max_size=40))
def test_fast_prefilter_agrees_with_the_regex(text):
    assert _may_hold_secret(text) == (_TRIGGER.search(text) is not None)
