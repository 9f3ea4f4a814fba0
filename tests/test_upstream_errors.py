"""Upstream error dialects → our reading of them, and the scrubbing of what clients may see."""

from __future__ import annotations

import json
import string
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from conftest import backend_toml
from gateway.dispatch import MOVE_ON, RETRY, STOP, error_event_verdict, status_verdict
from gateway.upstream import retry_after_s
from gateway.upstream_errors import MAX_REASON_CHARS, read_upstream_error, scrub
from harness import CLIENT_KEY, GatewayProcess, StandIn, local_client, serving

RUN = uuid.uuid4().hex[:6]


def raw(payload: Any) -> bytes:
    return json.dumps(payload).encode()


# ------------------------------------------------------------------ dialects


def test_openai_error_with_string_code() -> None:
    """OpenAI's nested error: message, type, param and string code are read; its context code is recognised."""
    info = read_upstream_error(raw({"error": {"message": "too long", "type": "invalid_request_error", "param": "messages", "code": "context_length_exceeded"}}), 400)
    assert (info.reason, info.code, info.type, info.param, info.is_context_length) == ("too long", "context_length_exceeded", "invalid_request_error", "messages", True)


def test_openrouter_error_with_numeric_code_and_provider_raw() -> None:
    """OpenRouter's numeric code is kept as a number; the provider's raw error joins the reason and is searched for context refusals."""
    body = {"error": {"code": 400, "message": "Provider returned error", "metadata": {"raw": "prompt is too long: 300000 tokens > 200000 maximum", "provider_name": "Anthropic"}}}
    info = read_upstream_error(raw(body), 400)
    assert info.numeric_code == 400 and info.code == "400"
    assert info.reason.startswith("Provider returned error: prompt is too long")
    assert info.is_context_length


def test_vllm_flat_error() -> None:
    """vLLM's flat `{"object": "error"}` is read, and its context wording recognised."""
    body = {"object": "error", "message": "This model's maximum context length is 8192 tokens. However, you requested 9000 tokens.", "type": "BadRequestError", "param": None, "code": 400}
    info = read_upstream_error(raw(body), 400)
    assert info.type == "BadRequestError" and info.numeric_code == 400 and info.is_context_length


def test_llamacpp_context_refusal_sent_as_500() -> None:
    """llama.cpp's `exceed_context_size_error`, even with status 500, is a context refusal."""
    body = {"error": {"code": 500, "message": "the request exceeds the available context size, try increasing it", "type": "exceed_context_size_error", "n_prompt_tokens": 9000, "n_ctx": 8192}}
    assert read_upstream_error(raw(body), 500).is_context_length
    assert status_verdict(500, {}, raw(body)).action == MOVE_ON


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"upstream exploded", "upstream exploded"),
        (b"", "no reason given"),
        (raw({"detail": "Not Found"}), "Not Found"),
        (raw({"detail": [{"loc": ["body", "messages"], "msg": "field required"}]}), "field required"),
        (raw({"error": "rate limited"}), "rate limited"),
        (raw(["not", "an", "object"]), '["not", "an", "object"]'),
    ],
    ids=["text", "empty", "fastapi-detail", "fastapi-list", "bare-error-string", "array"],
)
def test_other_shapes_give_a_reason(body: bytes, reason: str) -> None:
    """Plain text, FastAPI details and bare error strings all yield a readable reason."""
    assert read_upstream_error(body, 500).reason == reason


def test_rate_limit_speaking_of_tokens_is_not_a_context_refusal() -> None:
    """A 429 'too many tokens per minute' is a rate limit to retry, not a context refusal to move on from."""
    body = raw({"error": {"message": "Rate limit reached: too many tokens per minute", "code": "rate_limit_exceeded"}})
    assert not read_upstream_error(body, 429).is_context_length
    assert status_verdict(429, {"retry-after": "2"}, body).action == RETRY
    assert status_verdict(429, {"retry-after": "2"}, body).retry_after_s == 2


