"""The official `openai` SDK, unmodified, against a real gateway in front of the upstream stand-in.

What an OpenAI client relies on: chat and streaming answer with the alias as
`model`, the model list carries the aliases, and failures arrive as the SDK's
typed errors (`BadRequestError`, ...) whose `.code`, `.param` and `.type` the
SDK reads out of the gateway's envelope.
"""

from __future__ import annotations

import asyncio
import base64
import json
import uuid
from collections.abc import Iterator
from typing import Any, Literal

import openai
import pydantic
import pytest

from conftest import CLIENT_KEY, UPSTREAM_KEY, backend_toml
from harness import GatewayProcess, StandIn, start_gateway

BACKEND = "sdkback"
JPEG_HEAD = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"
JPEG_URI = "data:image/jpeg;base64," + base64.b64encode(JPEG_HEAD + b"\x00" * 64 + b"\xff\xd9").decode()


def sdk_config(standin: StandIn) -> str:
    return (
        backend_toml(standin, BACKEND)
        + f"""
[models."sdk-vision"]
backend = "{BACKEND}"
model = "sdk-up-vision"
input = ["text", "image"]

[models."sdk-text"]
backend = "{BACKEND}"
model = "sdk-up-text"

[models."sdk-pro"]
backend = "{BACKEND}"
model = "sdk-up-pro"
input = ["text", "image"]
min_max_tokens = 200

[models."sdk-failing"]
backend = "{BACKEND}"
model = "sdk-up-failing"
retries = 0
"""
    )


