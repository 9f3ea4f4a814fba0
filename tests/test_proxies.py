"""Upstream calls through an HTTP proxy (gateway.proxies, and the CONNECT tunnel in gateway.h1).

The proxy here is a real one on loopback: it answers ``CONNECT``, checks
credentials when told to, resolves every host to 127.0.0.1 (a backend's name
need not resolve on this machine: the proxy resolves it, as a real one does)
and pipes bytes both ways. The live tests run it on a thread of its own beside
a real gateway under granian.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, Self

import httpx
import pytest

from conftest import GatewayFactory
from gateway.h1 import H1Error, H1Pool, Origin
from gateway.proxies import Proxies, Proxy, parse_proxy_url
from harness import CLIENT_KEY, GatewayProcess, StandIn, local_client
from test_h1 import OK_BODY, Server, answer_each_request, call, in_loop, read_all, tls_server

USER, PASSWORD = "spark", "p@ss:w/rd"


class ConnectProxy:
    """A CONNECT proxy on 127.0.0.1 that logs each tunnel it is asked for."""

    def __init__(self, *, credentials: tuple[str, str] | None = None, refuse_with: int | None = None) -> None:
        self.tunnels: list[str] = []  # the CONNECT targets, in order
        self.authorizations: list[str | None] = []
        self._expected = None
        if credentials is not None:
            self._expected = "Basic " + base64.b64encode(":".join(credentials).encode()).decode()
        self._refuse_with = refuse_with
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> Self:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    def close(self) -> None:
        """Stop listening and end every open tunnel."""
        if self._server is not None:
            self._server.close()
        for writer in self._writers:
            writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
            method, target, _ = head[0].split(" ")
            headers = dict(line.split(": ", 1) for line in head[1:] if line)
            self.tunnels.append(target)
            self.authorizations.append(headers.get("proxy-authorization"))
            if method != "CONNECT":
                writer.write(b"HTTP/1.1 405 Method Not Allowed\r\ncontent-length: 0\r\n\r\n")
                return
            if self._refuse_with is not None:
                writer.write(b"HTTP/1.1 %d No\r\ncontent-length: 0\r\n\r\n" % self._refuse_with)
                return
            if self._expected is not None and headers.get("proxy-authorization") != self._expected:
                writer.write(b"HTTP/1.1 407 Proxy Authentication Required\r\ncontent-length: 0\r\n\r\n")
                return
            port = int(target.rsplit(":", 1)[1])
            try:
                upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                writer.write(b"HTTP/1.1 502 Bad Gateway\r\ncontent-length: 0\r\n\r\n")
                return
            self._writers.add(upstream_writer)
            writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            await asyncio.gather(_pipe(reader, upstream_writer), _pipe(upstream_reader, writer))
        except (ConnectionError, asyncio.IncompleteReadError, ValueError):
            pass
        except asyncio.CancelledError:
            pass  # the test's loop ends with tunnels still open: nothing to report
        finally:
            writer.close()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(1 << 16):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


@contextlib.asynccontextmanager
async def proxy_running(**options: Any) -> AsyncIterator[ConnectProxy]:
    proxy = await ConnectProxy(**options).start()
    try:
        yield proxy
    finally:
        proxy.close()


def through(proxy: ConnectProxy, scheme: str = "http", userinfo: str = "") -> Proxies:
    """Proxies sending ``scheme`` origins through ``proxy``, with ``userinfo`` ("user:password@") in its URL."""
    return Proxies({scheme: parse_proxy_url(proxy.url.replace("://", f"://{userinfo}"))})


# --- which origins go through which proxy -----------------------------------------------------


@pytest.mark.parametrize(
    ("environ", "scheme", "host", "expected"),
    [
        ({"HTTPS_PROXY": "http://proxy:3128"}, "https", "api.openai.com", ("proxy", 3128)),
        ({"HTTPS_PROXY": "http://proxy:3128"}, "http", "spark.lan", None),  # each scheme has its own
        ({"HTTP_PROXY": "proxy:8080"}, "http", "spark.lan", ("proxy", 8080)),  # no scheme: http, as curl takes it
        ({"http_proxy": "http://lower:1", "HTTP_PROXY": "http://upper:2"}, "http", "x.example", ("lower", 1)),
        ({"ALL_PROXY": "http://all:9"}, "https", "api.openai.com", ("all", 9)),
        ({"ALL_PROXY": "http://all:9", "HTTPS_PROXY": "http://own:1"}, "https", "api.openai.com", ("own", 1)),
        ({"HTTPS_PROXY": "http://proxy"}, "https", "api.openai.com", ("proxy", 80)),
        ({"HTTPS_PROXY": "http://proxy:3128"}, "https", "127.0.0.1", None),  # loopback is always direct
        ({"HTTPS_PROXY": "http://proxy:3128"}, "https", "127.9.9.9", None),
        ({"HTTPS_PROXY": "http://proxy:3128"}, "https", "localhost", None),
        ({"HTTPS_PROXY": "http://proxy:3128"}, "https", "::1", None),
        ({"HTTPS_PROXY": "http://proxy:3128"}, "https", "0.0.0.0", None),  # as a local server's banner says it
        ({"HTTPS_PROXY": "http://proxy:3128"}, "https", "[::]", None),
        ({"HTTPS_PROXY": "http://proxy:3128"}, "https", "::ffff:127.0.0.1", None),
        ({"HTTPS_PROXY": "http://proxy:3128"}, "https", "127.1", None),
        ({"HTTPS_PROXY": "http://proxy:3128"}, "https", "128.1", ("proxy", 3128)),
        ({"HTTPS_PROXY": "http://proxy:3128"}, "https", "::ffff:10.0.0.1", ("proxy", 3128)),
        ({"HTTPS_PROXY": "http://proxy:3128", "NO_PROXY": "*.openai.com"}, "https", "api.openai.com", None),
        ({"HTTPS_PROXY": "http://proxy:3128", "NO_PROXY": "*.openai.com"}, "https", "notopenai.com", ("proxy", 3128)),
        ({"HTTPS_PROXY": "http://proxy:3128", "NO_PROXY": "openai.com"}, "https", "api.openai.com", None),
        ({"HTTPS_PROXY": "http://proxy:3128", "NO_PROXY": ".openai.com"}, "https", "api.openai.com", None),
        ({"HTTPS_PROXY": "http://proxy:3128", "NO_PROXY": "notopenai.com"}, "https", "api.openai.com", ("proxy", 3128)),
        ({"HTTPS_PROXY": "http://proxy:3128", "NO_PROXY": "ai.com"}, "https", "openai.com", ("proxy", 3128)),
        ({"HTTPS_PROXY": "http://proxy:3128", "no_proxy": "a.lan, API.OPENAI.COM"}, "https", "api.openai.com", None),
        ({"HTTPS_PROXY": "http://proxy:3128", "NO_PROXY": "*"}, "https", "api.openai.com", None),
        ({"HTTPS_PROXY": "http://proxy:3128", "NO_PROXY": "10.0.0.0/8"}, "https", "10.1.2.3", None),
        ({"HTTPS_PROXY": "http://proxy:3128", "NO_PROXY": "10.0.0.0/8"}, "https", "11.1.2.3", ("proxy", 3128)),
        ({"HTTPS_PROXY": "http://proxy:3128", "NO_PROXY": "api.openai.com:8443"}, "https", "api.openai.com", ("proxy", 3128)),
        ({"HTTPS_PROXY": "http://proxy:3128", "NO_PROXY": "api.openai.com:443"}, "https", "api.openai.com", None),
        ({"HTTPS_PROXY": "socks5://proxy:1080"}, "https", "api.openai.com", None),  # not supported: direct, logged
        ({"HTTPS_PROXY": "https://proxy:3128"}, "https", "api.openai.com", None),
        ({"HTTPS_PROXY": "http://proxy:99999"}, "https", "api.openai.com", None),
        ({}, "https", "api.openai.com", None),
    ],
)
def test_the_environment_says_which_origins_go_through_which_proxy(
    environ: dict[str, str], scheme: str, host: str, expected: tuple[str, int] | None
) -> None:
    proxy = Proxies.from_environment(environ).for_origin(scheme, host, 443)
    assert (proxy.host, proxy.port) == expected if proxy is not None else expected is None


def test_a_proxy_that_cannot_be_used_is_logged_without_its_credentials(caplog: pytest.LogCaptureFixture) -> None:
    proxies = Proxies.from_environment({"HTTPS_PROXY": f"socks5://{USER}:{PASSWORD}@proxy:1080"})
    assert not proxies
    assert "HTTPS_PROXY is not used, so https backends are reached directly" in caplog.text
    assert "socks5://" in caplog.text and PASSWORD not in caplog.text and "proxy:1080" not in caplog.text


def test_credentials_become_a_basic_authorization_and_are_never_shown() -> None:
    proxy = parse_proxy_url("http://spark:p%40ss%3Aw%2Frd@proxy.corp:3128")
    assert proxy.authorization == b"Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode())
    shown = f"{proxy!r} {proxy.address} {Proxies({'https': proxy}).describe()}"
    assert "proxy.corp:3128" in shown and "with credentials" in shown
    assert "p%40ss" not in shown and PASSWORD not in shown and "spark" not in shown
    assert parse_proxy_url("http://proxy.corp:3128").authorization is None


# --- the tunnel -------------------------------------------------------------------------------


@in_loop
async def test_http_origins_are_reached_through_a_tunnel_kept_alive_like_any_connection() -> None:
    async with Server(answer_each_request) as server, proxy_running() as proxy:
        port = server.origin.port
        named = Origin("http", "spark-cloud.test", port)  # only the proxy resolves it
        pool = H1Pool(proxies=through(proxy))
        try:
            for _ in range(3):
                assert await read_all(await call(pool, named)) == OK_BODY
        finally:
            await pool.aclose()
    assert proxy.tunnels == [f"spark-cloud.test:{port}"]  # one tunnel, reused
    assert len(server.bodies) == 3


@in_loop
async def test_https_origins_run_verified_tls_end_to_end_inside_the_tunnel() -> None:
    async with tls_server("spark-cloud.test") as (port, client_context), proxy_running() as proxy:
        pool = H1Pool(ssl_context=client_context, proxies=through(proxy, "https"))
        try:
            for _ in range(2):
                assert await read_all(await call(pool, Origin("https", "spark-cloud.test", port))) == OK_BODY
            assert pool.open_connections == 1
            # The certificate is checked against the backend's name, not the proxy's: another name fails.
            with pytest.raises(H1Error) as caught:
                await call(pool, Origin("https", "elsewhere.test", port))
            assert caught.value.kind == "connect"
            assert caught.value.detail == "TLS handshake failed (the certificate does not name this host)"
        finally:
            await pool.aclose()
    assert proxy.tunnels == [f"spark-cloud.test:{port}", f"elsewhere.test:{port}"]


@in_loop
async def test_credentials_are_sent_to_the_proxy_and_a_refusal_names_neither_host_nor_password() -> None:
    async with Server(answer_each_request) as server, proxy_running(credentials=(USER, PASSWORD)) as proxy:
        origin = Origin("http", "spark-cloud.test", server.origin.port)
        good = H1Pool(proxies=through(proxy, userinfo="spark:p%40ss%3Aw%2Frd@"))
        wrong = H1Pool(proxies=through(proxy, userinfo="spark:wrong@"))
        try:
            assert await read_all(await call(good, origin)) == OK_BODY
            with pytest.raises(H1Error) as caught:
                await call(wrong, origin)
            assert (caught.value.kind, caught.value.detail) == ("connect", "the proxy refused the credentials (HTTP 407)")
            assert wrong.open_connections == 0
        finally:
            await good.aclose()
            await wrong.aclose()
    assert proxy.authorizations[0] == "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()


@pytest.mark.parametrize(
    ("proxy_answer", "detail"),
    [
        (b"HTTP/1.1 403 Forbidden\r\n\r\n", "the proxy refused the tunnel (HTTP 403)"),
        (b"HTTP/1.1 502 Bad Gateway\r\ncontent-length: 0\r\n\r\n", "the proxy refused the tunnel (HTTP 502)"),
        (b"SSH-2.0-OpenSSH\r\n\r\n", "the proxy's answer to CONNECT is not HTTP/1.x"),
        (b"HTTP/1.1 200 OK\r\n\r\nHTTP/1.1 200 OK\r\n", "the proxy sent bytes before the tunnel was used"),
        (b"", "the proxy closed the connection before the tunnel opened"),
    ],
)
@in_loop
async def test_a_proxy_that_does_not_open_the_tunnel_fails_the_connection_in_words(proxy_answer: bytes, detail: str) -> None:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(proxy_answer)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    pool = H1Pool(proxies=Proxies({"http": Proxy("127.0.0.1", port)}))
    try:
        with pytest.raises(H1Error) as caught:
            await call(pool, Origin("http", "spark-cloud.test", 80))
        assert caught.value.detail == detail
        assert "spark-cloud" not in str(caught.value)
        assert pool.open_connections == 0
    finally:
        await pool.aclose()
        server.close()


@in_loop
async def test_an_unreachable_proxy_is_named_as_the_proxy() -> None:
    async with proxy_running() as proxy:
        port = proxy.port
    pool = H1Pool(proxies=Proxies({"http": Proxy("127.0.0.1", port)}))
    try:
        with pytest.raises(H1Error) as caught:
            await call(pool, Origin("http", "spark-cloud.test", 80))
        assert (caught.value.kind, caught.value.detail) == ("connect", "the proxy: connection refused")
        assert pool.open_connections == 0
    finally:
        await pool.aclose()


# --- a real gateway -------------------------------------------------------------------------


class ProxyThread:
    """A ``ConnectProxy`` on an event loop of its own thread, for a gateway in another process."""

    def __init__(self, **options: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._options = options
        self.proxy: ConnectProxy | None = None

    def __enter__(self) -> ConnectProxy:
        self._thread.start()
        self.proxy = asyncio.run_coroutine_threadsafe(ConnectProxy(**self._options).start(), self._loop).result(10)
        return self.proxy

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self._shut_down(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    async def _shut_down(self) -> None:
        assert self.proxy is not None
        self.proxy.close()
        others = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
        await asyncio.wait(others, timeout=5) if others else None
        await asyncio.sleep(0.01)  # the closed transports' last callbacks


@pytest.fixture
def proxy() -> Iterator[ConnectProxy]:
    with ProxyThread(credentials=(USER, PASSWORD)) as running:
        yield running


def proxied_config(standin: StandIn, host: str) -> str:
    return f"""
