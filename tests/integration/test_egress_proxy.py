"""Egress through a corporate forward proxy (upstream.proxy, upstream.ca_file): a forward proxy
started here on 127.0.0.1 sees absolute-form requests for an http upstream and a CONNECT tunnel for
an https one (TLS inside it, to a local upstream whose certificate a CA made here signs). The upstream
host, api.openai.test, resolves nowhere: only the forward proxy knows where it is, so a request that
arrives went through it. The proxy's credentials never leave the process in clear.
"""

from __future__ import annotations

import asyncio
import base64
import os
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import openai
import pytest
from yarl import URL

from proxy import config as cfg
from proxy.testing import MockUpstream

from ..conftest import ROOT, TEST_KEY, write_config

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
HOST = "api.openai.test"
USER, PASSWORD = "egress", "pa:ss-hunter2-0000"  # the password's ':' travels %-encoded in the URL
CREDENTIALS = f"{USER}:{PASSWORD.replace(':', '%3A')}"
BOUND = 10.0


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, seen: bytearray | None = None) -> None:
    try:
        while data := await reader.read(65536):
            if seen is not None:
                seen += data
            writer.write(data)
            await writer.drain()
    except OSError:
        pass
    finally:
        writer.close()


class ForwardProxy:
    """CONNECT and absolute-form requests (rewritten to origin-form, one by one, Content-Length bodies),
    Basic credentials checked when `auth` is set; `routes` maps host:port as asked to where it listens."""

    def __init__(self, routes: dict[str, tuple[str, int]], auth: str | None = None) -> None:
        self.routes, self.auth = routes, auth
        self.heads: list[str] = []  # every request head it received
        self.tunnelled = bytearray()  # bytes clients sent into CONNECT tunnels
        self.connections = 0
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> ForwardProxy:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def url(self, credentials: str | None = CREDENTIALS) -> str:
        return f"http://{credentials + '@' if credentials else ''}127.0.0.1:{self.port}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self._exchange(reader, writer)
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def _read_head(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
                         ) -> tuple[str, str, dict[str, str]] | None:
        head = (await reader.readuntil(b"\r\n\r\n")).decode()
        self.heads.append(head)
        line, *fields = head[:-4].split("\r\n")
        method, target, _ = line.split(" ")
        headers = {k.lower(): v for k, v in (f.split(": ", 1) for f in fields)}
        if self.auth is not None and headers.get("proxy-authorization") != "Basic " + base64.b64encode(
                self.auth.encode()).decode():
            writer.write(b'HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic realm="t"\r\n'
                         b"Connection: close\r\nContent-Length: 0\r\n\r\n")
            return None
        return method, target, headers

    async def _exchange(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if (got := await self._read_head(reader, writer)) is None:
            return
        method, target, headers = got
        u = URL(target if method != "CONNECT" else f"//{target}")
        if (where := self.routes.get(f"{u.host}:{u.port}")) is None:
            writer.write(b"HTTP/1.1 502 Bad Gateway\r\nConnection: close\r\nContent-Length: 0\r\n\r\n")
            return
        up_reader, up_writer = await asyncio.open_connection(*where)
        if method == "CONNECT":
            writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            await asyncio.gather(_pipe(reader, up_writer, self.tunnelled), _pipe(up_reader, writer))
            return
        back = asyncio.create_task(_pipe(up_reader, writer))
        try:
            while got is not None:  # each request: origin-form, without the proxy's own header
                method, target, headers = got
                assert "transfer-encoding" not in headers, "this test proxy reads Content-Length bodies only"
                fields = "".join(f"{k}: {v}\r\n" for k, v in headers.items() if k != "proxy-authorization")
                up_writer.write(f"{method} {URL(target).raw_path_qs} HTTP/1.1\r\n{fields}\r\n".encode())
                up_writer.write(await reader.readexactly(int(headers.get("content-length", 0))))
                got = await self._read_head(reader, writer)
        finally:
            up_writer.close()
            await back


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A CA, and a certificate for api.openai.test that it signs (openssl: no `cryptography` here)."""
    d = tmp_path_factory.mktemp("egress-tls")
    f = {name: d / name for name in ("ca.pem", "ca.key", "srv.pem", "srv.key", "srv.csr", "ext.cnf")}
    f["ext.cnf"].write_text(f"subjectAltName=DNS:{HOST}\n")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    for args in (["req", "-x509", *ec, "-keyout", f["ca.key"], "-out", f["ca.pem"], "-days", "2", "-subj", "/CN=egress test CA",
                  "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign"],
                 ["req", *ec, "-keyout", f["srv.key"], "-out", f["srv.csr"], "-subj", f"/CN={HOST}"],
                 ["x509", "-req", "-in", f["srv.csr"], "-CA", f["ca.pem"], "-CAkey", f["ca.key"], "-CAcreateserial",
                  "-out", f["srv.pem"], "-days", "2", "-extfile", f["ext.cnf"]]):
        try:
            subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True)
        except (OSError, subprocess.CalledProcessError) as exc:
            pytest.skip(f"openssl could not make the test certificates: {exc}")
    return f


class TlsUpstream:
    """TLS in front of the mock (api.openai.test's certificate); records the SNI each handshake named."""

    def __init__(self, files: dict[str, Path], mock: MockUpstream) -> None:
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.load_cert_chain(files["srv.pem"], files["srv.key"])
        self.context.sni_callback = lambda sock, name, ctx: self.sni.append(name)  # type: ignore[assignment]
        self.sni: list[str | None] = []
        self.mock = URL(mock.url)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(self.mock.host, self.mock.port)
        await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))

    async def __aenter__(self) -> tuple[str, int]:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.context)
        return self.server.sockets[0].getsockname()[:2]

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()


