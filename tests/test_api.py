"""The HTTP edge over real processes: a `gateway serve` in front of the upstream stand-in, spoken to with httpx.

Most tests share one gateway (module scope) whose aliases point at the shared
stand-in under upstream model ids that start with ``api-up-``; tests that need
another auth setup start their own.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import json
import socket
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import CLIENT_KEY, UPSTREAM_KEY, GatewayFactory, backend_toml
from gateway.app import name_request
from gateway.errors import CATALOG
from harness import GatewayProcess, ManagedProcess, StandIn, free_port, gateway_env, local_client, start_gateway

BACKEND = "apiback"
MAX_REQUEST_BYTES = 65_536
BODY_TIMEOUT_S = 0.5
TINY_PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGP4z8AAAAMBAQDJ/pLvAAAAAElFTkSuQmCC"
)
PNG_URI = "data:image/png;base64," + base64.b64encode(TINY_PNG).decode()


def api_config(standin: StandIn) -> str:
    dead_port = free_port()  # nothing listens there: every call is refused
    return (
        backend_toml(standin, BACKEND)
        + f"""
[backends.deadback]
base_url = "http://127.0.0.1:{dead_port}/v1"
retries = 0

[server]
max_request_bytes = {MAX_REQUEST_BYTES}
body_timeout_s = {BODY_TIMEOUT_S}

[defaults]
max_images = 4

[routing]
cooldown_failures = 1000  # several tests fail api-failing on purpose; none may find it cooling down

[models."api-chat"]
backend = "{BACKEND}"
model = "api-up-chat"
input = ["text", "image"]
notes = "the test's vision alias"

[models."api-chat-2"]
backend = "{BACKEND}"
model = "api-up-chat-2"

[models."api-text"]
backend = "{BACKEND}"
model = "api-up-text"
input = ["text"]

[models."api-pro"]
backend = "{BACKEND}"
model = "api-up-pro"
input = ["text", "image"]
min_max_tokens = 200
context_window = 128_000

[models."api-failing"]
backend = "{BACKEND}"
model = "api-up-failing"
retries = 0

