"""What the garbage collector is left to do in a worker.

- The heap of a started worker is frozen out of collections (gateway.memory),
  and that must not keep what a reload replaces.
- A finished request, answered or failed or left by its client, is freed by
  reference counting alone: nothing of it waits in a cycle for a collection.
  These tests drive the app in process (the test client, or the app called
  with a scripted client) against the real upstream stand-in.

Freezing is process-wide, so each test thaws the heap again when it ends.
"""

from __future__ import annotations

import asyncio
import base64
import gc
import json
import shutil
import types
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from litestar.testing import TestClient

from conftest import backend_toml
from gateway.app import create_app
from gateway.chunks import Chunks
from gateway.memory import freeze_long_lived_heap
from gateway.metrics import Metrics
from gateway.reload import SnapshotHolder
from harness import CLIENT_KEY, UPSTREAM_KEY, StandIn, cyclic_garbage_now, free_port

PROJECT_CONFIG = Path(__file__).parent.parent / "models.toml"
T = TypeVar("T")


class Node:
    def __init__(self) -> None:
        self.other: Node | None = None


@pytest.fixture(autouse=True)
def thawed() -> Iterator[None]:
    yield
    gc.unfreeze()


def collected(thing: object) -> bool:
    """Whether ``thing`` is among the objects the collector still walks."""
    return any(candidate is thing for candidate in gc.get_objects())


def test_garbage_is_collected_first_and_what_lives_is_left_out_of_collections() -> None:
    living = Node()
    cycle = Node()
    cycle.other = cycle
    gone = weakref.ref(cycle)
    del cycle

    frozen = freeze_long_lived_heap()
    made_after = Node()

    assert gone() is None, "garbage alive at the freeze would never be collected"
    assert frozen == gc.get_freeze_count() > 0
    assert not collected(living)
    assert collected(made_after)


def test_a_reload_frees_the_frozen_startup_configuration(tmp_path: Path) -> None:
    """No collection can free a frozen object: reference counting alone must free the replaced snapshot."""
    path = tmp_path / "models.toml"
    shutil.copy(PROJECT_CONFIG, path)
    holder = SnapshotHolder(path, Metrics())
    assert holder.load()
    startup = weakref.ref(holder.current)
    freeze_long_lived_heap()
    assert not collected(startup())

    path.write_text(path.read_text() + "\n# an edit\n")
    assert holder.load(reason="reload")

    assert startup() is None