[backends.cloud]
base_url = "http://{host}:{standin.port}/v1"
api_key_env = "STANDIN_KEY"

[backends.spark]
base_url = "{standin.base_url}"
api_key_env = "STANDIN_KEY"

[models.cloud-model]
backend = "cloud"
model = "proxied-model"

[models.spark-model]
backend = "spark"
model = "local-model"
"""


def chat(gateway: GatewayProcess, model: str) -> httpx.Response:
    with local_client() as client:
        return client.post(
            f"{gateway.url}/v1/chat/completions",
            headers={"authorization": f"Bearer {CLIENT_KEY}"},
            json={"model": model, "messages": [{"role": "user", "content": "hi"}]},
        )


def test_a_gateway_reaches_a_backend_through_the_proxy_in_its_environment(
    gateway_factory: GatewayFactory, standin: StandIn, proxy: ConnectProxy
) -> None:
    url = proxy.url.replace("://", "://spark:p%40ss%3Aw%2Frd@")
    gateway = gateway_factory(proxied_config(standin, "spark-cloud.test"), env={"HTTP_PROXY": url})

    answer = chat(gateway, "cloud-model")
    assert answer.status_code == 200, answer.text
    assert answer.json()["model"] == "cloud-model"
    assert proxy.tunnels == [f"spark-cloud.test:{standin.port}"]

    # The Spark's own loopback server is reached directly, though HTTP_PROXY covers http.
    assert chat(gateway, "spark-model").status_code == 200
    assert proxy.tunnels == [f"spark-cloud.test:{standin.port}"]
    log = gateway.process.log_text()
    assert f"upstream proxy: http backends through 127.0.0.1:{proxy.port}" in log
    assert PASSWORD not in log and "p%40ss" not in log


def test_no_proxy_sends_a_backend_direct_and_a_refused_tunnel_is_a_502_in_words(
    gateway_factory: GatewayFactory, standin: StandIn, proxy: ConnectProxy, tmp_path: Path
) -> None:
    # NO_PROXY: the backend is reached directly, and its name does not resolve here.
    direct = gateway_factory(
        proxied_config(standin, "spark-cloud.test"), env={"HTTP_PROXY": proxy.url, "NO_PROXY": ".test"}
    )
    answer = chat(direct, "cloud-model")
    assert answer.status_code == 502
    assert "does not resolve" in answer.json()["error"]["message"]
    assert proxy.tunnels == []

    # Wrong credentials: the proxy refuses, and the client is told so without the password.
    refused = gateway_factory(
        proxied_config(standin, "spark-cloud.test"),
        env={"HTTP_PROXY": proxy.url.replace("://", "://spark:wrong@")},
        name="refused.toml",
    )
    answer = chat(refused, "cloud-model")
    assert (answer.status_code, answer.json()["error"]["code"]) == (502, "upstream_error")
    message = answer.json()["error"]["message"]
    assert "the proxy refused the credentials (HTTP 407)" in message
    assert "wrong" not in message and "spark-cloud" not in message
    assert answer.headers["x-gateway-attempts"] == "1"  # a refusal that calling again cannot change: no retry
    assert proxy.tunnels == [f"spark-cloud.test:{standin.port}"] * len(proxy.tunnels) and proxy.tunnels