[models."api-dead"]
backend = "deadback"
model = "api-up-dead"
"""
    )


@pytest.fixture(scope="module")
def gateway(standin: StandIn, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    directory = tmp_path_factory.mktemp("api")
    config = directory / "models.toml"
    config.write_text(api_config(standin))
    env = {"GATEWAY_API_KEYS": CLIENT_KEY, "STANDIN_KEY": UPSTREAM_KEY}
    with start_gateway(config, env=env, log_dir=directory) as running:
        yield running


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    with local_client(timeout_s=30.0) as c:
        yield c


def auth(key: str = CLIENT_KEY) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def chat_body(model: str, text: str | None = None, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": text or f"hello {uuid.uuid4().hex}"}], **extra}


def post_chat(client: httpx.Client, gateway: GatewayProcess, body: Any, **kwargs: Any) -> httpx.Response:
    headers = kwargs.pop("headers", auth())
    return client.post(f"{gateway.url}/v1/chat/completions", json=body, headers=headers, **kwargs)


def upstream_request(standin: StandIn, marker: str) -> dict[str, Any]:
    """The one request the stand-in received whose messages contain `marker`."""
    found = [r for r in standin.requests() if r["body"] and marker in json.dumps(r["body"].get("messages"))]
    assert len(found) == 1, f"{len(found)} upstream requests carry {marker!r}"
    return found[0]


def resolve_pointer(document: Any, pointer: str) -> Any:
    """RFC 6901: the value `pointer` names in `document` (KeyError/IndexError when it names nothing)."""
    assert pointer.startswith("/")
    node = document
    for token in pointer[1:].split("/"):
        token = token.replace("~1", "/").replace("~0", "~")
        node = node[int(token)] if isinstance(node, list) else node[token]
    return node


def assert_envelope(
    response: httpx.Response,
    status: int,
    code: str,
    *,
    param: str | None = None,
    pointer: str | None = None,
    sent: Any = None,
    alongside: tuple[str, ...] = (),
) -> dict[str, Any]:
    """The response is `status` with the OpenAI error envelope for `code` at `param`/`pointer`.

    `alongside` names top-level fields an endpoint adds next to `error` (a probe's own status).
    """
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    assert response.headers.get("x-request-id")
    body = response.json()
    assert set(body) == {"error", *alongside}, body
    error = body["error"]
    assert set(error) == {"type", "code", "message", "param", "pointer"}, error
    assert error["code"] == code, error
    assert error["type"] == CATALOG[code].type
    assert isinstance(error["message"], str) and error["message"].strip()
    assert (error["param"], error["pointer"]) == (param, pointer), error
    if pointer is not None and sent is not None:
        resolve_pointer(sent, pointer)  # names a place that exists in what the client sent
    return dict(error)


# ---------------------------------------------------------------- chat


def test_chat_answers_with_the_alias_as_model(client: httpx.Client, gateway: GatewayProcess) -> None:
    """A non-streaming chat answers 200 with the upstream's completion, `model` set back to the alias."""
    response = post_chat(client, gateway, chat_body("api-chat", "say hi"))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == "api-chat"
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"]["content"] == "echo: say hi"
    assert body["usage"]["total_tokens"] > 0
    assert response.headers["x-gateway-served-by"] == "api-chat"
    assert response.headers["x-gateway-attempts"] == "1"
    assert "api-up-chat" not in response.text


def test_upstream_gets_the_backend_model_id_and_key_never_the_clients(
    client: httpx.Client, gateway: GatewayProcess, standin: StandIn
) -> None:
    """Upstream sees the backend's model id and its key from the env var; the client's bearer never leaves."""
    marker = uuid.uuid4().hex
    response = post_chat(client, gateway, chat_body("api-chat", marker))
    assert response.status_code == 200, response.text
    sent = upstream_request(standin, marker)
    assert sent["body"]["model"] == "api-up-chat"
    assert sent["headers"]["authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert all(CLIENT_KEY not in value for value in sent["headers"].values())
    assert CLIENT_KEY not in json.dumps(sent["body"])


def test_unknown_request_fields_pass_through(client: httpx.Client, gateway: GatewayProcess, standin: StandIn) -> None:
    """Fields the gateway does not know reach the upstream unchanged, as do known ones it does not act on."""
    marker = uuid.uuid4().hex
    extra = {
        "x_vendor_option": {"nested": [1, 2.5, None, "three"], "flag": True},
        "top_k": 40,
        "user": "user-42",
        "temperature": 0.25,
    }
    response = post_chat(client, gateway, chat_body("api-chat", marker, **extra))
    assert response.status_code == 200, response.text
    sent = upstream_request(standin, marker)["body"]
    for key, value in extra.items():
        assert sent[key] == value


def test_streaming_relays_sse_events_with_the_alias(
    client: httpx.Client, gateway: GatewayProcess, standin: StandIn
) -> None:
    """A stream is text/event-stream; every event ends with a blank line, chunks name the alias, [DONE] is last."""
    marker = uuid.uuid4().hex
    body = chat_body("api-chat", marker, stream=True)
    with client.stream("POST", f"{gateway.url}/v1/chat/completions", json=body, headers=auth()) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["x-gateway-served-by"] == "api-chat"
        raw = response.read().decode()
    assert raw.endswith("\n\n")
    events = raw[: -len("\n\n")].split("\n\n")
    assert all(event.startswith("data: ") and "\n" not in event for event in events), events
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(event[len("data: ") :]) for event in events[:-1]]
    assert chunks and all(chunk["model"] == "api-chat" for chunk in chunks)
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == "".join(f"stand-in part {i} " for i in range(1, 6))
    assert upstream_request(standin, marker)["body"]["model"] == "api-up-chat"


def test_stream_usage_chunk_passes_through(client: httpx.Client, gateway: GatewayProcess) -> None:
    """stream_options.include_usage reaches the upstream, and its usage chunk reaches the client before [DONE]."""
    body = chat_body("api-chat", stream=True, stream_options={"include_usage": True})
    with client.stream("POST", f"{gateway.url}/v1/chat/completions", json=body, headers=auth()) as response:
        raw = response.read().decode()
    events = raw.strip().split("\n\n")
    assert events[-1] == "data: [DONE]"
    last_chunk = json.loads(events[-2][len("data: ") :])
    assert last_chunk["usage"]["completion_tokens"] > 0
    assert last_chunk["model"] == "api-chat"


# ---------------------------------------------------------------- models, health


def test_models_list_every_alias_with_capabilities_and_no_backend(
    client: httpx.Client, gateway: GatewayProcess
) -> None:
    """GET /v1/models lists every alias in the OpenAI shape with capabilities, and leaks no backend or upstream id."""
    response = client.get(f"{gateway.url}/v1/models", headers=auth())
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "list"
    by_id = {entry["id"]: entry for entry in body["data"]}
    assert set(by_id) == {"api-chat", "api-chat-2", "api-text", "api-pro", "api-failing", "api-dead"}
    for entry in body["data"]:
        assert entry["object"] == "model"
        assert isinstance(entry["created"], int)
        assert isinstance(entry["owned_by"], str)
    assert by_id["api-chat"]["capabilities"]["input"] == ["image", "text"]
    assert by_id["api-text"]["capabilities"]["input"] == ["text"]
    assert by_id["api-chat"]["capabilities"]["output"] == ["text"]
    assert by_id["api-pro"]["capabilities"]["min_max_tokens"] == 200
    assert by_id["api-pro"]["capabilities"]["context_window"] == 128_000
    assert by_id["api-chat"]["capabilities"]["max_images"] == 4
    assert by_id["api-chat"]["notes"] == "the test's vision alias"
    for secret in ("api-up-", BACKEND, "deadback", "STANDIN_KEY", "127.0.0.1"):
        assert secret not in response.text, secret


def test_model_object_by_alias(client: httpx.Client, gateway: GatewayProcess) -> None:
    """GET /v1/models/{alias} answers that alias's model object with its capabilities."""
    response = client.get(f"{gateway.url}/v1/models/api-pro", headers=auth())
    assert response.status_code == 200, response.text
    entry = response.json()
    assert entry["id"] == "api-pro" and entry["object"] == "model"
    assert entry["capabilities"]["input"] == ["image", "text"]
    assert entry["capabilities"]["min_max_tokens"] == 200
    assert "api-up-pro" not in response.text and BACKEND not in response.text


def test_model_object_of_unknown_alias(client: httpx.Client, gateway: GatewayProcess) -> None:
    """GET /v1/models/{unknown} is 404 model_not_found naming close aliases; no body, so no param."""
    error = assert_envelope(client.get(f"{gateway.url}/v1/models/api-caht", headers=auth()), 404, "model_not_found")
    assert "api-chat" in error["message"]


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/metrics", "/v1/models", "/v1/models/api-chat", "/v1/gateway/status", "/v1/gateway/errors"])
def test_head_answers_wherever_get_does(client: httpx.Client, gateway: GatewayProcess, path: str) -> None:
    """HEAD is GET's head without its body (RFC 9110): a load balancer probing /readyz with HEAD got 405."""
    got, head = client.get(f"{gateway.url}{path}", headers=auth()), client.head(f"{gateway.url}{path}", headers=auth())
    assert (head.status_code, head.content) == (got.status_code, b""), head.headers
    assert head.headers["content-type"] == got.headers["content-type"]


def test_healthz_and_readyz_need_no_key(client: httpx.Client, gateway: GatewayProcess) -> None:
    """/healthz and /readyz answer 200 without a key; readyz says ready with the config's hash."""
    assert client.head(f"{gateway.url}/healthz").status_code == 200
    health = client.get(f"{gateway.url}/healthz")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    ready = client.get(f"{gateway.url}/readyz")
    assert ready.status_code == 200
    assert ready.json()["status"] == "ready"
    assert len(ready.json()["config_hash"]) == 64


# ---------------------------------------------------------------- auth


def test_missing_key_is_refused(client: httpx.Client, gateway: GatewayProcess) -> None:
    """No Authorization header: 401 missing_api_key, on completions and on models."""
    assert_envelope(post_chat(client, gateway, chat_body("api-chat"), headers={}), 401, "missing_api_key")
    assert_envelope(client.get(f"{gateway.url}/v1/models"), 401, "missing_api_key")
    assert_envelope(
        post_chat(client, gateway, chat_body("api-chat"), headers={"authorization": "Basic abc"}),
        401,
        "missing_api_key",
    )


def test_wrong_key_is_refused(client: httpx.Client, gateway: GatewayProcess) -> None:
    """A key that is not configured: 401 invalid_api_key, and the key is not echoed back."""
    error = assert_envelope(
        post_chat(client, gateway, chat_body("api-chat"), headers=auth("sk-wrong-key-123")), 401, "invalid_api_key"
    )
    assert "sk-wrong-key-123" not in error["message"]
    assert_envelope(client.get(f"{gateway.url}/v1/models/api-chat", headers=auth("sk-wrong")), 401, "invalid_api_key")


@pytest.mark.parametrize("order", ["good first", "good last"])
def test_two_authorization_headers_are_refused_whichever_comes_first(client: httpx.Client, gateway: GatewayProcess, order: str) -> None:
    """A proxy in front may read either one: the gateway takes neither (RFC 9110 joins repeated fields)."""
    pair = [("authorization", f"Bearer {CLIENT_KEY}"), ("authorization", "Bearer sk-other")]
    headers = httpx.Headers(pair if order == "good first" else pair[::-1])
    for response in (
        client.post(f"{gateway.url}/v1/chat/completions", json=chat_body("api-chat"), headers=headers),
        client.get(f"{gateway.url}/v1/models", headers=headers),
        client.get(f"{gateway.url}/v1/gateway/status", headers=headers),
    ):
        error = assert_envelope(response, 401, "invalid_api_key")
        assert CLIENT_KEY not in error["message"]
    assert post_chat(client, gateway, chat_body("api-chat")).status_code == 200


def test_no_keys_configured_refuses_everyone(
    gateway_factory: GatewayFactory, standin: StandIn, client: httpx.Client
) -> None:
    """With no key configured anywhere, every call is 401 no_api_keys_configured; probes still answer."""
    config = backend_toml(standin) + '[models."api-nokeys"]\nbackend = "local"\nmodel = "api-up-nokeys"\n'
    gateway = gateway_factory(config, env={"GATEWAY_API_KEYS": ""})
    assert_envelope(post_chat(client, gateway, chat_body("api-nokeys")), 401, "no_api_keys_configured")
    assert_envelope(post_chat(client, gateway, chat_body("api-nokeys"), headers={}), 401, "no_api_keys_configured")
    assert_envelope(client.get(f"{gateway.url}/v1/models"), 401, "no_api_keys_configured")
    assert client.get(f"{gateway.url}/healthz").status_code == 200
    assert client.get(f"{gateway.url}/readyz").status_code == 200


def test_auth_can_be_switched_off_explicitly(
    gateway_factory: GatewayFactory, standin: StandIn, client: httpx.Client
) -> None:
    """`[auth] required = false` with no keys serves without an Authorization header."""
    config = (
        "[auth]\nrequired = false\n\n"
        + backend_toml(standin)
        + '[models."api-open"]\nbackend = "local"\nmodel = "api-up-open"\n'
    )
    gateway = gateway_factory(config, env={"GATEWAY_API_KEYS": ""})
    response = post_chat(client, gateway, chat_body("api-open", "open door"), headers={})
    assert response.status_code == 200, response.text
    assert response.json()["model"] == "api-open"
    assert client.get(f"{gateway.url}/v1/models").status_code == 200


# ---------------------------------------------------------------- errors in the envelope


def test_unknown_path_is_404(client: httpx.Client, gateway: GatewayProcess) -> None:
    """A path with no endpoint is 404 not_found in the envelope, whatever the method."""
    error = assert_envelope(client.get(f"{gateway.url}/v1/nothing-here", headers=auth()), 404, "not_found")
    assert error["message"].startswith("No endpoint at /v1/nothing-here. It serves POST /v1/chat/completions, POST /c1/chat")
    assert_envelope(client.post(f"{gateway.url}/v2/chat/completions", json={}, headers=auth()), 404, "not_found")


def test_an_openai_endpoint_the_gateway_does_not_serve_is_named_so(client: httpx.Client, gateway: GatewayProcess) -> None:
    """A client that tries embeddings or the Responses API here is told the gateway serves chat, and
    one that tries the images API where images are made instead."""
    for path in ("/v1/embeddings", "/v1/responses", "/v1/audio/speech"):
        error = assert_envelope(client.post(f"{gateway.url}{path}", json={"model": "x", "input": "y"}, headers=auth()), 404, "not_found")
        assert f"No endpoint at {path}. This gateway does not serve that part of the OpenAI API." in error["message"]
    error = assert_envelope(client.post(f"{gateway.url}/v1/images/generations", json={"prompt": "a cat"}, headers=auth()), 404, "not_found")
    assert "through POST /v1/chat/completions by an alias whose output has image" in error["message"]
    long_path = "/v1/" + "x" * 5000
    error = assert_envelope(client.get(f"{gateway.url}{long_path}", headers=auth()), 404, "not_found")
    assert len(error["message"]) < 400 and long_path[:200] + "…" in error["message"]


def test_wrong_method_is_405(client: httpx.Client, gateway: GatewayProcess) -> None:
    """A method an endpoint does not take is 405 method_not_allowed in the envelope, and Allow names
    the methods it does take (RFC 9110 requires the header on a 405)."""
    for method, path, allowed in [
        ("GET", "/v1/chat/completions", {"POST"}),
        ("TRACE", "/v1/chat/completions", {"POST"}),
        ("DELETE", "/v1/models", {"GET"}),
        ("TRACE", "/v1/models", {"GET"}),
        ("POST", "/healthz", {"GET"}),
        ("PUT", "/c1/chat", {"POST"}),
    ]:
        response = client.request(method, f"{gateway.url}{path}", headers=auth())
        assert_envelope(response, 405, "method_not_allowed")
        named = {m.strip() for m in response.headers.get("allow", "").split(",")}
        assert allowed <= named and method not in named, (method, path, response.headers.get("allow"))
        assert method in response.json()["error"]["message"], response.json()


def test_invalid_json_is_400(client: httpx.Client, gateway: GatewayProcess) -> None:
    """A body that is not JSON (or not UTF-8) is 400 invalid_json."""
    url = f"{gateway.url}/v1/chat/completions"
    headers = {**auth(), "content-type": "application/json"}
    assert_envelope(client.post(url, content=b'{"model": "api-chat",', headers=headers), 400, "invalid_json")
    assert_envelope(client.post(url, content=b'{"model": "\xff\xfe"}', headers=headers), 400, "invalid_json")
    assert_envelope(client.post(url, content=b"", headers=headers), 400, "invalid_json")


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/c1/chat"])
@pytest.mark.parametrize("stream", [False, True], ids=["nonstream", "stream"])
def test_json_nested_too_deeply_is_400_at_every_depth(path: str, stream: bool, client: httpx.Client, gateway: GatewayProcess) -> None:
    """JSON nests as deep as the reader follows and no deeper: every depth is either served or 400
    invalid_json saying so, never a 500. Around the limit, a body the gateway could read may be too deep
    to write again from further down its stack; that is the same 400."""
    url = f"{gateway.url}{path}"
    headers = {**auth(), "content-type": "application/json"}
    prompt = b'"message": "hi"' if path == "/c1/chat" else b'"messages": [{"role": "user", "content": "hi"}]'
    head = b'{"model": "api-chat", "stream": %s, %s, "x": ' % (b"true" if stream else b"false", prompt)
    statuses = set()
    for depth in [*range(880, 1010, 3), 30_000]:
        response = client.post(url, content=head + b"[" * depth + b"]" * depth + b"}", headers=headers)
        statuses.add(response.status_code)
        if response.status_code != 200:
            error = assert_envelope(response, 400, "invalid_json")
            assert "too deeply" in error["message"], (depth, error)
    assert statuses == {200, 400}, statuses


def test_a_lone_surrogate_is_named_in_the_error(client: httpx.Client, gateway: GatewayProcess) -> None:
    """Half an emoji's UTF-16 pair (JavaScript writes one for a string cut inside it) is invalid JSON text
    for the gateway, and the error says which escape and where, not "truncated"."""
    url = f"{gateway.url}/v1/chat/completions"
    headers = {**auth(), "content-type": "application/json"}
    body = b'{"model": "api-chat", "messages": [{"role": "user", "content": "smile \\\\ud83d \\ud83d\\ude00 \\ud83d"}]}'
    error = assert_envelope(client.post(url, content=body, headers=headers), 400, "invalid_json")
    at = body.rindex(b"\\ud83d")
    assert f"\\ud83d at byte {at} is half of a UTF-16 surrogate pair" in error["message"], error
    whole = b'{"model": "api-chat", "messages": [{"role": "user", "content": "smile \\ud83d\\ude00"}]}'
    assert client.post(url, content=whole, headers=headers).status_code == 200


@pytest.mark.parametrize("number", [b"1e400", b"-1e999", b"[1, 2E+309]"])
def test_a_number_beyond_a_float_is_invalid_request_not_invalid_json(client: httpx.Client, gateway: GatewayProcess, number: bytes) -> None:
    """1e400 is valid JSON that no 64-bit float holds: the gateway cannot read it, and says so, not that the JSON is bad."""
    body = b'{"model": "api-chat", "messages": [{"role": "user", "content": "hi"}], "x_extra": %s}' % number
    response = client.post(f"{gateway.url}/v1/chat/completions", content=body, headers={**auth(), "content-type": "application/json"})
    error = assert_envelope(response, 400, "invalid_request")
    assert "64-bit float" in error["message"] and error["param"] is None, error


@pytest.mark.parametrize("sent", [b"", b'{"model": "api-chat"'], ids=["nothing", "a-part"])
def test_a_body_that_stops_arriving_is_408_and_the_connection_closes(sent: bytes, gateway: GatewayProcess) -> None:
    """A client that declares 100 bytes and stops sending gets 408 request_timeout after
    [server] body_timeout_s, and the connection is closed (the rest of its body would be read as a request)."""
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {CLIENT_KEY}\r\n"
        "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=5) as conn:
        started = time.monotonic()
        conn.sendall(head + sent)
        answer = b""
        while chunk := conn.recv(65536):  # until the gateway closes
            answer += chunk
        waited_s = time.monotonic() - started
    status_line, _, rest = answer.partition(b"\r\n")
    headers, _, body = rest.partition(b"\r\n\r\n")
    assert status_line == b"HTTP/1.1 408 Request Timeout", answer
    assert b"connection: close" in headers.lower()
    error = json.loads(body)["error"]
    assert error["code"] == "request_timeout" and f"after {len(sent)} bytes" in error["message"]
    assert BODY_TIMEOUT_S <= waited_s < BODY_TIMEOUT_S + 2


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/c1/chat"])
@pytest.mark.parametrize(
    ("framing", "cut_after"),
    [(b"zz\r\nabc\r\n0\r\n\r\n", 0), (b"3\r\nabc\r\nzz\r\n", 3), (b"2\r\nabcdef\r\n0\r\n\r\n", 2)],
    ids=["bad size", "bad size after a chunk", "chunk longer than its size"],
)
def test_broken_chunked_framing_is_400_incomplete_body(path: str, framing: bytes, cut_after: int, gateway: GatewayProcess) -> None:
    """granian ends such a body as if the client had left; the client is still there and gets an envelope."""
    head = (
        f"POST {path} HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {CLIENT_KEY}\r\n"
        "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=5) as conn:
        conn.sendall(head + framing)
        answer = b""
        while chunk := conn.recv(65536):  # until the gateway closes
            answer += chunk
    status_line, _, rest = answer.partition(b"\r\n")
    headers, _, body = rest.partition(b"\r\n\r\n")
    assert status_line == b"HTTP/1.1 400 Bad Request", answer
    assert b"content-type: application/json" in headers.lower() and b"x-request-id" in headers.lower()
    error = json.loads(body)["error"]
    assert error["code"] == "incomplete_body" and f"after {cut_after} bytes" in error["message"]


def test_a_compressed_body_is_415_naming_the_encoding(client: httpx.Client, gateway: GatewayProcess) -> None:
    """The gateway does not decode Content-Encoding: it says so, instead of calling gzip bad JSON."""
    body = gzip.compress(json.dumps(chat_body("api-chat")).encode())
    headers = {**auth(), "content-type": "application/json", "content-encoding": "gzip"}
    response = client.post(f"{gateway.url}/v1/chat/completions", content=body, headers=headers)
    error = assert_envelope(response, 415, "unsupported_content_encoding")
    assert "Content-Encoding: gzip" in error["message"] and response.headers["accept-encoding"] == "identity"
    identity = {**headers, "content-encoding": "identity"}
    assert client.post(f"{gateway.url}/v1/chat/completions", content=json.dumps(chat_body("api-chat")), headers=identity).status_code == 200


def test_a_byte_order_mark_before_the_json_is_ignored(client: httpx.Client, gateway: GatewayProcess) -> None:
    """RFC 8259 lets a reader ignore a UTF-8 byte-order mark; some Windows tools send one."""
    body = b"\xef\xbb\xbf" + json.dumps(chat_body("api-chat")).encode()
    response = client.post(f"{gateway.url}/v1/chat/completions", content=body, headers={**auth(), "content-type": "application/json"})
    assert response.status_code == 200, response.text
    bad = b"\xef\xbb\xbf" + b'{"model": '
    assert_envelope(client.post(f"{gateway.url}/v1/chat/completions", content=bad, headers=auth()), 400, "invalid_json")
    # Only one is ignored: thousands of them once ran the stack out, a 500 with a traceback logged.
    for marks in (2, 5000):
        many = b"\xef\xbb\xbf" * marks + json.dumps(chat_body("api-chat")).encode()
        assert_envelope(client.post(f"{gateway.url}/v1/chat/completions", content=many, headers=auth()), 400, "invalid_json")
    assert "Traceback" not in gateway.process.log_text()


def test_body_over_the_limit_is_413(client: httpx.Client, gateway: GatewayProcess) -> None:
    """A body larger than [server] max_request_bytes is 413 request_too_large; one just under it is judged normally."""
    filler = "x" * MAX_REQUEST_BYTES
    error = assert_envelope(post_chat(client, gateway, chat_body("api-chat", filler)), 413, "request_too_large")
    assert str(MAX_REQUEST_BYTES) in error["message"]
    small = post_chat(client, gateway, chat_body("api-chat", "x" * (MAX_REQUEST_BYTES - 1000)))
    assert small.status_code == 200, small.text


@pytest.mark.parametrize("body", [b"[1, 2]", b'"text"', b"42", b"null", b"true"])
def test_body_that_is_not_an_object_is_400(client: httpx.Client, gateway: GatewayProcess, body: bytes) -> None:
    """A JSON body that is not an object is 400 invalid_request, pointing nowhere (there is no field)."""
    headers = {**auth(), "content-type": "application/json"}
    response = client.post(f"{gateway.url}/v1/chat/completions", content=body, headers=headers)
    assert_envelope(response, 400, "invalid_request")


def test_missing_and_mistyped_fields_point_at_the_field(client: httpx.Client, gateway: GatewayProcess) -> None:
    """Schema errors name the field: a missing `messages` (in words: no place in the body to point at), a string `max_tokens`."""
    missing = {"model": "api-chat"}
    error = assert_envelope(post_chat(client, gateway, missing), 400, "invalid_request")
    assert "`messages`" in error["message"]
    mistyped = chat_body("api-chat", max_tokens="many")
    assert_envelope(
        post_chat(client, gateway, mistyped),
        400,
        "invalid_request",
        param="max_tokens",
        pointer="/max_tokens",
        sent=mistyped,
    )


def test_unknown_alias_is_404_naming_close_aliases(client: httpx.Client, gateway: GatewayProcess) -> None:
    """An unknown alias is 404 model_not_found at `model`, and the message names the close aliases."""
    body = chat_body("api-caht")
    error = assert_envelope(
        post_chat(client, gateway, body), 404, "model_not_found", param="model", pointer="/model", sent=body
    )
    assert "'api-chat'" in error["message"]
    assert "api-caht" in error["message"]


def test_an_unknown_alias_of_any_length_is_shown_cut(client: httpx.Client, gateway: GatewayProcess) -> None:
    """A 60,000-character `model` is not echoed whole: the message shows its start and its length."""
    body = chat_body("api-chat" + "x" * 60_000)
    error = assert_envelope(post_chat(client, gateway, body), 404, "model_not_found", param="model", pointer="/model", sent=body)
    assert len(error["message"]) < 400 and "(60,008 characters)" in error["message"], error["message"][:200]
    assert "'api-chatxxx" in error["message"]


def test_image_url_is_refused_with_the_seed_param(client: httpx.Client, gateway: GatewayProcess) -> None:
    """An https image URL is 400 image_url_not_supported at the seed's param and its JSON Pointer."""
    body = {
        "model": "api-chat",
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What logo?"},
                    {"type": "image_url", "image_url": {"url": "https://example.com/logo.png"}},
                ],
            }
        ],
    }
    assert_envelope(
        post_chat(client, gateway, body),
        400,
        "image_url_not_supported",
        param="messages[0].content[1].image_url.url",
        pointer="/messages/0/content/1/image_url/url",
        sent=body,
    )