@pytest.fixture(autouse=True)
def no_proxy_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.lower().endswith("_proxy") or name == "SSL_CERT_FILE":
            monkeypatch.delenv(name)


@pytest.fixture
async def tls_upstream(tls_files: dict[str, Path], mock: MockUpstream) -> AsyncIterator[TlsUpstream]:
    up = TlsUpstream(tls_files, mock)
    up.address = await up.__aenter__()  # type: ignore[attr-defined]
    yield up
    await up.__aexit__()


def _sdk(proxy) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=proxy.base_url, api_key=TEST_KEY, max_retries=0, timeout=30)


async def test_http_upstream_through_the_forward_proxy_in_absolute_form(start_proxy, mock: MockUpstream):
    mock_at = (URL(mock.url).host, URL(mock.url).port)
    async with ForwardProxy({f"{HOST}:80": mock_at}, auth=f"{USER}:{PASSWORD}") as fwd:
        proxy = await start_proxy({"upstream": {"proxy": fwd.url()}}, upstream=f"http://{HOST}")
        async with _sdk(proxy) as client, asyncio.timeout(BOUND):
            for _ in range(2):  # the client's own Proxy-Authorization is not the proxy's: it stays behind
                await client.chat.completions.create(**CHAT, extra_headers={"Proxy-Authorization": "Basic bm9wZQ=="})
    assert [h.split("\r\n")[0] for h in fwd.heads] == [f"POST http://{HOST}/v1/chat/completions HTTP/1.1"] * 2
    assert all(h.count("Proxy-Authorization") == 1 and f"Host: {HOST}\r\n" in h for h in fwd.heads)
    assert fwd.connections == 1  # kept alive through the proxy
    assert [r.headers["Host"] for r in mock.received] == [HOST, HOST]