@pytest.fixture(scope="module")
def gateway(standin: StandIn, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    directory = tmp_path_factory.mktemp("sdk")
    config = directory / "models.toml"
    config.write_text(sdk_config(standin))
    env = {"GATEWAY_API_KEYS": CLIENT_KEY, "STANDIN_KEY": UPSTREAM_KEY}
    with start_gateway(config, env=env, log_dir=directory) as running:
        yield running


def make_client(gateway: GatewayProcess, api_key: str = CLIENT_KEY) -> openai.OpenAI:
    # trust_env=False: loopback test traffic must not go through a proxy from the environment.
    http_client = openai.DefaultHttpx2Client(trust_env=False)
    return openai.OpenAI(
        base_url=f"{gateway.url}/v1", api_key=api_key, max_retries=0, timeout=30.0, http_client=http_client
    )


@pytest.fixture
def client(gateway: GatewayProcess) -> Iterator[openai.OpenAI]:
    with make_client(gateway) as sdk:
        yield sdk


def user(text: str) -> list[Any]:
    return [{"role": "user", "content": text}]


def upstream_body(standin: StandIn, marker: str) -> dict[str, Any]:
    found = [r["body"] for r in standin.requests() if r["body"] and marker in json.dumps(r["body"].get("messages"))]
    assert len(found) == 1
    return dict(found[0])


def test_chat_completion(client: openai.OpenAI, standin: StandIn) -> None:
    """client.chat.completions.create answers a typed completion whose model is the alias."""
    marker = uuid.uuid4().hex
    completion = client.chat.completions.create(model="sdk-vision", messages=user(f"hi {marker}"))
    assert completion.model == "sdk-vision"
    assert completion.choices[0].message.content == f"echo: hi {marker}"
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None and completion.usage.total_tokens > 0
    assert upstream_body(standin, marker)["model"] == "sdk-up-vision"


def test_a_conversation_sent_back_as_the_sdk_gave_it(client: openai.OpenAI, standin: StandIn) -> None:
    """A client appends each answer's message as the SDK typed it and asks again; a model's refusal
    comes back with null content, and must pass as the OpenAI API lets it."""
    marker = uuid.uuid4().hex
    first = client.chat.completions.create(model="sdk-text", messages=user(f"hello {marker}"))
    refused = {"role": "assistant", "content": None, "refusal": "I can't help with that."}
    history: list[Any] = [*user(f"hello {marker}"), first.choices[0].message, *user("something else"), refused, *user(f"then this {marker}")]
    again = client.chat.completions.create(model="sdk-text", messages=history)
    assert again.choices[0].message.content == f"echo: then this {marker}"
    sent = [m for m in upstream_body(standin, f"then this {marker}")["messages"] if m["role"] == "assistant"]
    assert [m.get("content") for m in sent] == [f"echo: hello {marker}", None] and sent[1]["refusal"] == "I can't help with that."


class GetWeather(pydantic.BaseModel):
    city: str
    unit: Literal["celsius", "fahrenheit"]


class Answer(pydantic.BaseModel):
    answer: int
    sure: bool


WEATHER_TOOL = openai.pydantic_function_tool(GetWeather)


def test_a_tool_call_and_its_result_round_trip(client: openai.OpenAI, standin: StandIn) -> None:
    """The agent loop: the model calls a tool, the client appends the SDK's message and the tool's result
    and asks again; both reach the upstream as sent."""
    marker = uuid.uuid4().hex
    arguments = '{"city": "Oslo", "unit": "celsius"}'
    question = user(f"weather in Oslo? {marker}")
    first = client.chat.completions.create(
        model="sdk-text", messages=question, tools=[WEATHER_TOOL],
        extra_body={"standin_step": {"kind": "tool_call", "arguments": arguments}},
    )
    assert first.model == "sdk-text" and first.choices[0].finish_reason == "tool_calls"
    message = first.choices[0].message
    assert message.content is None and message.tool_calls is not None
    (call,) = message.tool_calls
    assert call.type == "function" and call.function.name == "GetWeather" and call.function.arguments == arguments
    result = {"role": "tool", "tool_call_id": call.id, "content": '{"temp_c": 4}'}
    second = client.chat.completions.create(model="sdk-text", messages=[*question, message, result], tools=[WEATHER_TOOL])
    assert second.choices[0].message.content == f"echo: weather in Oslo? {marker}"
    sent = [body for body in (r["body"] for r in standin.requests()) if body and len(body["messages"]) == 3 and marker in json.dumps(body)]
    assert len(sent) == 1
    assistant, tool = sent[0]["messages"][1:]
    assert assistant["tool_calls"] == [{"id": call.id, "type": "function", "function": {"name": "GetWeather", "arguments": arguments}}]
    assert tool == result
    assert sent[0]["tools"][0]["function"]["name"] == "GetWeather" and sent[0]["tools"][0]["function"]["strict"] is True


def test_a_streamed_tool_call_is_assembled_by_the_sdk(client: openai.OpenAI) -> None:
    """The SDK's stream helper joins the relayed argument fragments and parses them into the tool's model."""
    step = {"kind": "tool_call", "arguments": '{"city": "Oslo", "unit": "fahrenheit"}', "chunks": 9}
    with client.chat.completions.stream(
        model="sdk-text", messages=user("weather, streamed"), tools=[WEATHER_TOOL], extra_body={"standin_step": step}
    ) as stream:
        kinds = {event.type for event in stream}
        final = stream.get_final_completion()
    assert "tool_calls.function.arguments.delta" in kinds and "tool_calls.function.arguments.done" in kinds
    assert final.model == "sdk-text" and final.choices[0].finish_reason == "tool_calls"
    (call,) = final.choices[0].message.tool_calls or []
    assert call.function.parsed_arguments == GetWeather(city="Oslo", unit="fahrenheit")


def test_structured_output_is_parsed_by_the_sdk(client: openai.OpenAI, standin: StandIn) -> None:
    """chat.completions.parse sends a strict json_schema response_format, which reaches the upstream as
    sent, and parses the answer into the client's model."""
    marker = uuid.uuid4().hex
    step = {"kind": "ok", "content": '{"answer": 42, "sure": true}'}
    completion = client.chat.completions.parse(
        model="sdk-text", messages=user(f"answer {marker}"), response_format=Answer, extra_body={"standin_step": step}
    )
    assert completion.choices[0].message.parsed == Answer(answer=42, sure=True)
    sent = upstream_body(standin, marker)["response_format"]
    assert sent["type"] == "json_schema" and sent["json_schema"]["name"] == "Answer" and sent["json_schema"]["strict"] is True
    assert sent["json_schema"]["schema"]["required"] == ["answer", "sure"]


def test_the_sdk_reads_the_request_id(client: openai.OpenAI) -> None:
    """The SDK exposes x-request-id as `_request_id`: the client's own, echoed, or the gateway's."""
    echoed = client.chat.completions.create(model="sdk-text", messages=user("id"), extra_headers={"X-Request-Id": "trace-42"})
    assert echoed._request_id == "trace-42"
    assert client.chat.completions.create(model="sdk-text", messages=user("id"))._request_id


def test_many_concurrent_streams_from_the_async_sdk(gateway: GatewayProcess) -> None:
    """AsyncOpenAI, 40 streams at once on one client, each paced over 100 ms: each gets its own whole answer."""

    async def one(sdk: openai.AsyncOpenAI, index: int) -> str:
        stream = await sdk.chat.completions.create(
            model="sdk-text", messages=user(f"stream {index}"), stream=True,
            extra_body={"standin_step": {"kind": "ok", "content": f"answer {index}", "chunks": 5, "interval_ms": 20}},
        )
        return "".join([chunk.choices[0].delta.content or "" async for chunk in stream if chunk.choices])

    async def many() -> list[str]:
        http_client = openai.DefaultAsyncHttpx2Client(trust_env=False)
        async with openai.AsyncOpenAI(
            base_url=f"{gateway.url}/v1", api_key=CLIENT_KEY, max_retries=0, timeout=30.0, http_client=http_client
        ) as sdk:
            return await asyncio.gather(*(one(sdk, index) for index in range(40)))

    assert asyncio.run(many()) == [f"answer {index}" for index in range(40)]


def test_chat_with_an_inline_image(client: openai.OpenAI) -> None:
    """An image as a base64 data URI content part is accepted by a vision alias."""
    content = [{"type": "text", "text": "Describe this image"}, {"type": "image_url", "image_url": {"url": JPEG_URI}}]
    completion = client.chat.completions.create(
        model="sdk-vision", messages=[{"role": "user", "content": content}], max_tokens=200
    )
    assert completion.choices[0].message.content == "echo: Describe this image"


def test_streaming(client: openai.OpenAI) -> None:
    """stream=True yields typed chunks, every one naming the alias, whose deltas make up the answer."""
    stream = client.chat.completions.create(model="sdk-vision", messages=user("stream it"), stream=True)
    chunks = list(stream)
    assert chunks and all(chunk.model == "sdk-vision" for chunk in chunks)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert text == "".join(f"stand-in part {i} " for i in range(1, 6))
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_extra_body_fields_pass_through(client: openai.OpenAI, standin: StandIn) -> None:
    """Fields the SDK sends through extra_body reach the upstream untouched."""
    marker = uuid.uuid4().hex
    client.chat.completions.create(
        model="sdk-text", messages=user(marker), extra_body={"provider": {"order": ["a", "b"]}, "top_k": 7}
    )
    body = upstream_body(standin, marker)
    assert body["provider"] == {"order": ["a", "b"]}
    assert body["top_k"] == 7


def test_raw_response_headers(client: openai.OpenAI) -> None:
    """The SDK's raw response shows the gateway's x-request-id and x-gateway-served-by headers."""
    raw = client.chat.completions.with_raw_response.create(model="sdk-text", messages=user("headers"))
    assert raw.headers["x-gateway-served-by"] == "sdk-text"
    assert raw.headers.get("x-request-id")
    assert raw.parse().model == "sdk-text"


def test_models_list_and_retrieve(client: openai.OpenAI) -> None:
    """models.list() pages through every alias; models.retrieve() answers one by name."""
    ids = {model.id for model in client.models.list()}
    assert ids == {"sdk-vision", "sdk-text", "sdk-pro", "sdk-failing"}
    model = client.models.retrieve("sdk-pro")
    assert model.id == "sdk-pro"
    assert model.object == "model"
    # Capabilities ride along as an extra field of the SDK's Model object.
    assert model.model_extra is not None
    assert model.model_extra["capabilities"]["min_max_tokens"] == 200


def test_image_url_arrives_as_bad_request_error(client: openai.OpenAI) -> None:
    """An https image URL raises BadRequestError with .code image_url_not_supported and the seed's .param."""
    content = [
        {"type": "text", "text": "What logo?"},
        {"type": "image_url", "image_url": {"url": "https://example.com/logo.png"}},
    ]
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="sdk-vision", messages=[{"role": "user", "content": content}])
    error = info.value
    assert error.status_code == 400
    assert error.code == "image_url_not_supported"
    assert error.param == "messages[0].content[1].image_url.url"
    assert error.type == "invalid_request_error"
    assert isinstance(error.body, dict) and error.body["pointer"] == "/messages/0/content/1/image_url/url"
    assert error.response.headers.get("x-request-id")


