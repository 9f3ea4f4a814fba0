"""Unit and integration tests of the generated rules: the shipped aliases, composites and
fallbacks, the loader's capability cross-checks, and the rules shown in words.

Unit tests judge requests against snapshots compiled from TOML text; the integration
tests at the end run a real ``gateway serve`` in front of the upstream stand-in.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import CLIENT_KEY, GatewayFactory, backend_toml
from gateway.api.info import model_entry
from gateway.cli import main
from gateway.config import ConfigError, load_config, parse_config
from gateway.errors import GatewayError, Location
from gateway.facts import MAX_CHARS_PER_TOKEN, inspect_request
from gateway.routing import plan_attempts
from gateway.snapshot import Snapshot, build_snapshot
from harness import StandIn, local_client
from strategies import image_part, part_of

SEED_CONFIG = Path(__file__).resolve().parent.parent / "models.toml"
SEED = build_snapshot(load_config(SEED_CONFIG), environ={})
BACKEND = '[backends.b]\nbase_url = "http://127.0.0.1:9/v1"\n'


def snapshot(toml: str) -> Snapshot:
    return build_snapshot(parse_config((BACKEND + toml).encode()), environ={})


def chat(model: str, *content: Any, **fields: Any) -> dict[str, Any]:
    parts = [{"type": "text", "text": "hi"}, *content]
    return {"model": model, "messages": [{"role": "user", "content": parts}], **fields}


def verdict(snap: Snapshot, body: dict[str, Any]) -> tuple[str, Location | None] | None:
    """None when the alias accepts the body, else (code, location)."""
    try:
        facts = inspect_request(body)
        snap.lookup(facts.model).rules.check(facts)
    except GatewayError as error:
        return error.code, error.at
    return None


def issues(toml: str) -> dict[tuple[Any, ...], str]:
    with pytest.raises(ConfigError) as info:
        parse_config((BACKEND + toml).encode())
    return {issue.path: issue.message for issue in info.value.issues}


# ---------------------------------------------------------------- the shipped aliases

AT_PART_1: Location = ("messages", 0, "content", 1)


@pytest.mark.parametrize(
    ("alias", "modality", "accepted"),
    [
        ("qwen3-8b", "image", False),
        ("llama-4-scout", "image", True),
        ("claude-opus-4.7", "audio", False),
        ("gemini-3.1-pro", "audio", True),
        ("gemini-3.1-pro", "video", True),
        ("gemini-3.1-pro", "file", False),
        ("grok-4.20", "video", False),
        ("image-gen", "image", True),
    ],
)
def test_shipped_aliases_accept_what_their_input_lists(alias: str, modality: str, accepted: bool) -> None:
    """A part is accepted exactly when the alias's `input` in models.toml lists its modality."""
    found = verdict(SEED, chat(alias, part_of(modality)))
    assert found == (None if accepted else ("modality_not_supported", AT_PART_1))


def test_the_seed_url_example_is_refused_at_the_url() -> None:
    """The seed's https image URL to claude-opus-4.7 is image_url_not_supported at the seed's param."""
    body = chat("claude-opus-4.7", {"type": "image_url", "image_url": {"url": "https://example.com/logo.png"}})
    assert verdict(SEED, body) == ("image_url_not_supported", (*AT_PART_1, "image_url", "url"))


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
def test_min_max_tokens_bounds_both_token_fields(field: str) -> None:
    """gpt-5.5-pro (min_max_tokens = 200) refuses 199 in either token field and takes 200."""
    assert verdict(SEED, chat("gpt-5.5-pro", **{field: 199})) == ("max_tokens_too_small", (field,))
    assert verdict(SEED, chat("gpt-5.5-pro", **{field: 200})) is None


def test_an_image_output_alias_refuses_nothing_for_asking_images() -> None:
    """nano-banana answers with images, so `modalities: ["image", "text"]` passes; a text alias refuses it."""
    assert verdict(SEED, chat("nano-banana", modalities=["image", "text"])) is None
    assert verdict(SEED, chat("qwen3-8b", modalities=["text", "image"])) == ("modality_not_supported", ("modalities", 1))


