"""The live gateway against the official OpenAI contract, fuzzed by schemathesis.

schemathesis generates requests from ``contracts/openai-chat.openapi.yaml`` (bodies that
follow the schema and bodies that break it, with and without the key, odd methods) and
sends them to a real ``gateway serve`` of the shipped models.toml in front of the stand-in.
Every answer must keep the contract: no 5xx, every error in the ``ErrorResponse`` envelope,
the declared content types, 401 without a key, ``Allow`` on a 405.

Two of schemathesis's checks do not apply to a gateway that generates stricter rules than
the schema and forwards what it does not judge:
- ``positive_data_acceptance``: a schema-valid body may break an alias's generated rule (an
  image to a text-only alias, ``max_tokens`` under ``min_max_tokens``) and is refused;
- ``negative_data_rejection``: the gateway judges the fields its rules need and passes the
  rest (``web_search_options``, say) to the upstream, which judges its own.
And a stream's events are not checked against the chunk schema: schemathesis reads the
contract's ``text/event-stream`` schema as the SSE event object, not the JSON in ``data:``
(the contract's header notes it); the stream tests check chunks instead.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import CHECKS

from conftest import CLIENT_KEY
from harness import REPO_ROOT, GatewayProcess, StandIn, serving_shipped

CONTRACT = REPO_ROOT.parent / "shared" / "contracts" / "openai-chat.openapi.yaml"
SHIPPED_ALIASES = [
    "llama-4-scout", "mistral-small-4", "qwen3-vl-30b-instruct", "qwen3-vl-30b-thinking", "gemma-4-31b",
    "claude-opus-4.7", "gemini-3.1-pro", "grok-4.20", "gpt-5.5-pro", "qwen3-8b", "nano-banana", "gpt-image",
    "image-gen", "no-such-alias",
]
NOT_FOR_A_GATEWAY = {"positive_data_acceptance", "negative_data_rejection"}

schema = schemathesis.openapi.from_path(CONTRACT)
schema.config.generation.update(modes=list(schemathesis.GenerationMode))
CHECKED = [check for check in CHECKS.get_all() if check.__name__ not in NOT_FOR_A_GATEWAY]
UNLESS_STREAMED = [check for check in CHECKED if check.__name__ == "response_schema_conformance"]


@pytest.fixture(scope="module")
def gateway(standin: StandIn, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    with serving_shipped(standin, tmp_path_factory.mktemp("contract-fuzz")) as running:
        yield running


def _with_an_alias(case: schemathesis.Case) -> None:
    """A generated `model` is random text, almost never an alias: name one (or none) instead, chosen
    from the body so that hypothesis replays the same case when it shrinks a failure."""
    if isinstance(case.body, dict) and "model" in case.body:
        case.body["model"] = random.Random(repr(sorted(case.body, key=repr))).choice(SHIPPED_ALIASES)


@schema.parametrize()
@settings(suppress_health_check=list(HealthCheck), deadline=None)
def test_every_answer_keeps_the_contract(case: schemathesis.Case, gateway: GatewayProcess) -> None:
    _with_an_alias(case)
    response = case.call(base_url=f"{gateway.url}/v1", headers={"Authorization": f"Bearer {CLIENT_KEY}"})
    streamed = any(value.startswith("text/event-stream") for value in response.headers.get("content-type", []))
    excluded = UNLESS_STREAMED if streamed else []
    case.validate_response(response, checks=[c for c in CHECKED if c not in excluded], headers={"Authorization": f"Bearer {CLIENT_KEY}"})
    assert "Traceback" not in response.text


def test_the_contract_is_the_one_the_gateway_serves() -> None:
    """The fuzzed operations are the gateway's: chat completions and the model list."""
    assert CONTRACT.is_file(), CONTRACT
    operations = {f"{op.method.upper()} {op.path}" for op in (result.ok() for result in schema.get_all_operations())}
    assert operations == {"POST /chat/completions", "GET /models"}