def test_max_tokens_too_small_arrives_as_bad_request_error(client: openai.OpenAI) -> None:
    """max_tokens below the alias's minimum raises BadRequestError with .code and .param set."""
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="sdk-pro", messages=user("think"), max_tokens=50)
    assert (info.value.code, info.value.param) == ("max_tokens_too_small", "max_tokens")


def test_modality_not_supported_arrives_as_bad_request_error(client: openai.OpenAI) -> None:
    """An image sent to a text-only alias raises BadRequestError modality_not_supported at the image part."""
    content = [{"type": "text", "text": "look"}, {"type": "image_url", "image_url": {"url": JPEG_URI}}]
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="sdk-text", messages=[{"role": "user", "content": content}])
    assert (info.value.code, info.value.param) == ("modality_not_supported", "messages[0].content[1]")


def test_unknown_model_arrives_as_not_found_error(client: openai.OpenAI) -> None:
    """An unknown alias raises NotFoundError with .code model_not_found and .param model."""
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="sdk-visoin", messages=user("hi"))
    assert (info.value.code, info.value.param) == ("model_not_found", "model")
    assert "sdk-vision" in str(info.value.body)


def test_wrong_key_arrives_as_authentication_error(gateway: GatewayProcess) -> None:
    """A wrong key raises AuthenticationError with .code invalid_api_key."""
    with make_client(gateway, api_key="sk-not-a-key") as sdk, pytest.raises(openai.AuthenticationError) as info:
        sdk.models.list()
    assert info.value.code == "invalid_api_key"
    assert info.value.param is None