@pytest.mark.parametrize(
    ("status", "body", "action"),
    [
        (400, {"error": {"message": "temperature out of range", "code": "invalid_value"}}, STOP),
        (400, {"error": {"message": "filtered", "code": "content_filter"}}, STOP),
        (403, {"error": {"message": "Your input was flagged for moderation", "code": 403}}, STOP),
        (403, {"error": {"message": "country not supported", "code": "unsupported_country"}}, MOVE_ON),
        (401, {"error": {"message": "invalid key"}}, MOVE_ON),
        (402, {"error": {"message": "insufficient credits", "code": 402}}, MOVE_ON),
        (404, {"error": {"message": "no such model"}}, MOVE_ON),
        (413, {"error": {"message": "payload too large"}}, STOP),
        (422, {"object": "error", "message": "temperature must be <= 2", "type": "BadRequestError", "code": 422}, STOP),
        # About the call the gateway made, not the client's request: a base_url path that takes no POST, a
        # proxy wanting credentials, a refused content type. They reached the client as its own 405 (with no
        # Allow) or 407, and no fallback was tried.
        (405, {"error": {"message": "Method Not Allowed"}}, MOVE_ON),
        (407, {"error": {"message": "Proxy Authentication Required"}}, MOVE_ON),
        (415, {"error": {"message": "unsupported media type"}}, MOVE_ON),
        (451, {"error": {"message": "unavailable for legal reasons"}}, MOVE_ON),
        # A filter's words on a status about the key, not the request: the next target is tried.
        (401, {"error": {"message": "API key flagged for suspicious activity"}}, MOVE_ON),
        (408, {"error": {"message": "timeout"}}, RETRY),
        (409, {"error": {"message": "conflict"}}, RETRY),
        (500, {"error": {"message": "boom"}}, RETRY),
        (503, {"object": "error", "message": "loading model", "code": 503}, RETRY),
        (400, {"error": {"message": "Please reduce the length of the messages."}}, MOVE_ON),
    ],
)
def test_status_and_reason_decide_retry_move_on_or_stop(status: int, body: dict[str, Any], action: str) -> None:
    """Each upstream status (and what the body says) maps to retry, move on or stop as SPEC §6 says."""
    verdict = status_verdict(status, {}, raw(body))
    assert verdict.action == action
    if action == STOP:
        assert verdict.error is not None and verdict.error.status == status and verdict.error.code == "upstream_rejected"


def test_error_event_is_judged_by_the_status_it_names() -> None:
    """An `{"error": ...}` stream event with a numeric code is judged as that status; without one, as a 502."""
    assert error_event_verdict(raw({"error": {"message": "bad param", "code": 400}})).action == STOP
    unnamed = error_event_verdict(raw({"error": {"message": "upstream overloaded"}}))
    assert (unnamed.action, unnamed.outcome) == (RETRY, "error_event 502")


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"retry-after": "3"}, 3.0),
        ({"retry-after": "0.5"}, 0.5),
        ({"retry-after-ms": "250"}, 0.25),
        ({"retry-after": "-1"}, None),
        ({"retry-after": "soon"}, None),
        ({}, None),
        ({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}, 0.0),
    ],
)
def test_retry_after_forms(headers: dict[str, str], expected: float | None) -> None:
    """Retry-After in seconds, OpenAI's retry-after-ms, and HTTP dates (a past date means now)."""
    assert retry_after_s(headers) == expected


def test_retry_after_http_date_in_the_future() -> None:
    """An HTTP-date Retry-After gives the seconds until then."""
    assert retry_after_s({"retry-after": "Wed, 21 Oct 2015 07:28:30 GMT"}, now=1445412480.0) == 30.0


# ------------------------------------------------------------------ scrubbing


def test_scrub_removes_keys_urls_hosts_and_tokens() -> None:
    """Known secrets, bearer tokens, sk- keys, key= parameters and URL credentials are all removed."""
    text = (
        "Incorrect API key provided: sk-live-abcdef123456. Authorization: Bearer tok_987654 "
        "at https://user:pa55@api.internal:8443/v1 (host api.internal:8443) ?api_key=zzz999"
    )
    clean = scrub(text, ["https://user:pa55@api.internal:8443/v1", "api.internal:8443"])
    for secret in ("sk-live-abcdef123456", "tok_987654", "pa55", "api.internal", "zzz999"):
        assert secret not in clean
    assert "Incorrect API key provided" in clean


@given(prefix=st.text(max_size=40), suffix=st.text(max_size=40), secret=st.text(st.characters(blacklist_characters="[]"), min_size=8, max_size=30))
def test_scrub_never_leaves_a_given_secret(prefix: str, suffix: str, secret: str) -> None:
    """Whatever surrounds it, a given secret never survives scrubbing."""
    assert secret not in scrub(prefix + secret + suffix, [secret])


@given(
    lead=st.sampled_from(["<html>Bad gateway", "é" * 40]),
    padding=st.integers(1100, 1300),
    secret=st.text(string.ascii_letters + string.digits + "-_", min_size=16, max_size=48),
)
def test_a_secret_across_the_reasons_cut_leaves_no_piece(lead: str, padding: int, secret: str) -> None:
    """A body that is not JSON is read up to a cut; a key lying across it is redacted whole. Cut first,
    its first part survived, and folding the spaces before it brought it into the reason."""
    body = f"{lead}{' ' * padding}{secret}</html>".encode()
    reason = read_upstream_error(body, 502, secrets=(secret,)).reason
    assert not any(secret[i : i + 6] in reason for i in range(len(secret) - 5)), reason


@given(st.binary(max_size=2000))
def test_any_bytes_give_a_short_reason(body: bytes) -> None:
    """Any upstream body, however broken, reads into a reason of bounded length, never an exception."""
    info = read_upstream_error(body, 500)
    assert 0 < len(info.reason) <= MAX_REASON_CHARS


