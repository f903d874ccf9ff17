"""Config loading: defaults, merging, and one exact message per kind of bad input."""

import tomllib
from importlib import resources
from pathlib import Path

import msgspec
import pytest

from proxy import config as cfg

ROOT = Path(__file__).resolve().parents[2]


def _load(tmp_path, text, name="config.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return cfg.load(str(p))


def _error(tmp_path, text):
    with pytest.raises(cfg.ConfigError) as info:
        _load(tmp_path, text)
    return str(info.value).replace(str(tmp_path) + "/", "")


def test_builtin_defaults_match_design():
    c = cfg.load(None)
    assert (c.listen.host, c.listen.port, c.admin.host, c.admin.port) == ("127.0.0.1", 8080, "0.0.0.0", 9090)
    assert c.upstream.url == "https://api.openai.com"
    t = c.defaults.timeouts
    assert (t.connect, t.first_byte, t.idle, t.total) == (5, 600, 300, 900)
    assert c.defaults.retry.replay_limit == 1 << 20
    assert c.routes.default.name == "default"
    assert [r.name for r in c.routes.routes][:3] == ["videos_create", "batches_create", "fine_tuning_create"]


@pytest.mark.parametrize("method, path, route, attempts, retry_on", [
    ("POST", "/v1/videos", "videos_create", 3, {"connect", "rate_limit"}),
    ("POST", "/v1/videos/video_1/remix", "videos_create", 3, {"connect", "rate_limit"}),
    ("POST", "/v1/batches", "batches_create", 3, {"connect", "rate_limit"}),
    ("GET", "/v1/videos/video_1", "videos_poll", 6, None),
    ("GET", "/v1/videos/video_1/content", "videos_content", 5, None),
    ("GET", "/v1/responses/resp_1", "responses_poll", 6, None),
    ("POST", "/v1/chat/completions", "chat_completions", 3, None),
    ("POST", "/v1/embeddings", "embeddings", 4, None),
    ("POST", "/v1/audio/transcriptions", "audio", 3, None),
    ("POST", "/v1/images/generations", "images", 3, {"connect", "server", "rate_limit"}),
    ("GET", "/v1/models", "default", 3, None),
])
def test_builtin_routes(method, path, route, attempts, retry_on):
    r = cfg.load(None).routes.match(method, path)
    assert r.name == route and r.policy.retry.max_attempts == attempts
    if retry_on is not None:
        assert set(r.policy.retry.retry_on) == retry_on


def test_own_routes_replace_the_builtin_list(tmp_path):
    c = _load(tmp_path, "routes:\n  - {name: mine, path: /v1/x}\n")
    assert [r.name for r in c.routes.routes] == ["mine"]
    assert _load(tmp_path, "routes: []\n").routes.routes == ()


def test_default_yaml_is_the_one_source_of_builtin_values():
    """config/default.yaml (where the README points) is the file the package ships and loads, and
    no config class writes a built-in value of its own: a section made in Python takes the file's."""
    assert (ROOT / "config" / "default.yaml").resolve() == ROOT / "proxy" / "default.yaml"
    assert (resources.files("proxy") / "default.yaml").is_file()
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "default.yaml" in pyproject["tool"]["setuptools"]["package-data"]["proxy"]
    for cls in (cfg.Listen, cfg.Admin, cfg.Upstream, cfg.Policy, cfg.Timeouts, cfg.Retry, cfg.Backoff,
                cfg.Budget, cfg.Breaker, cfg.Log):
        assert all(f.default in (cfg.BUILTIN, None) for f in msgspec.structs.fields(cls)), cls
    builtin = cfg.load(None)
    assert cfg.Retry() == builtin.defaults.retry and cfg.Listen(port=1).host == builtin.listen.host
    assert cfg.effective(cfg.load(str(ROOT / "config" / "default.yaml"))) == cfg.effective(builtin)


def test_an_empty_section_keeps_the_builtin_values(tmp_path):
    c = _load(tmp_path, "listen:\ndefaults:\nroutes:\n")
    assert cfg.effective(c) == cfg.effective(cfg.load(None))


@pytest.mark.parametrize("example", sorted((ROOT / "config" / "examples").glob("*.yaml")), ids=lambda p: p.name)
def test_examples_are_valid(example):
    cfg.load(str(example))


def test_sora_example_routes():
    c = cfg.load(str(ROOT / "config" / "examples" / "sora-video-polling.yaml"))
    create = c.routes.match("POST", "/v1/videos")
    poll = c.routes.match("GET", "/v1/videos/video_abc")
    content = c.routes.match("GET", "/v1/videos/video_abc/content")
    assert create.name == "videos_create" and set(create.policy.retry.retry_on) == {"connect", "rate_limit"}
    assert poll.name == "videos_poll" and poll.policy.retry.max_attempts >= 5
    assert content.name == "videos_content"
    assert c.routes.match("POST", "/v1/chat/completions").name == "default"


def test_route_sections_merge_key_by_key_over_defaults(tmp_path):
    c = _load(tmp_path, """
defaults:
  timeouts: {connect: 2s}
  retry: {max_attempts: 5, backoff: {initial: 100ms}}
routes:
  - name: chat
    path: /v1/chat/completions
    methods: [POST]
    retry: {backoff: {max: 1s}}
    timeouts: {idle: 30s}
""")
    r = c.routes.match("POST", "/v1/chat/completions")
    assert r.name == "chat"
    assert r.policy.retry.max_attempts == 5                   # from defaults
    assert r.policy.retry.backoff.initial == pytest.approx(0.1)  # from defaults
    assert r.policy.retry.backoff.max == 1                    # from the route
    assert r.policy.timeouts.connect == 2 and r.policy.timeouts.idle == 30
    assert r.policy.timeouts.first_byte == 600                # built-in
    assert c.routes.match("GET", "/v1/chat/completions").name == "default"


def test_overrides_beat_the_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("listen: {port: 7000}\nupstream: {url: http://a.example}\n")
    c = cfg.load(str(p), [("PROXY_PORT", ("listen", "port"), "7001"), ("--port", ("listen", "port"), "7002")])
    assert c.listen.port == 7002 and c.upstream.url == "http://a.example"


@pytest.mark.parametrize("text, message", [
    ("defaults:\n  retry:\n    backoff: {initial: fast}\n",
     'config.yaml: defaults.retry.backoff.initial: expected a duration like "250ms", "5s" or "2m", got \'fast\''),
    ("defaults:\n  timeouts: {connect: 5}\n",
     'config.yaml: defaults.timeouts.connect: expected a duration like "250ms", "5s" or "2m", got 5'),
    ("defaults:\n  timeouts: {connect: 0s}\n",
     "config.yaml: defaults.timeouts.connect: expected a duration above zero, got '0s'"),
    ("defaults:\n  retry: {replay_limit: lots}\n",
     "config.yaml: defaults.retry.replay_limit: expected a size like \"64KiB\" or \"1MiB\", got 'lots'"),
    ("listen: {port: 99999}\n", "config.yaml: listen.port: expected a port number from 0 to 65535, got 99999"),
    ("listen: {port: eighty}\n", "config.yaml: listen.port: expected a port number from 0 to 65535, got 'eighty'"),
    ("upstream: {url: api.openai.com}\n",
     "config.yaml: upstream.url: expected an http:// or https:// base URL without query, got 'api.openai.com'"),
    ("lisen: {port: 1}\n", "config.yaml: unknown key 'lisen'"),
    ("defaults:\n  retry: {max_attemps: 2}\n", "config.yaml: defaults.retry: unknown key 'max_attemps'"),
    ("defaults:\n  retry: {retry_on: [server, bogus]}\n",
     "config.yaml: defaults.retry.retry_on[1]: expected one of connect, network, timeout, server, rate_limit, "
     "quota_exceeded, authentication, client, invalid_response, got 'bogus'"),
    ("defaults:\n  retry: {backoff: {initial: 2s, max: 1s}}\n",
     "config.yaml: defaults.retry.backoff.max: must not be less than backoff.initial (2s)"),
    ("admin: 9090\n", "config.yaml: admin: expected a mapping, got 9090"),
    ("routes:\n  - name: a\n    path: /v1/x/*/y\n",
     "config.yaml: routes[0].path: '*' is allowed only as the last segment ('/*') in '/v1/x/*/y'"),
    ("routes:\n  - name: a\n    path: v1/x\n", "config.yaml: routes[0].path: expected a path starting with '/', got 'v1/x'"),
    ("routes:\n  - path: /v1/x\n", "config.yaml: routes[0]: missing required key 'name'"),
    ("routes:\n  - {name: a, path: /v1/x}\n  - {name: a, path: /v1/y}\n",
     "config.yaml: routes[1].name: duplicate route name 'a'"),
    ("routes:\n  - {name: default, path: /v1/x}\n",
     "config.yaml: routes[0].name: expected letters, digits, '_', '.' or '-' and not 'default', got 'default'"),
    ("routes:\n  - {name: a, path: /v1/x, methods: [post]}\n",
     "config.yaml: routes[0].methods[0]: expected an upper-case HTTP method, got 'post'"),
    ("routes:\n  - name: a\n    path: /v1/x\n    retry: {max_attempts: 0}\n",
     "config.yaml: routes[0].retry.max_attempts: expected an integer >= 1, got 0"),
    ("routes:\n  - name: a\n    path: /v1/x\n    timeouts: {idle: soon}\n",
     'config.yaml: routes[0].timeouts.idle: expected a duration like "250ms", "5s" or "2m", got \'soon\''),
    ("routes:\n  - name: a\n    path: /v1/x\n    retry: {colour: red}\n", "config.yaml: routes[0].retry: unknown key 'colour'"),
    ("routes:\n  - {name: a, path: /v1/a, breaker: {group: up}}\n"
     "  - {name: b, path: /v1/b, breaker: {group: up, failure_threshold: 9}}\n",
     "config.yaml: routes[1].breaker: breaker group 'up' is set up differently in routes[0].breaker; "
     "a group has one configuration"),
    ("log: {level: loud}\n", "config.yaml: log.level: expected one of debug, info, warning, error, got 'loud'"),
    ("- a\n- b\n", "config.yaml: expected a mapping of settings at the top level, got list"),
    ("listen:\n  port: [1\n", "config.yaml: line 3, column 1: YAML syntax error: expected ',' or ']', but got '<stream end>'"),
    ("listen:\n\tport: 1\n", "config.yaml: line 2, column 1: YAML syntax error: found character '\\t' that cannot start any token"),
])
def test_bad_config_names_file_key_and_problem(tmp_path, text, message):
    assert _error(tmp_path, text) == message


def test_missing_file(tmp_path):
    with pytest.raises(cfg.ConfigError) as info:
        cfg.load(str(tmp_path / "nope.yaml"))
    assert str(info.value) == f"{tmp_path}/nope.yaml: file not found"


@pytest.mark.parametrize("label, keys, value, message", [
    ("PROXY_PORT", ("listen", "port"), "abc", "PROXY_PORT: expected a port number from 0 to 65535, got 'abc'"),
    ("--admin-port", ("admin", "port"), "-1", "--admin-port: expected a port number from 0 to 65535, got '-1'"),
    ("PROXY_UPSTREAM_URL", ("upstream", "url"), "ftp://x",
     "PROXY_UPSTREAM_URL: expected an http:// or https:// base URL without query, got 'ftp://x'"),
    ("PROXY_LOG_LEVEL", ("log", "level"), "loud", "PROXY_LOG_LEVEL: expected one of debug, info, warning, error, got 'loud'"),
    ("PROXY_WORKERS", ("workers",), "0", "PROXY_WORKERS: expected an integer >= 1, got '0'"),
    ("--log-format", ("log", "format"), "xml", "--log-format: expected one of json, console, got 'xml'"),
])
def test_bad_override_names_its_own_source(label, keys, value, message):
    with pytest.raises(cfg.ConfigError) as info:
        cfg.load(None, [(label, keys, value)])
    assert str(info.value) == message


def test_empty_file_is_defaults(tmp_path):
    assert cfg.effective(_load(tmp_path, "")) == cfg.effective(cfg.load(None))