async def test_https_upstream_through_a_connect_tunnel(start_proxy, mock: MockUpstream, tls_upstream, tls_files):
    async with ForwardProxy({f"{HOST}:443": tls_upstream.address}, auth=f"{USER}:{PASSWORD}") as fwd:
        proxy = await start_proxy({"upstream": {"proxy": fwd.url(), "ca_file": str(tls_files["ca.pem"])}},
                                  upstream=f"https://{HOST}")
        async with _sdk(proxy) as client, asyncio.timeout(BOUND):
            for _ in range(2):
                await client.chat.completions.create(**CHAT)
    assert [h.split("\r\n")[:2] for h in fwd.heads] == [[f"CONNECT {HOST}:443 HTTP/1.1", f"Host: {HOST}:443"]]
    assert tls_upstream.sni == [HOST]  # one tunnel, one handshake, reused; SNI names the upstream
    assert len(mock.received) == 2 and b"chat/completions" not in fwd.tunnelled  # TLS end to end
    assert TEST_KEY.encode() not in fwd.tunnelled


async def test_ssl_cert_file_is_honoured(start_proxy, tls_upstream, tls_files, monkeypatch):
    """No ca_file: the system store, which SSL_CERT_FILE replaces (OpenSSL's default verify paths)."""
    async with ForwardProxy({f"{HOST}:443": tls_upstream.address}) as fwd:
        proxy = await start_proxy({"upstream": {"proxy": fwd.url(None)}}, upstream=f"https://{HOST}")
        async with _sdk(proxy) as client, asyncio.timeout(BOUND):
            with pytest.raises(openai.APIStatusError) as info:
                await client.chat.completions.create(**CHAT)
            assert "its TLS certificate could not be verified" in info.value.message
            monkeypatch.setenv("SSL_CERT_FILE", str(tls_files["ca.pem"]))
            proxy = await start_proxy({"upstream": {"proxy": fwd.url(None)}}, upstream=f"https://{HOST}")
        async with _sdk(proxy) as client, asyncio.timeout(BOUND):
            await client.chat.completions.create(**CHAT)


@pytest.mark.parametrize("case, phrase", [
    ("wrong credentials", "the forward proxy refused the tunnel (407 Proxy Authentication Required): "
                          "check the credentials in upstream.proxy"),
    ("unknown host", "the forward proxy refused the tunnel (502 Bad Gateway)"),
    ("proxy down", "the forward proxy could not be reached: the connection was refused"),
])
async def test_a_refused_tunnel_is_a_connect_failure(start_proxy, recorder, case, phrase):
    async with ForwardProxy({} if case == "unknown host" else {f"{HOST}:443": ("127.0.0.1", 9)},
                            auth=f"{USER}:right") as fwd:
        url = fwd.url()
    if case != "proxy down":
        fwd = await ForwardProxy(fwd.routes, fwd.auth).__aenter__()
        url = fwd.url(f"{USER}:right" if case == "unknown host" else CREDENTIALS)
    try:
        proxy = await start_proxy({"upstream": {"proxy": url}}, upstream=f"https://{HOST}")
        async with _sdk(proxy) as client, asyncio.timeout(BOUND):
            with pytest.raises(openai.APIStatusError) as info:
                await client.chat.completions.create(**CHAT)
    finally:
        if case != "proxy down":
            await fwd.__aexit__()
    err = info.value
    assert (err.status_code, err.code) == (502, "upstream_connect_error")
    assert f"Could not connect to {HOST}: {phrase};" in err.response.json()["error"]["message"]
    assert recorder.requests[-1].category == "connect" and recorder.requests[-1].attempts == 3
    assert "hunter2" not in err.response.text