def test_image_to_a_text_only_alias_is_refused(client: httpx.Client, gateway: GatewayProcess) -> None:
    """An image part sent to an alias whose input lacks image is 400 modality_not_supported at that part."""
    body = {
        "model": "api-text",
        "messages": [
            {"role": "system", "content": "be brief"},
            {
                "role": "user",
                "content": [{"type": "text", "text": "hi"}, {"type": "image_url", "image_url": {"url": PNG_URI}}],
            },
        ],
    }
    assert_envelope(
        post_chat(client, gateway, body),
        400,
        "modality_not_supported",
        param="messages[1].content[1]",
        pointer="/messages/1/content/1",
        sent=body,
    )


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
def test_max_tokens_below_the_alias_minimum_is_refused(
    client: httpx.Client, gateway: GatewayProcess, field: str
) -> None:
    """max_tokens (or max_completion_tokens) below min_max_tokens is 400 max_tokens_too_small at that field."""
    body = chat_body("api-pro", **{field: 199})
    error = assert_envelope(
        post_chat(client, gateway, body), 400, "max_tokens_too_small", param=field, pointer=f"/{field}", sent=body
    )
    assert "200" in error["message"]
    assert post_chat(client, gateway, chat_body("api-pro", **{field: 200})).status_code == 200


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
def test_a_token_budget_under_one_is_refused_before_the_upstream(
    client: httpx.Client, gateway: GatewayProcess, standin: StandIn, field: str
) -> None:
    """0 is refused at the field even for an alias without min_max_tokens; nothing reaches the upstream."""
    calls_before = len(standin.requests())
    body = chat_body("api-text", **{field: 0})
    error = assert_envelope(post_chat(client, gateway, body), 400, "invalid_request", param=field, pointer=f"/{field}", sent=body)
    assert "at least 1" in error["message"]
    assert len(standin.requests()) == calls_before