def test_context_window_refuses_only_what_certainly_cannot_fit() -> None:
    """A prompt over window x 256 characters is refused at `messages`; one at the bound passes."""
    snap = snapshot('[models.small]\nbackend = "b"\nmodel = "s"\ncontext_window = 10\nmax_output_tokens = 8\n')
    at_bound = {"model": "small", "messages": [{"role": "user", "content": "w" * (10 * MAX_CHARS_PER_TOKEN)}]}
    assert verdict(snap, at_bound) is None
    at_bound["messages"][0]["content"] += "w"
    assert verdict(snap, at_bound) == ("context_length_exceeded", ("messages",))


def test_max_tokens_is_not_added_to_the_prompt_for_the_window() -> None:
    """A short prompt with max_tokens as large as the window passes: providers may clamp max_tokens."""
    snap = snapshot('[models.small]\nbackend = "b"\nmodel = "s"\ncontext_window = 100\n')
    assert verdict(snap, chat("small", max_tokens=100)) is None


# ---------------------------------------------------------------- images and capabilities

IMAGES = '[models.v]\nbackend = "b"\nmodel = "v"\ninput = ["text", "image"]\nmax_images = 2\nmax_image_bytes = 1000\n'


def test_too_many_images_points_at_the_first_image_over_the_limit() -> None:
    """With max_images = 2 the third image is the one reported, not the last."""
    body = chat("v", image_part(), image_part(), image_part(), image_part())
    assert verdict(snapshot(IMAGES), body) == ("too_many_images", ("messages", 0, "content", 3, "image_url", "url"))


def test_an_image_over_max_image_bytes_is_413_at_its_url() -> None:
    """An image one byte over max_image_bytes is 413 image_too_large at its URL; at the limit it passes."""
    snap = snapshot(IMAGES)
    assert verdict(snap, chat("v", image_part("webp", 1000))) is None
    facts = inspect_request(chat("v", image_part("webp", 1001)))
    with pytest.raises(GatewayError) as info:
        snap.lookup("v").rules.check(facts)
    assert (info.value.code, info.value.status, info.value.at) == ("image_too_large", 413, (*AT_PART_1, "image_url", "url"))


def test_image_limits_come_from_defaults_unless_the_alias_sets_them() -> None:
    """[defaults] max_images applies to an alias that does not set its own."""
    snap = snapshot('[defaults]\nmax_images = 1\n[models.v]\nbackend = "b"\nmodel = "v"\ninput = ["text", "image"]\n')
    assert verdict(snap, chat("v", image_part(), image_part())) == ("too_many_images", ("messages", 0, "content", 2, "image_url", "url"))


CAPS = """
[models.plain]
backend = "b"
model = "p"
streaming = false
tools = false
structured_output = false
thinking = false
"""


@pytest.mark.parametrize(
    ("fields", "code", "at"),
    [
        ({"stream": True}, "stream_not_supported", ("stream",)),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "capability_not_supported", ("tools",)),
        ({"response_format": {"type": "json_object"}}, "capability_not_supported", ("response_format", "type")),
        ({"reasoning_effort": "medium"}, "capability_not_supported", ("reasoning_effort",)),
        ({"thinking": {"type": "enabled"}}, "capability_not_supported", ("thinking",)),
    ],
)
def test_a_capability_declared_false_refuses_requests_using_it(fields: dict[str, Any], code: str, at: Location) -> None:
    """streaming/tools/structured_output/thinking = false refuse the request fields that use them."""
    assert verdict(snapshot(CAPS), chat("plain", **fields)) == (code, at)


def test_a_capability_declared_false_passes_requests_not_using_it() -> None:
    """Fields that do not use a refused capability pass: stream false, empty tools, text format, effort none."""
    body = chat("plain", stream=False, tools=[], response_format={"type": "text"}, reasoning_effort="none")
    assert verdict(snapshot(CAPS), body) is None