async def test_env_mode_follows_http_proxy_and_no_proxy(start_proxy, mock: MockUpstream, monkeypatch):
    mock_at = (URL(mock.url).host, URL(mock.url).port)
    async with ForwardProxy({f"{HOST}:80": mock_at, f"{mock_at[0]}:{mock_at[1]}": mock_at}) as fwd:
        monkeypatch.setenv("http_proxy", f"127.0.0.1:{fwd.port}")  # no scheme: http://, as curl reads it
        monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")  # lower case wins, as in urllib and curl
        monkeypatch.setenv("NO_PROXY", f"localhost,{mock_at[0]}")
        via = await start_proxy({"upstream": {"proxy": "env"}}, upstream=f"http://{HOST}")
        direct = await start_proxy({"upstream": {"proxy": "env"}}, upstream=mock.url)  # 127.0.0.1: no_proxy
        async with _sdk(via) as a, _sdk(direct) as b, asyncio.timeout(BOUND):
            await a.chat.completions.create(**CHAT)
            await b.chat.completions.create(**CHAT)
    assert [h.split("\r\n")[0] for h in fwd.heads] == [f"POST http://{HOST}/v1/chat/completions HTTP/1.1"]
    assert len(mock.received) == 2


@pytest.mark.parametrize("upstream, env, message", [
    ({"proxy": "socks5://u:secretpw@h:1080"}, {},
     "config.yaml: upstream.proxy: a forward proxy must be http://, not socks5://, got 'socks5://u:***@h:1080'"),
    ({"proxy": "proxy.corp:3128"}, {},
     "config.yaml: upstream.proxy: expected none, env or http://[user:password@]host:port, got 'proxy.corp:3128'"),
    ({"proxy": "env"}, {"https_proxy": "https://u:secretpw@h:3128"},
     "environment https_proxy: a forward proxy must be http://, not https://, got 'https://u:***@h:3128' "
     "(upstream.proxy is env)"),
    ({"ca_file": "missing.pem"}, {}, "config.yaml: upstream.ca_file: file not found: 'missing.pem'"),
    ({"ca_file": "config.yaml"}, {}, "config.yaml: upstream.ca_file: 'config.yaml' holds no PEM certificate "
                                     "(expected -----BEGIN CERTIFICATE----- blocks)"),
])
def test_bad_proxy_and_ca_settings_are_config_errors(tmp_path, monkeypatch, upstream, env, message):
    monkeypatch.chdir(tmp_path)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    path = write_config(tmp_path, "https://api.openai.com", {"upstream": upstream})
    with pytest.raises(cfg.ConfigError) as info:
        cfg.load(str(path))
    assert str(info.value).replace(str(tmp_path) + "/", "") == message


async def test_proxy_credentials_never_leave_the_process(proxy_process, tmp_path):
    """The startup log's effective config, --check-config, the error body and /metrics: the password
    is masked or absent everywhere. The forward proxy refuses it (407): a connect failure, not relayed."""
    async with ForwardProxy({}, auth=f"{USER}:other") as fwd:
        path = write_config(tmp_path, f"http://{HOST}", {"upstream": {"proxy": fwd.url()}})
        p = await proxy_process("--config", str(path), "--port", "0", "--admin-port", "0")
        async with aiohttp.ClientSession() as http, asyncio.timeout(BOUND):
            async with http.post(p.traffic + "/v1/chat/completions", json=CHAT) as resp:
                body = await resp.text()
                assert resp.status == 502 and resp.headers["x-proxy-error"] == "upstream_connect_error", body
            async with http.get(p.admin + "/metrics") as metrics:
                body += await metrics.text()
        p.signal()
        await p.finish()
    assert "the forward proxy refused the request (407 Proxy Authentication Required)" in body
    assert len(fwd.heads) == 3, p.output  # each attempt reached the forward proxy: connect failures are retried
    check = subprocess.run([sys.executable, "-m", "proxy", "--config", str(path), "--check-config"],
                           capture_output=True, text=True, check=True, cwd=ROOT)
    startup = next(line for line in p.lines if line["event"] == "startup")
    masked = f"http://{USER}:***@127.0.0.1:{fwd.port}"
    assert startup["config"]["upstream"]["proxy"] == masked and f"proxy: {masked}" in check.stdout
    everything = body + p.output + repr(p.lines) + check.stdout + check.stderr
    assert "hunter2" not in everything and "pa%3Ass" not in everything