def test_upstream_failure_is_502_without_secrets(
    client: httpx.Client, gateway: GatewayProcess, standin: StandIn
) -> None:
    """An upstream that answers 500 ends as 502 upstream_error; the message names no key, backend or upstream id."""
    standin.script("api-up-failing", [{"kind": "status", "status": 500, "message": "stand-in is down"}])
    error = assert_envelope(post_chat(client, gateway, chat_body("api-failing")), 502, "upstream_error")
    assert "api-failing" in error["message"]
    for secret in (UPSTREAM_KEY, CLIENT_KEY, "api-up-failing", standin.base_url):
        assert secret not in error["message"], secret


def test_stream_that_fails_before_its_first_byte_is_a_502_envelope(
    client: httpx.Client, gateway: GatewayProcess, standin: StandIn
) -> None:
    """A streamed request whose upstream fails before any byte is answered as a plain 502 envelope, not SSE."""
    standin.script("api-up-failing", [{"kind": "status", "status": 503}])
    response = post_chat(client, gateway, chat_body("api-failing", stream=True))
    assert_envelope(response, 502, "upstream_error")


def test_unreachable_upstream_is_502(client: httpx.Client, gateway: GatewayProcess) -> None:
    """A backend that refuses connections ends as 502 upstream_error, not a hang or a 500."""
    assert_envelope(post_chat(client, gateway, chat_body("api-dead")), 502, "upstream_error")