# ---------------------------------------------------------------- composites and fallbacks

ROUTES = """
[models.text]
backend = "b"
model = "t"
streaming = false

[models.vision]
backend = "b"
model = "v"
input = ["text", "image"]
tools = false

[models.both]
route = ["text", "vision"]

[models.narrow]
route = ["text", "vision"]
input = ["text"]

[models.text-first]
backend = "b"
model = "tf"
fallback = ["vision"]

[models.vision-first]
backend = "b"
model = "vf"
input = ["text", "image"]
fallback = ["text"]
"""


def test_a_composite_accepts_what_any_member_accepts_and_routing_skips_the_others() -> None:
    """An image to route [text, vision] is accepted; the plan skips the text member without a call."""
    snap = snapshot(ROUTES)
    facts = inspect_request(chat("both", image_part()))
    snap.lookup("both").rules.check(facts)
    assert [t.alias for t in plan_attempts(snap.lookup("both"), facts)] == ["vision"]
    streaming = inspect_request(chat("both", stream=True))
    assert [t.alias for t in plan_attempts(snap.lookup("both"), streaming)] == ["vision"]


def test_a_composite_refusal_is_its_first_members_that_takes_the_requests_modalities() -> None:
    """When no member accepts, the first member that takes what the request sends says why, named
    for the composite: an image with tools to [text, vision without tools] is refused for the tools,
    not for the image that 'vision' takes."""
    facts = inspect_request(chat("both", image_part(), tools=[{"type": "function", "function": {"name": "f"}}]))
    with pytest.raises(GatewayError) as info:
        snapshot(ROUTES).lookup("both").rules.check(facts)
    assert (info.value.code, info.value.at) == ("capability_not_supported", ("tools",))
    assert "'both'" in info.value.message and "'vision' says" in info.value.message


def test_a_composite_refusal_is_its_first_members_when_none_takes_the_modalities() -> None:
    """An image with audio to [sees images, hears audio]: neither takes both; the first one says why."""
    toml = """
[models.seeing]
backend = "b"
model = "s"
input = ["text", "image"]
[models.hearing]
backend = "b"
model = "h"
input = ["text", "audio"]
[models.senses]
route = ["seeing", "hearing"]
"""
    facts = inspect_request(chat("senses", image_part(), part_of("audio")))
    with pytest.raises(GatewayError) as info:
        snapshot(toml).lookup("senses").rules.check(facts)
    assert (info.value.code, info.value.at) == ("modality_not_supported", ("messages", 0, "content", 2))
    assert "'seeing' says" in info.value.message


def text_and_vision_group(*, defaults_bytes: int, vision_bytes: int) -> str:
    """`group` = route [text, vision]; [defaults] and vision set different image limits."""
    return f"""
[defaults]
max_images = 3
max_image_bytes = {defaults_bytes}
[models.text]
backend = "b"
model = "t"
[models.vision]
backend = "b"
model = "v"
input = ["text", "image"]
max_images = 2
max_image_bytes = {vision_bytes}
[models.group]
route = ["text", "vision"]
"""


def test_a_composites_image_limits_are_those_of_its_members_that_take_images() -> None:
    """Route [text, vision]: the text member's [defaults] image limits neither show nor decide."""
    snap = snapshot(text_and_vision_group(defaults_bytes=1000, vision_bytes=100))
    rules = snap.lookup("group").rules
    assert (rules.limit("max_images"), rules.limit("max_image_bytes")) == (2, 100)
    capabilities = model_entry(snap.lookup("group"), 0)["capabilities"]
    assert (capabilities["max_images"], capabilities["max_image_bytes"]) == (2, 100)
    assert verdict(snap, chat("group", image_part(), image_part(), image_part())) == (
        "too_many_images",
        ("messages", 0, "content", 3, "image_url", "url"),
    )
    large = image_part(size=200)
    code, _ = verdict(snap, chat("group", large)) or ("accepted", None)
    assert code == "image_too_large"


