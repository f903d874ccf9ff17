import pytest

from proxy.routes import Route, RouteTable, compile_path


@pytest.mark.parametrize("pattern, path, hit", [
    ("/v1/chat/completions", "/v1/chat/completions", True),
    ("/v1/chat/completions", "/v1/chat/completions/x", False),
    ("/v1/chat/completions", "/v1/chat", False),
    ("/v1/videos/{id}", "/v1/videos/video_123", True),
    ("/v1/videos/{id}", "/v1/videos/video_123/content", False),
    ("/v1/videos/{id}", "/v1/videos/", False),
    ("/v1/videos/{id}/content", "/v1/videos/v1/content", True),
    ("/v1/files/*", "/v1/files", True),
    ("/v1/files/*", "/v1/files/file-1/content", True),
    ("/v1/files/*", "/v1/filesystem", False),
    ("/*", "/anything/at/all", True),
    ("/v1/{a}/x/{b}", "/v1/1/x/2", True),
])
def test_pattern_matches(pattern, path, hit):
    assert compile_path(pattern).matches(path) is hit


@pytest.mark.parametrize("bad, message", [
    ("v1/chat", "starting with '/'"),
    ("/", "matches nothing"),
    ("/v1//x", "empty segment"),
    ("/v1/*/x", "only as the last segment"),
    ("/v1/x*", "only as the last segment"),
    ("/v1/{id", "bad parameter segment"),
    ("/v1/pre{id}", "bad parameter segment"),
    ("/v1/{}", "bad parameter segment"),
    ("/v1/{id}/{id}", "appears twice"),
    ("/v1/a b", "invalid characters"),
])
def test_invalid_patterns_say_why(bad, message):
    with pytest.raises(ValueError, match=message):
        compile_path(bad)


def _table():
    routes = [
        Route("create", frozenset({"POST"}), compile_path("/v1/videos"), "create"),
        Route("content", None, compile_path("/v1/videos/{id}/content"), "content"),
        Route("poll", frozenset({"GET"}), compile_path("/v1/videos/{id}"), "poll"),
        Route("videos", None, compile_path("/v1/videos/*"), "videos"),
    ]
    return RouteTable(routes, Route("default", None, None, "default"))


@pytest.mark.parametrize("method, path, name", [
    ("POST", "/v1/videos", "create"),
    ("GET", "/v1/videos", "videos"),        # method mismatch falls through to the prefix
    ("GET", "/v1/videos/v_1", "poll"),
    ("DELETE", "/v1/videos/v_1", "videos"),
    ("GET", "/v1/videos/v_1/content", "content"),  # first match wins, order matters
    ("POST", "/v1/chat/completions", "default"),
])
def test_first_match_wins_and_unmatched_is_default(method, path, name):
    table = _table()
    assert table.match(method, path).name == name
    assert table.match(method, path).name == name  # cached answer is the same


def test_cache_is_bounded():
    table = _table()
    for i in range(5000):
        table.match("GET", f"/v1/videos/v_{i}")
    assert len(table._cache) <= 4096
    assert table.match("GET", "/v1/videos/v_4999").name == "poll"