# ---------------------------------------------------------------- request ids


def test_every_response_carries_a_fresh_request_id(client: httpx.Client, gateway: GatewayProcess) -> None:
    """Successes, errors, probes and unknown paths all carry x-request-id, a different one per request."""
    responses = [
        post_chat(client, gateway, chat_body("api-chat")),
        post_chat(client, gateway, chat_body("nope")),
        post_chat(client, gateway, chat_body("api-chat"), headers={}),
        client.get(f"{gateway.url}/v1/models", headers=auth()),
        client.get(f"{gateway.url}/healthz"),
        client.get(f"{gateway.url}/readyz"),
        client.get(f"{gateway.url}/no/such/path"),
        client.put(f"{gateway.url}/v1/models"),
        client.get(f"{gateway.url}/v1/gateway/errors"),
    ]
    ids = [r.headers.get("x-request-id") for r in responses]
    assert all(ids), ids
    assert len(set(ids)) == len(ids)


def test_request_id_is_echoed(client: httpx.Client, gateway: GatewayProcess) -> None:
    """A client's x-request-id comes back on its response, success, error or stream alike."""
    sent = {"x-request-id": "req-echo-7f3a"}
    responses = [
        post_chat(client, gateway, chat_body("api-chat"), headers={**auth(), **sent}),
        post_chat(client, gateway, chat_body("api-caht"), headers={**auth(), **sent}),
        client.get(f"{gateway.url}/missing", headers=sent),
        client.get(f"{gateway.url}/healthz", headers=sent),
    ]
    for response in responses:
        assert response.headers["x-request-id"] == "req-echo-7f3a"
    body = chat_body("api-chat", stream=True)
    with client.stream("POST", f"{gateway.url}/v1/chat/completions", json=body, headers={**auth(), **sent}) as streamed:
        assert streamed.headers["x-request-id"] == "req-echo-7f3a"
        streamed.read()


