import pytest

from proxy.routes import Route, RouteTable, compile_path, split_path


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
    assert compile_path(pattern).matches_parts(split_path(path)) is hit


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


# ---- the segment trie answers exactly as a first-match scan in config order ----------------------

from hypothesis import given, settings, strategies as st  # noqa: E402

_SEG = st.sampled_from(["v1", "videos", "files", "x", "content", "{id}", "{b}"])
_METHODS = st.one_of(st.none(), st.sets(st.sampled_from(["GET", "POST", "DELETE"]), min_size=1).map(frozenset))


@st.composite
def _patterns(draw):
    segs = draw(st.lists(_SEG, max_size=4))
    seen: list[str] = []
    for s in segs:  # a parameter name may appear once per pattern
        seen.append(s if not s.startswith("{") or s not in seen else "x")
    prefix = draw(st.booleans()) or not seen
    return "/" + "/".join(seen) + ("/*" if prefix else "") if seen else "/*"


_PATH = st.lists(st.sampled_from(["v1", "videos", "files", "x", "content", "v_1", ""]), max_size=5).map(
    lambda parts: "/" + "/".join(parts))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(_patterns(), _METHODS), max_size=8), _PATH, st.sampled_from(["GET", "POST", "DELETE"]))
def test_trie_matches_a_linear_scan(specs, path, method):
    routes = [Route(f"r{i}", methods, compile_path(text), i) for i, (text, methods) in enumerate(specs)]
    table = RouteTable(routes, Route("default", None, None, -1))
    parts = path.strip("/").split("/") if path != "/" else []
    expected = next((r for r in routes if (r.methods is None or method in r.methods)
                     and r.pattern is not None and r.pattern.matches_parts(parts)), table.default)
    assert table.match(method, path) is expected


def test_a_thousand_routes_route_by_trie():
    routes = [Route(f"r{i}", None, compile_path(f"/v1/tenant{i}/{{id}}"), i) for i in range(1000)]
    table = RouteTable(routes, Route("default", None, None, -1))
    assert table.match("GET", "/v1/tenant999/abc").name == "r999"
    assert table.match("GET", "/v1/tenant1000/abc").name == "default"