def test_a_started_app_has_frozen_its_heap(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "models.toml"
    shutil.copy(PROJECT_CONFIG, path)
    monkeypatch.setenv("GATEWAY_API_KEYS", "sk-test")
    app = create_app(path)
    assert gc.get_freeze_count() == 0
    with TestClient(app) as client:
        assert client.get("/healthz").status_code == 200
        assert gc.get_freeze_count() > 0
        assert not collected(app)


# --- what a request leaves behind -----------------------------------------------------

SOURCE = str(Path(create_app.__code__.co_filename).parent)
# A PNG big enough to take the large-body path (gateway.chunks), small enough to be quick.
BIG_PNG = b"\x89PNG\r\n\x1a\n" + bytes(300_000)


def cyclic_garbage() -> list[Any]:
    """What only the cyclic collector could free now: the gateway's frames and request bodies in it."""
    return [
        thing for thing in cyclic_garbage_now()
        if (isinstance(thing, types.FrameType) and thing.f_code.co_filename.startswith(SOURCE)) or isinstance(thing, Chunks)
    ]


def described(found: list[Any]) -> list[str]:
    return sorted(f"frame {thing.f_code.co_name}" if isinstance(thing, types.FrameType) else type(thing).__name__ for thing in found)


def receiving_futures(app: Any) -> Any:
    """``app`` under a server whose ``receive()`` returns a future, as granian's does (the test client's is a coroutine)."""

    async def served(scope: Any, receive: Any, send: Any) -> None:
        await app(scope, lambda: asyncio.ensure_future(receive()), send)

    return served


@pytest.fixture(params=["coroutine", "future"], ids=["receive gives coroutines", "receive gives futures"])
def leak_client(request: pytest.FixtureRequest, standin: StandIn, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[TestClient[Any]]:
    dead_port = free_port()
    (tmp_path / "models.toml").write_text(
        backend_toml(standin, first_byte_timeout_s=0.2, idle_timeout_s=0.2)
        + f'[backends.gone]\nbase_url = "http://127.0.0.1:{dead_port}/v1"\n'
        + '[models.chat]\nbackend = "local"\nmodel = "leak-model"\ninput = ["text", "image"]\n'
        + '[models.nowhere]\nbackend = "gone"\nmodel = "leak-model"\ninput = ["text", "image"]\n'
        + '[models.backed]\nbackend = "local"\nmodel = "leak-model"\ninput = ["text", "image"]\nfallback = ["backup"]\n'
        + '[models.backup]\nbackend = "local"\nmodel = "leak-backup"\ninput = ["text", "image"]\n'
        + "".join(
            f'[models.{name}]\nbackend = "local"\nmodel = "leak-{name}"\ninput = ["text", "image"]\noutput = ["image", "text"]\n'
            'params = { modalities = ["image", "text"] }\n'
            for name in ("nano", "big")
        )
        + '[models.draw]\nroute = ["nano", "big"]\n'
    )
    monkeypatch.setenv("GATEWAY_API_KEYS", CLIENT_KEY)
    monkeypatch.setenv("STANDIN_KEY", UPSTREAM_KEY)
    app = create_app(tmp_path / "models.toml")
    with TestClient(app if request.param == "coroutine" else receiving_futures(app), timeout=30) as client:
        yield client
    standin.reset()


def chat_body(model: str, *, image: bool, stream: bool) -> dict[str, Any]:
    content: list[dict[str, Any]] = [{"type": "text", "text": "What is this?"}]
    if image:
        content.append({"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(BIG_PNG).decode()}})
    return {"model": model, "messages": [{"role": "user", "content": content}], "stream": stream}


# The alias asked for, what the upstream does (a stand-in step for each call), and whether the request streams.
OUTCOMES = {
    "answered": ("chat", {"kind": "ok"}, False),
    "streamed": ("chat", {"kind": "ok"}, True),
    "upstream 500": ("chat", {"kind": "status", "status": 500}, False),
    "upstream 400": ("chat", {"kind": "status", "status": 400}, False),
    "connection reset": ("chat", {"kind": "reset"}, False),
    "not JSON": ("chat", {"kind": "invalid_json"}, False),
    "nobody listening": ("nowhere", {"kind": "ok"}, False),
    "served by the fallback": ("backed", {"kind": "status", "status": 500}, False),
    "stream cut": ("chat", {"kind": "stream_cut", "after_chunks": 2}, True),
    "error event": ("chat", {"kind": "error_event", "after_chunks": 1}, True),
    "refused stream": ("chat", {"kind": "status", "status": 500}, True),
    "streamed by the fallback": ("backed", {"kind": "status", "status": 500}, True),
    "no answer in time": ("chat", {"kind": "hang", "hang_s": 1}, False),
    "stream stalled": ("chat", {"kind": "stream_stall", "after_chunks": 1, "stall_s": 1}, True),
}


@pytest.mark.parametrize("image", [True, False], ids=["large body", "small body"])
@pytest.mark.parametrize("outcome", list(OUTCOMES))
def test_a_request_leaves_nothing_for_the_cyclic_collector(
    leak_client: TestClient[Any], standin: StandIn, outcome: str, image: bool
) -> None:
    """Whatever the upstream does, a finished request is freed by reference counting alone.

    A reference cycle (say, an error kept in a local of a frame its traceback
    holds) would keep the request's frames, and with them its body, until a
    collection came: megabytes per failed image request, piling up.
    """
    model, step, stream = OUTCOMES[outcome]
    standin.script("leak-model", [step] * 8)
    status = post_twice(leak_client, json.dumps(chat_body(model, image=image, stream=stream)).encode(), outcome)
    assert (status == 200) if model == "backed" else (status in (200, 400, 502, 503, 504))


# What each member of the image route answers, and the status the client gets.
DRAWINGS = {
    "drawn by the second member": ({"leak-nano": {"kind": "no_image"}, "leak-big": {"kind": "ok"}}, 200),
    "drawn by no member": ({"leak-nano": {"kind": "no_image"}, "leak-big": {"kind": "no_image"}}, 502),
}


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("drawing", list(DRAWINGS))
def test_an_image_route_leaves_nothing_for_the_cyclic_collector(
    leak_client: TestClient[Any], standin: StandIn, drawing: str, stream: bool
) -> None:
    """An image-output route reads a member's whole answer (an image of megabytes, say) before it moves on or serves."""
    steps, status = DRAWINGS[drawing]
    for model, step in steps.items():
        standin.script(model, [step] * 2)
    body = {"model": "draw", "messages": [{"role": "user", "content": "A lighthouse at dusk"}], "stream": stream}
    assert post_twice(leak_client, json.dumps(body).encode(), drawing) == status


def leaving_nothing(request: Callable[[], T], what: str) -> T:
    """Make ``request`` twice, the second time with the collector off, and check it left nothing in a cycle.

    The first warms connections and caches up.
    """
    request()
    cyclic_garbage()
    gc.disable()
    try:
        result = request()
        left = cyclic_garbage()
    finally:
        gc.enable()
    assert not left, f"{what}: a cycle kept {described(left)}"
    return result


def post_twice(client: TestClient[Any], body: bytes, outcome: str, key: str = CLIENT_KEY) -> int:
    """``body`` posted twice; the status of the second answer, which left no cycle."""
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    return leaving_nothing(lambda: client.post("/v1/chat/completions", content=body, headers=headers), outcome).status_code


def with_fields(**fields: Any) -> bytes:
    return json.dumps({**chat_body("chat", image=True, stream=False), **fields}).encode()


# A request the gateway refuses itself, and the status that says so.
REFUSALS = {
    "a field of the wrong type": (with_fields(max_tokens="many"), CLIENT_KEY, 400),
    "an unknown model": (with_fields(model="nope"), CLIENT_KEY, 404),
    "a wrong key": (with_fields(), "sk-wrong", 401),
    "a body that is not JSON": (with_fields()[:-2], CLIENT_KEY, 400),
    "an image that is not base64": (with_fields().replace(b"base64,", b"base64,*", 1), CLIENT_KEY, 400),
}


@pytest.mark.parametrize("refusal", list(REFUSALS))
def test_a_refused_request_leaves_nothing_for_the_cyclic_collector(leak_client: TestClient[Any], refusal: str) -> None:
    body, key, status = REFUSALS[refusal]
    assert post_twice(leak_client, body, refusal, key) == status


def scope_for(body: bytes) -> dict[str, Any]:
    headers = [(b"authorization", f"Bearer {CLIENT_KEY}".encode()), (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    return {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
        "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions", "query_string": b"", "root_path": "",
        "headers": headers, "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8080),
    }


async def leave_early(app: Any, body: bytes, mid_body: bool) -> list[dict[str, Any]]:
    """Serve one request to a client that goes away: halfway through sending its body, or after the first streamed event."""
    sent: list[dict[str, Any]] = []
    first_event = asyncio.Event()
    pieces = [body[: len(body) // 2]] if mid_body else [body]

    async def receive() -> dict[str, Any]:
        if pieces:
            return {"type": "http.request", "body": pieces.pop(0), "more_body": mid_body}
        if not mid_body:
            await first_event.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)
        if message.get("body"):
            first_event.set()

    await asyncio.wait_for(app(scope_for(body), receive, send), 10)
    return sent


@pytest.mark.parametrize("mid_body", [True, False], ids=["while sending its body", "mid-stream"])
def test_a_client_that_leaves_leaves_nothing_for_the_cyclic_collector(leak_client: TestClient[Any], standin: StandIn, mid_body: bool) -> None:
    standin.script("leak-model", [{"kind": "ok", "chunks": 20, "interval_ms": 20}] * 2)
    body = json.dumps(chat_body("chat", image=True, stream=True)).encode()
    portal = leak_client.blocking_portal
    sent = leaving_nothing(lambda: portal.call(leave_early, leak_client.app, body, mid_body), "a client that left")
    streamed = [message for message in sent if message["type"] == "http.response.body" and message.get("body")]
    if mid_body:  # answered, in case the cut was broken framing and the client is still there
        assert [json.loads(m["body"])["error"]["code"] for m in streamed] == ["incomplete_body"], sent
    else:
        assert 0 < len(streamed) < 20, sent