@pytest.mark.parametrize("path", ["/v1/chat/completions/", "/v1//chat/completions", "/c1/chat/"])
def test_a_completion_path_spelled_otherwise_carries_one_request_id(client: httpx.Client, gateway: GatewayProcess, path: str) -> None:
    """A base URL ending in "/v1/" makes "/v1//chat/completions": Litestar routes it to the same handler,
    which names its answer itself; the id came back twice ("my-id, my-id" in the openai SDK)."""
    sent = {"x-request-id": "req-once-91c2"}
    body = {"model": "api-chat", "message": "hi"} if path.startswith("/c1") else chat_body("api-chat")
    for response in (
        client.post(f"{gateway.url}{path}", json=body, headers={**auth(), **sent}),
        client.post(f"{gateway.url}{path}", json={"model": "nope"}, headers={**auth(), **sent}),
    ):
        assert response.headers.get_list("x-request-id") == ["req-once-91c2"], (response.status_code, response.headers)


def test_error_answers_show_no_source_paths(client: httpx.Client, gateway: GatewayProcess) -> None:
    """Error answers carry no traceback: the gateway's source paths never appear in them."""
    for response in (
        client.get(f"{gateway.url}/nothing"),
        post_chat(client, gateway, {"model": 1, "messages": []}),
    ):
        assert str(Path(__file__).resolve().parent.parent) not in response.text