def test_upstream_failure_arrives_as_internal_server_error(client: openai.OpenAI, standin: StandIn) -> None:
    """An upstream that keeps failing raises InternalServerError (502) with .code upstream_error."""
    standin.script("sdk-up-failing", [{"kind": "status", "status": 503}])
    with pytest.raises(openai.InternalServerError) as info:
        client.chat.completions.create(model="sdk-failing", messages=user("fail"))
    assert info.value.status_code == 502
    assert info.value.code == "upstream_error"


def test_the_sdks_own_retries_do_not_repeat_a_spent_plan(gateway: GatewayProcess, standin: StandIn) -> None:
    """The SDK retries a 5xx twice by default: each failed request cost three rounds of the plan's paid
    calls. After its own retries and fallbacks the gateway says `x-should-retry: false`, which the SDK obeys."""
    standin.script("sdk-up-failing", [{"kind": "status", "status": 500}])
    marker = f"spent-{uuid.uuid4()}"
    http_client = openai.DefaultHttpx2Client(trust_env=False)
    with openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=CLIENT_KEY, timeout=30.0, http_client=http_client) as sdk:
        assert sdk.max_retries == 2  # the SDK's default, as an unmodified client runs it
        with pytest.raises(openai.InternalServerError) as info:
            sdk.chat.completions.create(model="sdk-failing", messages=user(marker))
    assert info.value.response.headers["x-should-retry"] == "false"
    calls = [r for r in standin.requests() if r["body"]["messages"][0]["content"] == marker]
    assert len(calls) == 1  # sdk-failing makes no retry of its own