def test_a_composites_own_keys_narrow_what_its_members_accept() -> None:
    """A composite that declares input = ["text"] refuses images although a member takes them."""
    assert verdict(snapshot(ROUTES), chat("narrow", image_part())) == ("modality_not_supported", AT_PART_1)


def test_fallbacks_never_widen_what_an_alias_accepts() -> None:
    """A text alias falling back to a vision alias still refuses images."""
    assert verdict(snapshot(ROUTES), chat("text-first", image_part())) == ("modality_not_supported", AT_PART_1)


def test_a_fallback_that_cannot_serve_the_request_is_skipped() -> None:
    """An image request to a vision alias plans no text-only fallback; a text request keeps it."""
    snap = snapshot(ROUTES)
    alias = snap.lookup("vision-first")
    assert [t.alias for t in plan_attempts(alias, inspect_request(chat("vision-first", image_part())))] == ["vision-first"]
    assert [t.alias for t in plan_attempts(alias, inspect_request(chat("vision-first")))] == ["vision-first", "text"]


def test_a_composites_undeclared_limits_are_its_members_not_defaults() -> None:
    """A composite without max_images takes as many images as a member does, whatever [defaults] says."""
    toml = """
[defaults]
max_images = 1
[models.many]
backend = "b"
model = "m"
input = ["text", "image"]
max_images = 3
[models.group]
route = ["many"]
"""
    snap = snapshot(toml)
    assert verdict(snap, chat("group", image_part(), image_part(), image_part())) is None
    assert snap.lookup("group").rules.limit("max_images") == 3


def test_max_output_tokens_takes_its_own_value() -> None:
    """max_output_tokens = 1000 takes max_tokens 1000 and refuses 1001 (the bound itself was never sent)."""
    snap = snapshot('[models.capped]\nbackend = "b"\nmodel = "c"\nmax_output_tokens = 1000\n')
    assert verdict(snap, chat("capped", max_tokens=1000)) is None
    assert verdict(snap, chat("capped", max_completion_tokens=1001)) == ("max_tokens_too_large", ("max_completion_tokens",))


def test_every_output_modality_asked_for_is_checked() -> None:
    """`modalities: ["image", "audio"]` to an alias answering text and images is refused at the audio."""
    snap = snapshot('[models.painter]\nbackend = "b"\nmodel = "p"\noutput = ["text", "image"]\n')
    assert verdict(snap, chat("painter", modalities=["image", "audio"])) == ("modality_not_supported", ("modalities", 1))
    assert verdict(snap, chat("painter", modalities=["text", "image"])) is None


def test_a_capability_is_refused_in_a_stream_too() -> None:
    """tools = false refuses tools in a streamed request as in a plain one."""
    tools = [{"type": "function", "function": {"name": "f"}}]
    assert verdict(snapshot(ROUTES), chat("vision", stream=True, tools=tools)) == ("capability_not_supported", ("tools",))


def test_images_to_an_alias_that_takes_none_are_refused_for_the_modality_not_their_number() -> None:
    """Two images to a text alias under [defaults] max_images = 1: the client must be told the alias takes
    no images, not to send fewer."""
    snap = snapshot('[defaults]\nmax_images = 1\n[models.text]\nbackend = "b"\nmodel = "t"\n')
    assert verdict(snap, chat("text", image_part(), image_part())) == ("modality_not_supported", AT_PART_1)