# ---------------------------------------------------------------- granian on the factory, no valid config


def test_factory_under_granian_without_a_valid_config_is_not_ready(tmp_path: Path, client: httpx.Client) -> None:
    """granian on gateway.app:create_app with a bad file stays up: alive, not ready, and completions say why."""
    bad = tmp_path / "models.toml"
    bad.write_text('[models."x"]\nbackend = "nowhere"\n')
    port = free_port()
    argv = [
        sys.executable, "-m", "granian", "--interface", "asgi", "--factory",
        "--host", "127.0.0.1", "--port", str(port), "gateway.app:create_app",
    ]  # fmt: skip
    env = gateway_env({"GATEWAY_CONFIG": str(bad), "GATEWAY_API_KEYS": CLIENT_KEY})
    with ManagedProcess(argv, env=env, log_dir=tmp_path, name="granian", base_url=f"http://127.0.0.1:{port}") as served:
        served.wait_ready("/healthz")
        url = served.base_url
        assert client.get(f"{url}/healthz").status_code == 200
        ready = client.get(f"{url}/readyz")
        probe_fields = tuple(key for key in ready.json() if key != "error")  # the probe's own, beside the envelope
        error = assert_envelope(ready, 503, "config_not_loaded", alongside=probe_fields)
        assert "gateway check" in error["message"]
        assert ready.json()["status"] == "not_ready"
        completion = client.post(f"{url}/v1/chat/completions", json=chat_body("x"), headers=auth())
        assert_envelope(completion, 503, "config_not_loaded")
        assert_envelope(client.get(f"{url}/v1/models", headers=auth()), 503, "config_not_loaded")


