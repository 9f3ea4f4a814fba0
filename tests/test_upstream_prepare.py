"""How a target's request head is built once (gateway.upstream.prepare): origin, path, headers, credentials."""

from __future__ import annotations

import base64

from gateway.h1 import Origin
from gateway.snapshot import ResolvedTimeouts, Target
from gateway.upstream import prepare


def target(base_url: str, api_key: str | None = None, headers: dict[str, str] | None = None) -> Target:
    return Target(
        alias="a", backend_name="b", base_url=base_url, model="m", api_key_env="KEY" if api_key else None,
        api_key=api_key, headers=headers or {}, params={}, rename={},
        timeouts=ResolvedTimeouts(total_s=5, connect_s=1, first_byte_s=2, idle_s=2), retries=1,
        image_output=False, rules=None,  # prepare reads only the URL, the key and the headers
    )


def head_lines(head: bytes) -> list[str]:
    return head.decode("latin-1").rstrip("\r\n").split("\r\n")


def test_a_local_backend() -> None:
    prepared = prepare(target("http://127.0.0.1:8000/v1"))
    assert prepared.origin == Origin("http", "127.0.0.1", 8000)
    lines = head_lines(prepared.head)
    assert lines[0] == "POST /v1/chat/completions HTTP/1.1"
    assert "host: 127.0.0.1:8000" in lines
    assert "accept-encoding: identity" in lines
    assert "user-agent: dgx-llm-gateway/0.1" in lines  # some providers' firewalls refuse a request without one
    assert not any(line.startswith("authorization") for line in lines)
    assert prepared.url == "http://127.0.0.1:8000/v1/chat/completions"


def test_a_cloud_backend_with_a_key_and_headers() -> None:
    prepared = prepare(target("https://openrouter.ai/api/v1", api_key="sk-or-1", headers={"X-Title": "Spark", "User-Agent": "spark/2"}))
    assert prepared.origin == Origin("https", "openrouter.ai", 443)
    lines = head_lines(prepared.head)
    assert lines[0] == "POST /api/v1/chat/completions HTTP/1.1"
    assert {"host: openrouter.ai", "authorization: Bearer sk-or-1", "x-title: Spark", "user-agent: spark/2"} <= set(lines)
    assert "user-agent: dgx-llm-gateway/0.1" not in lines


def test_credentials_in_the_url_never_travel_in_it() -> None:
    keyed = prepare(target("http://user:pw@127.0.0.1:9000/v1", api_key="sk-1"))
    assert "authorization: Bearer sk-1" in head_lines(keyed.head)
    assert "host: 127.0.0.1:9000" in head_lines(keyed.head)
    assert "user" not in keyed.url and "pw" not in keyed.url

    basic = prepare(target("http://us%40er:p%3Aw@127.0.0.1:9000/v1"))
    expected = base64.b64encode(b"us@er:p:w").decode()
    assert f"authorization: Basic {expected}" in head_lines(basic.head)
    assert "host: 127.0.0.1:9000" in head_lines(basic.head)


def test_a_query_and_an_ipv6_host_are_kept() -> None:
    prepared = prepare(target("http://[::1]:8080/openai/v1?api-version=2024"))
    assert prepared.origin == Origin("http", "::1", 8080)
    lines = head_lines(prepared.head)
    assert lines[0] == "POST /openai/v1/chat/completions?api-version=2024 HTTP/1.1"
    assert "host: [::1]:8080" in lines