@pytest.mark.parametrize(
    "message",
    [
        {"role": "assistant", "content": None, "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "x" * 5000}}]},
        {"role": "assistant", "content": None, "refusal": "x" * 5000},
    ],
    ids=["tool-call-arguments", "refusal"],
)
def test_every_text_the_model_reads_counts_toward_the_window(message: dict[str, Any]) -> None:
    """A tool call's arguments and an assistant's refusal are prompt text: 5,000 characters cannot fit a
    window of 10 tokens (at most 256 characters a token)."""
    snap = snapshot('[models.small]\nbackend = "b"\nmodel = "s"\ncontext_window = 10\n')
    body = {"model": "small", "messages": [{"role": "user", "content": "hi"}, message]}
    assert verdict(snap, body) == ("context_length_exceeded", ("messages",))


@pytest.mark.parametrize("thinking", [{"type": "adaptive"}, {"budget_tokens": 1024}])
def test_any_thinking_but_disabled_is_thinking(thinking: dict[str, Any]) -> None:
    """thinking = false refuses every `thinking` object that does not say "disabled", as the README says."""
    assert verdict(snapshot(CAPS), chat("plain", thinking=thinking)) == ("capability_not_supported", ("thinking",))
    assert verdict(snapshot(CAPS), chat("plain", thinking={"type": "disabled"})) is None


def test_a_null_audio_asks_for_no_audio() -> None:
    """`"audio": null` is absent (SPEC §2): a text alias takes it; an audio object it refuses."""
    assert verdict(SEED, chat("qwen3-8b", audio=None)) is None
    assert verdict(SEED, chat("qwen3-8b", audio={"voice": "alloy", "format": "wav"})) == ("modality_not_supported", ("audio",))


def test_a_composite_shows_what_its_widest_member_takes() -> None:
    """GET /v1/models shows a composite's widest: the least min_max_tokens, no max_output_tokens when a member
    has none, a capability when any member has it; its own min_max_tokens raises its members' least."""
    toml = """
[models.strict]
backend = "b"
model = "s"
min_max_tokens = 10
max_output_tokens = 1000
tools = false
[models.loose]
backend = "b"
model = "l"
min_max_tokens = 50
[models.either]
route = ["strict", "loose"]
[models.either-at-20]
route = ["strict", "loose"]
min_max_tokens = 20
"""
    snap = snapshot(toml)
    either = model_entry(snap.lookup("either"), 0)["capabilities"]
    assert (either["min_max_tokens"], either["max_output_tokens"], either["tools"]) == (10, None, True)
    assert model_entry(snap.lookup("either-at-20"), 0)["capabilities"]["min_max_tokens"] == 20


def test_a_composites_image_size_is_its_image_members_not_defaults() -> None:
    """[defaults] max_image_bytes = 100 does not refuse a 5,000-byte image that the composite's image member
    (max_image_bytes = 100,000) takes."""
    snap = snapshot(text_and_vision_group(defaults_bytes=100, vision_bytes=100_000))
    assert verdict(snap, chat("group", image_part(size=5000))) is None


# ---------------------------------------------------------------- loader cross-checks


def test_a_composite_may_not_declare_a_capability_no_member_has() -> None:
    """tools = true on a composite whose members all declare tools = false is a config error at that key."""
    toml = '[models.a]\nbackend = "b"\nmodel = "a"\ntools = false\n[models.c]\nroute = ["a"]\ntools = true\n'
    assert "tools = false" in issues(toml)[("models", "c", "tools")]


def test_a_capability_no_nested_member_has_is_a_config_error() -> None:
    """A member composite refusing tools through all its own members counts as refusing tools."""
    toml = '[models.a]\nbackend = "b"\nmodel = "a"\ntools = false\n[models.inner]\nroute = ["a"]\n'
    toml += '[models.outer]\nroute = ["inner"]\ntools = true\n'
    assert ("models", "outer", "tools") in issues(toml)
    parse_config((BACKEND + toml.replace("tools = false", "tools = true")).encode())


@pytest.mark.parametrize("key", ["context_window", "max_output_tokens", "max_images", "max_image_bytes"])
def test_a_composite_may_not_declare_a_limit_larger_than_every_members(key: str) -> None:
    """A composite's limit above every member's is a config error naming the largest a member takes."""
    toml = f'[models.a]\nbackend = "b"\nmodel = "a"\n{key} = 100\n[models.c]\nroute = ["a"]\n{key} = 101\n'
    assert "at most 100" in issues(toml)[("models", "c", key)]
    parse_config((BACKEND + toml.replace("101", "100")).encode())


def test_min_max_tokens_above_max_output_tokens_is_a_config_error() -> None:
    """No max_tokens could pass both bounds: the loader says so at min_max_tokens."""
    toml = '[models.a]\nbackend = "b"\nmodel = "a"\nmin_max_tokens = 500\nmax_output_tokens = 100\n'
    assert "max_output_tokens" in issues(toml)[("models", "a", "min_max_tokens")]


@pytest.mark.parametrize(
    ("keys", "path"),
    [
        ('params = { stream = true }', ("params", "stream")),
        ('params = { model = "x" }', ("params", "model")),
        ('rename = { model = "engine" }', ("rename", "model")),
        ('rename = { max_tokens = "messages" }', ("rename", "max_tokens")),
        ('rename = { max_tokens = "n", max_completion_tokens = "n" }', ("rename", "max_completion_tokens")),
    ],
)
def test_params_and_rename_may_not_touch_the_gateways_own_fields(keys: str, path: tuple[str, ...]) -> None:
    """params may not set model/messages/stream, rename may not move them, and two fields may not share a name."""
    assert ("models", "a", *path) in issues(f'[models.a]\nbackend = "b"\nmodel = "a"\n{keys}\n')


# ---------------------------------------------------------------- the rules in words


def test_every_shipped_alias_explains_its_rules_in_words() -> None:
    """Each alias's explanation says what it accepts, from the same compiled rules that judge requests."""
    words = {name: dict(alias.rules.explain()) for name, alias in SEED.aliases.items()}
    assert words["qwen3-8b"]["input"] == "text; refuses image, audio, video, file parts"
    assert words["gemini-3.1-pro"]["input"] == "text, images, audio, video; refuses file parts"
    assert words["gpt-5.5-pro"]["max_tokens"].startswith("at least 200")
    assert words["gemma-4-31b"]["context"].startswith("262,144 tokens")
    assert words["llama-4-scout"]["images"].startswith("up to 16 per request, each up to 20 MiB")
    assert words["image-gen"]["output"] == "images and text"
    assert words["image-gen"]["route"].endswith("nano-banana → gpt-image")
    assert words["qwen3-vl-30b-thinking"]["features"] == "all allowed (declares thinking)"


def test_a_composite_whose_members_differ_explains_each() -> None:
    """A composite's undeclared topic reads per member when its members differ."""
    words = dict(snapshot(ROUTES).lookup("both").rules.explain())
    assert words["features"] == (
        "per member: text: allows tools, structured output, thinking; refuses streaming; "
        "vision: allows streaming, structured output, thinking; refuses tools"
    )


def test_a_composite_that_narrows_explains_the_widest_a_request_gets_through() -> None:
    """A composite's own limit combines with its members' in its words, not replacing them."""
    toml = '[models.v]\nbackend = "b"\nmodel = "v"\ninput = ["text", "image"]\nmax_images = 5\nmax_image_bytes = 2048\n'
    toml += '[models.c]\nroute = ["v"]\nmax_images = 2\n'
    assert dict(snapshot(toml).lookup("c").rules.explain())["images"].startswith("up to 2 per request, each up to 2 KiB")


def test_gateway_models_rules_prints_every_alias(capsys: pytest.CaptureFixture[str]) -> None:
    """`gateway models --rules` prints a block per alias; with --markdown one table row per alias."""
    assert main(["models", "--rules", "--config", str(SEED_CONFIG)]) == 0
    text = capsys.readouterr().out
    for name in SEED.aliases:
        assert f"\n{name}\n" in f"\n{text}"
    assert "max_tokens  at least 200 (max_tokens and max_completion_tokens)" in text
    assert "upstream    max_tokens is sent as max_completion_tokens" in text
    assert main(["models", "--rules", "--markdown", "--config", str(SEED_CONFIG)]) == 0
    table = capsys.readouterr().out.strip().splitlines()
    assert table[0].startswith("| alias | input | output | images |") and len(table) == 2 + len(SEED.aliases)


def test_the_model_entry_shows_rules_and_capabilities() -> None:
    """/v1/models/{alias} carries the rules in words and a composite's capabilities from its members."""
    entry = model_entry(SEED.lookup("image-gen"), 0)
    assert entry["rules"] == dict(SEED.lookup("image-gen").rules.explain())
    assert entry["capabilities"]["max_images"] == 16 and entry["capabilities"]["streaming"] is True
    assert model_entry(snapshot(CAPS).lookup("plain"), 0)["capabilities"]["tools"] is False


# ---------------------------------------------------------------- through a running gateway


def routes_config(standin: StandIn) -> str:
    return backend_toml(standin, "up") + """
[models."rules-text"]
backend = "up"
model = "rules-up-text"
fallback = ["rules-vision"]

[models."rules-vision"]
backend = "up"
model = "rules-up-vision"
input = ["text", "image"]

[models."rules-paint"]
backend = "up"
model = "rules-up-paint"
input = ["text", "image"]
output = ["image", "text"]
params = { modalities = ["image", "text"] }

[models."rules-pro"]
backend = "up"
model = "rules-up-pro"
min_max_tokens = 200
rename = { max_tokens = "max_completion_tokens" }

[models."rules-route"]
route = ["rules-text", "rules-vision"]
"""


def post(client: httpx.Client, url: str, body: Any) -> httpx.Response:
    return client.post(f"{url}/v1/chat/completions", json=body, headers={"authorization": f"Bearer {CLIENT_KEY}"})


def upstream_bodies(standin: StandIn, model: str) -> list[dict[str, Any]]:
    return [r["body"] for r in standin.requests() if r["model"] == model]


def test_rules_and_shaping_through_a_running_gateway(gateway_factory: GatewayFactory, standin: StandIn) -> None:
    """Refusals are 400 envelopes before any upstream call; params and renames reach the upstream."""
    gateway = gateway_factory(routes_config(standin))
    with local_client(timeout_s=15.0) as client:
        refused = post(client, gateway.url, chat("rules-text", image_part()))
        assert refused.status_code == 400, refused.text
        assert refused.json()["error"]["code"] == "modality_not_supported"
        assert refused.json()["error"]["pointer"] == "/messages/0/content/1"
        assert upstream_bodies(standin, "rules-up-text") == []

        painted = post(client, gateway.url, {"model": "rules-paint", "messages": [{"role": "user", "content": "a frog"}]})
        assert painted.status_code == 200, painted.text
        assert painted.json()["choices"][0]["message"]["images"][0]["image_url"]["url"].startswith("data:image/")
        assert upstream_bodies(standin, "rules-up-paint")[-1]["modalities"] == ["image", "text"]

        assert post(client, gateway.url, chat("rules-pro", max_tokens=100)).status_code == 400
        assert post(client, gateway.url, chat("rules-pro", max_tokens=300)).status_code == 200
        sent = upstream_bodies(standin, "rules-up-pro")[-1]
        assert sent["max_completion_tokens"] == 300 and "max_tokens" not in sent

        routed = post(client, gateway.url, chat("rules-route", image_part()))
        assert routed.status_code == 200, routed.text
        assert routed.headers["x-gateway-served-by"] == "rules-vision"
        assert routed.headers["x-gateway-attempts"] == "1"

        entry = client.get(f"{gateway.url}/v1/models/rules-pro", headers={"authorization": f"Bearer {CLIENT_KEY}"})
        assert entry.json()["rules"]["max_tokens"].startswith("at least 200")
        assert "upstream" not in entry.json()["rules"]