def test_openapi_document_describes_chat_completions(client: httpx.Client, gateway: GatewayProcess) -> None:
    """The served OpenAPI document has POST /v1/chat/completions with its request schema."""
    document = client.get(f"{gateway.url}/openapi/openapi.json").json()
    operation = document["paths"]["/v1/chat/completions"]["post"]
    reference = operation["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    schema = document["components"]["schemas"][reference.rsplit("/", 1)[-1]]
    assert {"model", "messages", "stream", "max_tokens", "tools", "response_format"} <= set(schema["properties"])
    assert set(schema["required"]) == {"model", "messages"}


def test_a_long_request_id_is_cut_at_a_character() -> None:
    """An id is kept to its first 128 bytes: cut inside a UTF-8 character, it came back ending in half of one."""
    for sent, kept in ((b"a" * 127 + "é".encode(), b"a" * 127), (b"b" * 200, b"b" * 128), (b"c" * 126 + "é".encode(), b"c" * 126 + "é".encode())):
        scope: dict[str, Any] = {"headers": [(b"x-request-id", sent)]}
        assert name_request(scope) == kept and scope["gateway_request_id"] == kept.decode("utf-8")  # logged as written


def test_log_lines_name_the_request_they_are_about(standin: StandIn, gateway_factory: GatewayFactory) -> None:
    """An operator given a client's x-request-id finds what happened to it: a failed attempt's warning named
    the alias and backend but no request. Two requests at once each get their own id, never the other's."""
    gateway = gateway_factory(
        backend_toml(standin)
        + "".join(f'[models."{name}"]\nbackend = "local"\nmodel = "{name}-up"\nretries = 0\n' for name in ("log-a", "log-b"))
    )
    for name in ("log-a", "log-b"):
        standin.script(f"{name}-up", [{"kind": "status", "status": 503, "delay_ms": 300}])

    async def both() -> list[int]:
        async with httpx.AsyncClient(trust_env=False, timeout=10) as client:
            answers = await asyncio.gather(*(
                client.post(
                    f"{gateway.url}/v1/chat/completions", json=chat_body(name),
                    headers={**auth(), "x-request-id": f"req-{name}"},
                )
                for name in ("log-a", "log-b")
            ))
        return [a.status_code for a in answers]

    assert asyncio.run(both()) == [502, 502]
    deadline = time.monotonic() + 5
    while gateway.log_tail(200).count("attempt on log-") < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    lines = [line for line in gateway.log_tail(200).splitlines() if "attempt on log-" in line]
    assert sorted(line.split("attempt on ")[1].split()[0] for line in lines) == ["log-a", "log-b"]
    for line in lines:
        name = line.split("attempt on ")[1].split()[0]
        assert f"[request req-{name}] attempt on {name} " in line, line
