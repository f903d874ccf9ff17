from multidict import CIMultiDict, CIMultiDictProxy

from proxy.headers import is_event_stream, request_headers, response_headers


def _h(*pairs):
    return CIMultiDictProxy(CIMultiDict(pairs))


def test_request_drops_hop_by_hop_and_named_and_host():
    h = _h(("Host", "127.0.0.1:8080"), ("Authorization", "Bearer sk-x"), ("Connection", "keep-alive, X-Hop"),
           ("Keep-Alive", "timeout=5"), ("X-Hop", "1"), ("Proxy-Authorization", "Basic x"),
           ("Proxy-Connection", "close"), ("TE", "trailers"), ("Trailer", "X"), ("Transfer-Encoding", "chunked"),
           ("Upgrade", "h2c"), ("Content-Length", "10"), ("Content-Type", "application/json"),
           ("X-Stainless-Lang", "python"), ("Accept-Encoding", "gzip"))
    out = request_headers(h)
    assert out == [("Authorization", "Bearer sk-x"), ("Content-Type", "application/json"),
                                 ("X-Stainless-Lang", "python"), ("Accept-Encoding", "gzip")]


def test_response_keeps_encoding_and_repeated_headers():
    h = _h(("Content-Encoding", "gzip"), ("Set-Cookie", "a=1"), ("Set-Cookie", "b=2"), ("Content-Length", "5"),
           ("Transfer-Encoding", "chunked"), ("Connection", "close"), ("x-request-id", "req_1"))
    out = CIMultiDict(response_headers(h))
    assert out.getall("Set-Cookie") == ["a=1", "b=2"]
    assert out["Content-Encoding"] == "gzip"
    assert "Content-Length" not in out and "Transfer-Encoding" not in out and "Connection" not in out
    assert out["x-request-id"] == "req_1"


def test_plain_connection_values_name_no_extra_headers():
    h = _h(("Connection", "keep-alive"), ("Keep-Alive", "timeout=5"), ("X-A", "1"))
    assert request_headers(h) == [("X-A", "1")]


def test_event_stream_detection():
    assert is_event_stream(_h(("Content-Type", "text/event-stream; charset=utf-8")))
    assert not is_event_stream(_h(("Content-Type", "application/json")))
    assert not is_event_stream(_h())


from hypothesis import given, strategies as st  # noqa: E402

from proxy.headers import _REQUEST_DROP, _Filter  # noqa: E402

_NAMES = st.sampled_from(["Host", "host", "Content-Length", "Connection", "Keep-Alive", "TE", "Authorization",
                          "Proxy-Authorization", "proxy-foo", "X-Stainless-Lang", "x-stainless-lang", "Upgrade",
                          "Trailer", "Transfer-Encoding", "OpenAI-Organization"])


@given(st.lists(st.tuples(_NAMES, st.sampled_from(["keep-alive", "close", "a"])), max_size=12))
def test_cached_filter_equals_the_rule(pairs):
    f = _Filter(_REQUEST_DROP)
    headers = CIMultiDictProxy(CIMultiDict(pairs))
    connection = headers.get("Connection")
    drop = set(_REQUEST_DROP)
    if connection is not None and connection.lower() not in ("keep-alive", "close"):
        drop |= {t.strip().lower() for v in headers.getall("Connection") for t in v.split(",") if t.strip()}
    expected = [(n, v) for n, v in headers.items() if n.lower() not in drop and not n.lower().startswith("proxy-")]
    assert f(headers) == expected
    assert f(headers) == expected  # the second time from the name cache


def test_name_cache_is_bounded():
    f = _Filter(_REQUEST_DROP)
    for i in range(3000):
        assert f(CIMultiDictProxy(CIMultiDict([(f"x-{i}", "v"), ("Proxy-Foo", "y")]))) == [(f"x-{i}", "v")]
    assert len(f._known) <= 1024


def test_serialize_head_writes_status_line_and_crlf_lines():
    from proxy.headers import serialize_head

    headers = [("Content-Type", "application/json"), ("x-request-id", "req_1"), ("Content-Length", "2")]
    ours = serialize_head("HTTP/1.1 200 OK", headers)
    assert ours == b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nx-request-id: req_1\r\nContent-Length: 2\r\n\r\n"


def test_serialize_head_keeps_obs_text_bytes_and_refuses_injection():
    import pytest as _pytest

    from proxy.headers import serialize_head

    raw = b"caf\xe9\xff-end"
    value = raw.decode("utf-8", "surrogateescape")  # as the upstream clients decode header bytes
    assert serialize_head("HTTP/1.1 200 OK", [("X-Name", value)]).endswith(b"X-Name: " + raw + b"\r\n\r\n")
    for evil in ("a\r\nSet-Cookie: x", "a\nb", "a\rb", "a\0b"):
        with _pytest.raises(ValueError):
            serialize_head("HTTP/1.1 200 OK", [("X-Evil", evil)])
    with _pytest.raises(ValueError):
        serialize_head("HTTP/1.1 200 OK", [("X-Evil\r\nInjected", "v")])
