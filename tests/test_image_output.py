"""Image output (SPEC §6): data URIs typed by their bytes, streamed image deltas, edits, composite accounting."""

from __future__ import annotations

import base64
import importlib.util
import json
import sys
import uuid
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import httpx
import pytest

from conftest import backend_toml
from gateway.bulk import inspect_in_place
from gateway.chunks import Chunks
from gateway.shaping import (
    asks_for_image,
    client_body,
    fix_image_uri,
    fix_images,
    gather_content_images,
    holds_image,
    message_images,
)
from harness import CLIENT_KEY, STANDIN_SCRIPT, GatewayProcess, StandIn, local_client, serving


def _standin_module() -> Any:
    """The stand-in script as a module, for the exact image bytes it answers with."""
    spec = importlib.util.spec_from_file_location("standin_upstream_images", STANDIN_SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


_STANDIN = _standin_module()
TINY_PNG: bytes = _STANDIN.TINY_PNG
TINY_JPEG: bytes = _STANDIN.TINY_JPEG

RUN = uuid.uuid4().hex[:6]
PNG_B64 = base64.b64encode(TINY_PNG).decode()
JPEG_B64 = base64.b64encode(TINY_JPEG).decode()
IMAGE_PARAMS = 'params = { modalities = ["image", "text"] }'


def upstream_id(alias: str) -> str:
    return f"{RUN}-image-{alias}"


@pytest.fixture(scope="module")
def gateway(standin: StandIn, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    directory = tmp_path_factory.mktemp("image-output")
    lines = [
        "[routing]", "backoff_s = 0.05", "cooldown_failures = 50", "",
        backend_toml(standin, first_byte_timeout_s=2, idle_timeout_s=2, timeout_s=5),
    ]
    for alias in ("painter", "nano", "big"):
        lines += [
            f'[models."{alias}"]', 'backend = "local"', f'model = "{upstream_id(alias)}"',
            'input = ["text", "image"]', 'output = ["image", "text"]', IMAGE_PARAMS, "",
        ]
    lines += ['[models."image-gen"]', 'route = ["nano", "big"]', ""]
    with serving("\n".join(lines), directory) as running:
        yield running


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    with local_client(timeout_s=10.0) as http:
        yield http


def post(client: httpx.Client, gateway: GatewayProcess, body: dict[str, Any]) -> httpx.Response:
    return client.post(f"{gateway.url}/v1/chat/completions", json=body, headers={"authorization": f"Bearer {CLIENT_KEY}"})


def draw(alias: str, **extra: Any) -> dict[str, Any]:
    return {"model": alias, "messages": [{"role": "user", "content": "draw a red dot"}], **extra}


def stream_events(response: httpx.Response) -> list[Any]:
    assert response.status_code == 200, response.text
    payloads = [event[len("data: "):] for event in response.text.strip().split("\n\n")]
    assert payloads[-1] == "[DONE]"
    return [json.loads(p) for p in payloads[:-1]]


# ------------------------------------------------------------------ through the gateway


@pytest.mark.parametrize(
    ("step", "expected"),
    [
        ({"kind": "ok", "image_mime": "image/jpeg"}, f"data:image/png;base64,{PNG_B64}"),
        ({"kind": "ok", "image_format": "jpeg", "image_mime": "image/webp"}, f"data:image/jpeg;base64,{JPEG_B64}"),
        ({"kind": "ok"}, f"data:image/png;base64,{PNG_B64}"),
    ],
    ids=["png-labelled-jpeg", "jpeg-labelled-webp", "labelled-right"],
)
def test_image_answer_is_a_data_uri_typed_by_its_bytes(step: dict[str, Any], expected: str, gateway: GatewayProcess, standin: StandIn, client: httpx.Client) -> None:
    """`choices[0].message.images[0].image_url.url` is a data URI whose type is the one its bytes sniff as."""
    standin.script(upstream_id("painter"), [step])
    response = post(client, gateway, draw("painter"))
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["choices"][0]["message"]["images"][0]["image_url"]["url"] == expected
    assert answer["model"] == "painter" and upstream_id("painter") not in response.text


def test_streamed_image_delta_passes_through_typed_by_its_bytes(gateway: GatewayProcess, standin: StandIn, client: httpx.Client) -> None:
    """A streamed image delta reaches the client with its sniffed type, every chunk naming the alias."""
    standin.script(upstream_id("painter"), [{"kind": "ok", "image_mime": "image/gif"}])
    events = stream_events(post(client, gateway, draw("painter", stream=True)))
    images = [img for e in events for c in e["choices"] for img in c["delta"].get("images", [])]
    assert [img["image_url"]["url"] for img in images] == [f"data:image/png;base64,{PNG_B64}"]
    assert {e["model"] for e in events} == {"painter"}


def test_a_streamed_image_content_part_is_an_image(gateway: GatewayProcess, standin: StandIn, client: httpx.Client) -> None:
    """An image streamed as a content part of the delta counts as the image it is: the composite's first
    member serves, and the part joins the delta's `images`, typed by its bytes."""
    part = {"type": "image_url", "image_url": {"url": f"data:image/jpeg;base64,{PNG_B64}"}}
    events = [
        {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "x",
         "choices": [{"index": 0, "delta": {"role": "assistant", "content": [part]}, "finish_reason": None}]},
        {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "x", "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
    ]
    body = "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"
    standin.script(upstream_id("nano"), [{"kind": "raw", "content_type": "text/event-stream", "body": body}])
    standin.script(upstream_id("big"), [{"kind": "ok"}])
    response = post(client, gateway, draw("image-gen", stream=True))
    assert response.headers["x-gateway-served-by"] == "nano", response.text
    images = [img for e in stream_events(response) for c in e["choices"] for img in c["delta"].get("images", [])]
    assert [img["image_url"]["url"] for img in images] == [f"data:image/png;base64,{PNG_B64}"]


def test_image_input_and_output_together_is_an_edit(gateway: GatewayProcess, standin: StandIn, client: httpx.Client) -> None:
    """An edit: the input image reaches the upstream untouched and the answer carries the new image."""
    standin.script(upstream_id("painter"), [{"kind": "ok", "image_format": "jpeg"}])
    content = [{"type": "text", "text": "make it blue"}, {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG_B64}"}}]
    response = post(client, gateway, {"model": "painter", "messages": [{"role": "user", "content": content}]})
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["images"][0]["image_url"]["url"].startswith("data:image/jpeg;base64,")
    sent = [r for r in standin.requests() if r["model"] == upstream_id("painter")][-1]["body"]
    assert sent["messages"][0]["content"] == content
    assert sent["modalities"] == ["image", "text"]


@pytest.mark.parametrize("stream", [False, True], ids=["nonstream", "stream"])
def test_a_large_edit_reaches_each_member_whole_with_its_own_model_and_params(stream: bool, gateway: GatewayProcess, standin: StandIn, client: httpx.Client) -> None:
    """A body over 64 KiB is sent from its raw bytes (shaping.splice_body): the first member fails, and
    the second still gets the image untouched, its own model id and the alias's params."""
    standin.script(upstream_id("nano"), [{"kind": "status", "status": 503}])
    standin.script(upstream_id("big"), [{"kind": "ok"}])
    large = "data:image/png;base64," + base64.b64encode(TINY_PNG + bytes(300_000)).decode()
    content = [{"type": "text", "text": "make it blue"}, {"type": "image_url", "image_url": {"url": large}}]
    body = {"messages": [{"role": "user", "content": content}], "max_tokens": 50, "stream": stream, "model": "image-gen"}
    since = len(standin.requests())
    response = post(client, gateway, body)
    assert response.status_code == 200, response.text
    sent = {r["model"]: r["body"] for r in standin.requests()[since:]}
    assert set(sent) == {upstream_id("nano"), upstream_id("big")}
    for member, upstream_body in sent.items():
        assert upstream_body == {**body, "model": member, "modalities": ["image", "text"]}
    # The gateway took this body on its in-place path (gateway.bulk): the image never became a str.
    assert inspect_in_place(Chunks([json.dumps(body).encode()])) is not None


def test_a_large_image_through_c1_chat_reaches_the_upstream_whole(gateway: GatewayProcess, standin: StandIn, client: httpx.Client) -> None:
    """/c1/chat rebuilds the body, so a large one is joined from its pieces and decoded whole; the image
    arrives intact, and a broken one is refused at its place in the c1 body."""
    standin.script(upstream_id("painter"), [{"kind": "ok"}])
    large = "data:image/png;base64," + base64.b64encode(TINY_PNG + bytes(300_000)).decode()
    headers = {"authorization": f"Bearer {CLIENT_KEY}"}
    response = client.post(f"{gateway.url}/c1/chat", json={"model": "painter", "message": "blue?", "images": [large]}, headers=headers)
    assert response.status_code == 200, response.text
    sent = [r for r in standin.requests() if r["model"] == upstream_id("painter")][-1]["body"]
    assert sent["messages"][-1]["content"][-1] == {"type": "image_url", "image_url": {"url": large}}
    broken = large[:200_000] + " " + large[200_001:]
    response = client.post(f"{gateway.url}/c1/chat", json={"model": "painter", "message": "blue?", "images": [broken]}, headers=headers)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "images[0]"


def test_a_large_broken_image_is_refused_as_the_ordinary_path_words_it(gateway: GatewayProcess, client: httpx.Client) -> None:
    """The in-place path declines a large image it cannot accept; the refusal points into the body sent."""
    large = "data:image/png;base64," + base64.b64encode(TINY_PNG + bytes(300_000)).decode()
    broken = large[:200_000] + " " + large[200_001:]
    content = [{"type": "text", "text": "make it blue"}, {"type": "image_url", "image_url": {"url": broken}}]
    response = post(client, gateway, {"model": "image-gen", "messages": [{"role": "user", "content": content}]})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_image"
    assert error["param"] == "messages[0].content[1].image_url.url"
    assert "a space at data offset" in error["message"]


@pytest.mark.parametrize("stream", [False, True], ids=["nonstream", "stream"])
def test_composite_answer_is_accounted_to_the_member_that_served(stream: bool, gateway: GatewayProcess, standin: StandIn, client: httpx.Client) -> None:
    """The serving member names the answer and the header; usage is that member's, the failed attempt's is not added."""
    standin.script(upstream_id("nano"), [{"kind": "status", "status": 503}])
    standin.script(upstream_id("big"), [{"kind": "ok"}])
    extra = {"stream": True, "stream_options": {"include_usage": True}} if stream else {}
    response = post(client, gateway, draw("image-gen", **extra))
    assert response.status_code == 200, response.text
    assert response.headers["x-gateway-served-by"] == "big" and response.headers["x-gateway-attempts"] == "3"
    if stream:
        events = stream_events(response)
        assert {e["model"] for e in events} == {"big"}
        usage = [e["usage"] for e in events if e.get("usage")]
        assert usage == [{"prompt_tokens": 3, "completion_tokens": 15, "total_tokens": 18}]
    else:
        answer = response.json()
        assert answer["model"] == "big"
        assert answer["usage"] == {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}
    assert upstream_id("big") not in response.text and upstream_id("nano") not in response.text


@pytest.mark.parametrize("stream", [False, True], ids=["nonstream", "stream"])
def test_no_member_answering_with_an_image_is_502_no_image_generated(stream: bool, gateway: GatewayProcess, standin: StandIn, client: httpx.Client) -> None:
    """When every member answers without an image the client gets 502 no_image_generated listing each attempt."""
    standin.script(upstream_id("nano"), [{"kind": "no_image"}])
    standin.script(upstream_id("big"), [{"kind": "no_image"}])
    response = post(client, gateway, draw("image-gen", stream=stream))
    assert response.status_code == 502, response.text
    error = response.json()["error"]
    assert error["code"] == "no_image_generated"
    assert "nano: no_image" in error["message"] and "big: no_image" in error["message"]
    assert response.headers["x-gateway-attempts"] == "2"


@pytest.mark.parametrize("stream", [False, True], ids=["nonstream", "stream"])
def test_an_image_model_asked_for_text_only_answers_text(stream: bool, gateway: GatewayProcess, standin: StandIn, client: httpx.Client) -> None:
    """`modalities: ["text"]` to an image-output alias is a text question: the upstream is asked for
    text (the client's modalities win over the alias's params) and its answer without an image is served,
    not taken for a failed image (502 no_image_generated)."""
    standin.script(upstream_id("painter"), [{"kind": "ok"}])
    since = len(standin.requests())
    response = post(client, gateway, draw("painter", modalities=["text"], stream=stream))
    assert response.status_code == 200, response.text
    assert response.headers["x-gateway-served-by"] == "painter" and response.headers["x-gateway-attempts"] == "1"
    sent = [r["body"] for r in standin.requests()[since:] if r["model"] == upstream_id("painter")]
    assert [body["modalities"] for body in sent] == [["text"]]
    if stream:
        deltas = [c["delta"] for e in stream_events(response) for c in e["choices"]]
        assert "".join(d.get("content") or "" for d in deltas) and not any("images" in d for d in deltas)
    else:
        message = response.json()["choices"][0]["message"]
        assert message["content"] and "images" not in message


# ------------------------------------------------------------------ the shaping functions


@pytest.mark.parametrize(
    ("client_modalities", "params", "asks"),
    [
        (None, {"modalities": ["image", "text"]}, True),
        (["text"], {"modalities": ["image", "text"]}, False),
        (["image"], {}, True),
        (None, {}, True),  # nothing says text only: an image-output alias owes an image
        (["text", "audio"], {}, False),
        ("text", {}, True),  # not a list: the rules refuse it before this; no exemption from it
    ],
)
def test_asks_for_image_follows_the_modalities_sent(client_modalities: Any, params: dict[str, Any], asks: bool) -> None:
    target: Any = SimpleNamespace(params=params)  # asks_for_image reads a target's params only
    body: dict[str, Any] = {"model": "painter", "messages": []}
    if client_modalities is not None:
        body["modalities"] = client_modalities
    assert asks_for_image(body, target) is asks
    assert asks_for_image({**body, "modalities": None}, target) is asks_for_image({"model": "painter"}, target)


def test_fix_image_uri_keeps_a_right_uri_and_retypes_a_wrong_one() -> None:
    """A correctly typed URI is returned as is; a mislabelled one gets the type of its bytes."""
    right = f"data:image/png;base64,{PNG_B64}"
    assert fix_image_uri(right) is right
    assert fix_image_uri(f"data:image/jpeg;base64,{PNG_B64}") == right
    assert fix_image_uri(f"data:application/octet-stream;base64,{JPEG_B64}") == f"data:image/jpeg;base64,{JPEG_B64}"


def test_fix_image_uri_wraps_bare_base64_and_leaves_the_unknown_alone() -> None:
    """Bare base64 of an image becomes a data URI; URLs and bytes of no known image type are left untouched."""
    assert fix_image_uri(PNG_B64) == f"data:image/png;base64,{PNG_B64}"
    unknown = "data:image/png;base64," + base64.b64encode(b"definitely not an image").decode()
    assert fix_image_uri(unknown) == unknown
    assert fix_image_uri("https://example.com/a.png") == "https://example.com/a.png"


def test_fix_images_normalises_a_string_image_url() -> None:
    """An image whose `image_url` is a bare string becomes `{"url": ...}` with the sniffed type."""
    images: list[Any] = [{"type": "image_url", "image_url": f"data:image/webp;base64,{PNG_B64}"}, "junk", {"type": "x"}]
    fix_images(images)
    assert images[0] == {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG_B64}"}}


def test_fix_image_uri_reads_the_scheme_in_any_case() -> None:
    assert fix_image_uri(f"DATA:image/jpeg;BASE64,{PNG_B64}") == f"data:image/png;base64,{PNG_B64}"


def test_fix_images_gives_the_contract_shape_to_the_shapes_providers_use() -> None:
    """A bare string, {"url"} and {"b64_json"} holding an image become {"type", "image_url": {"url"}};
    what holds none is left as it was."""
    right = {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG_B64}"}}
    images: list[Any] = [PNG_B64, {"url": f"data:image/jpeg;base64,{PNG_B64}"}, {"b64_json": PNG_B64, "revised_prompt": "a dot"}]
    leftovers: list[Any] = ["junk", {"url": "https://cdn.example.com/a.png"}, {"b64_json": "bm90IGFuIGltYWdl"}, {}, None]
    fix_images(images)
    assert images == [right, right, {**right, "revised_prompt": "a dot"}]
    kept = json.loads(json.dumps(leftovers))
    fix_images(leftovers)
    assert leftovers == kept


@pytest.mark.parametrize(
    "image",
    [
        {"type": "image_url", "image_url": {"url": "https://cdn.example.com/a.png"}},
        {"type": "image_url", "image_url": {"url": ""}},
        {"type": "image_url", "image_url": {"url": None}},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(b"I am text, not a picture").decode()}},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,!!!!"}},
        {},
    ],
    ids=["https-url", "empty", "null", "text-bytes", "not-base64", "empty-object"],
)
def test_no_usable_image_is_no_image(image: dict[str, Any]) -> None:
    """A URL (never fetched), an empty entry or text labelled an image gives the client nothing to show."""
    images = [image]
    fix_images(images)
    assert not holds_image(images)
    assert holds_image([*images, {"image_url": {"url": f"data:image/png;base64,{PNG_B64}"}}])


def test_an_image_given_as_a_content_part_joins_the_messages_images() -> None:
    answer: dict[str, Any] = {"choices": [{"message": {"role": "assistant", "content": [
        {"type": "text", "text": "here"}, {"type": "image_url", "image_url": {"url": f"data:image/jpeg;base64,{PNG_B64}"}},
    ]}}]}
    gather_content_images(answer)
    assert holds_image(message_images(answer))
    assert answer["choices"][0]["message"]["images"][0]["image_url"]["url"] == f"data:image/png;base64,{PNG_B64}"


@pytest.mark.parametrize("stream", [False, True], ids=["nonstream", "stream"])
def test_an_answer_whose_image_is_no_image_moves_on(stream: bool, gateway: GatewayProcess, standin: StandIn, client: httpx.Client) -> None:
    """nano answers 200 with an https URL for its image: that is no image, so image-gen's next member
    serves; nano alone ends in 502 no_image_generated."""
    url_only = {"type": "image_url", "image_url": {"url": "https://cdn.example.com/frog.png"}}
    if stream:
        events = [
            {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "x",
             "choices": [{"index": 0, "delta": {"role": "assistant", "content": "", "images": [url_only]}, "finish_reason": None}]},
            {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "x", "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
        ]
        body = "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"
        step = {"kind": "raw", "content_type": "text/event-stream", "body": body}
    else:
        answer = {"id": "c", "object": "chat.completion", "created": 1, "model": "x",
                  "choices": [{"index": 0, "message": {"role": "assistant", "content": "", "images": [url_only]}, "finish_reason": "stop"}]}
        step = {"kind": "raw", "body": json.dumps(answer)}
    standin.script(upstream_id("nano"), [step, step])
    standin.script(upstream_id("big"), [{"kind": "ok"}])
    served = post(client, gateway, draw("image-gen", stream=stream))
    assert served.status_code == 200 and served.headers["x-gateway-served-by"] == "big", served.text
    alone = post(client, gateway, draw("nano", stream=stream))
    assert alone.status_code == 502 and alone.json()["error"]["code"] == "no_image_generated", alone.text


def test_client_body_names_the_serving_alias() -> None:
    """The client's body has `model` = the serving alias, everything else passed through."""
    answer = {"model": "internal/id", "provider": "x", "choices": [{"message": {"images": [{"image_url": {"url": f"data:image/gif;base64,{PNG_B64}"}}]}}]}
    out = json.loads(client_body(answer, "served"))
    assert out["model"] == "served" and out["provider"] == "x"
    assert out["choices"][0]["message"]["images"][0]["image_url"]["url"].startswith("data:image/png;")