# ------------------------------------------------------------------ through the gateway


HIDDEN_MODEL = f"internal/{RUN}-llama-finetune-v7"


@pytest.fixture(scope="module")
def gateway(standin: StandIn, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    directory = tmp_path_factory.mktemp("upstream-errors")
    config_text = (
        "[routing]\nbackoff_s = 0.05\ncooldown_failures = 50\n\n"
        + backend_toml(standin, first_byte_timeout_s=2, idle_timeout_s=2, timeout_s=5)
        + "\n"
        f'[models."errs"]\nbackend = "local"\nmodel = "{RUN}-errors"\n'
        f'[models."hidden"]\nbackend = "local"\nmodel = "{HIDDEN_MODEL}"\nretries = 0\n'
    )
    with serving(config_text, directory) as running:
        yield running


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    with local_client(timeout_s=10.0) as http:
        yield http


@pytest.mark.parametrize("dialect", ["openai", "vllm", "llamacpp", "text"])
@pytest.mark.parametrize("stream", [False, True], ids=["nonstream", "stream"])
def test_upstream_refusal_reaches_the_client_in_our_envelope(dialect: str, stream: bool, gateway: GatewayProcess, standin: StandIn, client: httpx.Client) -> None:
    """A 400 about the request, in any dialect, reaches the client as 400 in our envelope with the upstream's reason."""
    standin.script(f"{RUN}-errors", [{"kind": "status", "status": 400, "format": dialect, "message": f"top_k must be positive ({dialect})"}])
    response = client.post(
        f"{gateway.url}/v1/chat/completions",
        json={"model": "errs", "messages": [{"role": "user", "content": "hi"}], "stream": stream},
        headers={"authorization": f"Bearer {CLIENT_KEY}"},
    )
    assert response.status_code == 400 and response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert error["code"] == "upstream_rejected" and error["type"] == "invalid_request_error"
    assert f"top_k must be positive ({dialect})" in error["message"]
    assert set(error) == {"type", "code", "message", "param", "pointer"}


@pytest.mark.parametrize("dialect", ["openai", "vllm", "llamacpp", "text"])
def test_upstream_5xx_in_any_dialect_ends_as_502_with_its_reason(dialect: str, gateway: GatewayProcess, standin: StandIn, client: httpx.Client) -> None:
    """A 5xx in any dialect is retried and then summarised in a 502 upstream_error with the upstream's reason."""
    standin.script(f"{RUN}-errors", [{"kind": "status", "status": 503, "format": dialect, "message": f"busy ({dialect})"}])
    response = client.post(
        f"{gateway.url}/v1/chat/completions",
        json={"model": "errs", "messages": [{"role": "user", "content": "hi"}]},
        headers={"authorization": f"Bearer {CLIENT_KEY}"},
    )
    assert response.status_code == 502
    error = response.json()["error"]
    assert error["code"] == "upstream_error" and error["message"].count(f"errs: 503 (busy ({dialect}))") == 2


def test_an_upstream_naming_its_model_id_is_answered_with_the_alias(gateway: GatewayProcess, standin: StandIn, client: httpx.Client) -> None:
    """Clients see aliases only (SPEC §2): an upstream's reason that names its own model id, in a 502
    summary, a passed-on 400 or an error mid-stream, names the alias instead."""
    def ask(stream: bool = False) -> httpx.Response:
        body = {"model": "hidden", "messages": [{"role": "user", "content": "hi"}], "stream": stream}
        return client.post(f"{gateway.url}/v1/chat/completions", json=body, headers={"authorization": f"Bearer {CLIENT_KEY}"})

    standin.script(HIDDEN_MODEL, [{"kind": "status", "status": 404, "message": f"The model `{HIDDEN_MODEL}` does not exist."}])
    missing = ask()
    assert missing.status_code == 502 and "The model `hidden` does not exist." in missing.text, missing.text
    standin.script(HIDDEN_MODEL, [{"kind": "status", "status": 400, "message": f"{HIDDEN_MODEL} does not support tool_choice=required"}])
    refused = ask()
    assert refused.status_code == 400 and "hidden does not support tool_choice=required" in refused.text, refused.text
    first = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": HIDDEN_MODEL,
             "choices": [{"index": 0, "delta": {"role": "assistant", "content": "Hi"}, "finish_reason": None}]}
    failing = {"error": {"message": f"{HIDDEN_MODEL} ran out of memory", "code": 500}}
    events = f"data: {json.dumps(first)}\n\ndata: {json.dumps(failing)}\n\n"
    standin.script(HIDDEN_MODEL, [{"kind": "raw", "content_type": "text/event-stream", "body": events}])
    broken = ask(stream=True)
    assert broken.status_code == 200 and "hidden ran out of memory" in broken.text, broken.text
    for answer in (missing, refused, broken):
        assert HIDDEN_MODEL not in answer.text
