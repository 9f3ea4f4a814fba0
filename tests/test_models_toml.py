"""The shipped models.toml: it loads, and holds every alias of the seed pages with the facts they state."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config import Config, load_config
from gateway.rules import AliasRules, compile_rules
from gateway.snapshot import build_snapshot
from gateway.tables import is_local

SHIPPED = Path(__file__).resolve().parent.parent / "models.toml"

# The seed pages' "Vision-capable models" table: alias → notes, as the seed writes them.
SEED_VISION_NOTES = {
    "llama-4-scout": "Strong on screenshots, charts",
    "mistral-small-4": "Good general-purpose vision",
    "qwen3-vl-30b-instruct": "Fast, multi-image, good for Asian-language captions",
    "qwen3-vl-30b-thinking": "Thinking variant — slower but better at complex visual reasoning",
    "gemma-4-31b": "Multi-image, 256 K context",
    "claude-opus-4.7": "Best at nuanced descriptions",
    "gemini-3.1-pro": "Only model that also accepts audio + video",
    "grok-4.20": "2 M token context",
    "gpt-5.5-pro": "Reasoning over images — max_tokens >= 200",
}
SEED_IMAGE_ALIASES = ("nano-banana", "gpt-image", "image-gen")
SEED_ALIASES = (*SEED_VISION_NOTES, *SEED_IMAGE_ALIASES)


@pytest.fixture(scope="module")
def config() -> Config:
    return load_config(SHIPPED)


def rules_of(config: Config, alias: str) -> AliasRules:
    return compile_rules(alias, config.models, config.defaults)


def test_shipped_file_loads_and_compiles(config: Config) -> None:
    """The shipped models.toml passes every check and compiles into a snapshot with every alias."""
    snapshot = build_snapshot(config, source="models.toml", content_hash="test", environ={})
    assert set(snapshot.aliases) == set(config.models)


def test_every_seed_alias_is_declared(config: Config) -> None:
    """Every alias the seed pages name is an alias of the shipped file."""
    missing = [alias for alias in SEED_ALIASES if alias not in config.models]
    assert missing == []


@pytest.mark.parametrize("alias", list(SEED_VISION_NOTES))
def test_vision_aliases_take_images_and_carry_the_seed_notes(config: Config, alias: str) -> None:
    """Each vision-capable alias of the seed accepts image input, answers text, and has the seed's note."""
    rules = rules_of(config, alias)
    assert "image" in rules.input and "text" in rules.input
    assert rules.output == frozenset({"text"})
    assert config.models[alias].notes == SEED_VISION_NOTES[alias]


def test_llama_4_scout_is_local_on_spark(config: Config) -> None:
    """llama-4-scout is served by the local `spark` backend on 127.0.0.1."""
    spec = config.models["llama-4-scout"]
    assert spec.backend == "spark"
    assert config.backends["spark"].base_url.startswith("http://127.0.0.1:")
    assert is_local(config, "llama-4-scout")


def test_backends_are_openrouter_with_its_key_variable_and_local_spark(config: Config) -> None:
    """Two backends: openrouter (cloud, key from OPENROUTER_API_KEY) and spark (local, no key)."""
    assert set(config.backends) == {"openrouter", "spark"}
    openrouter = config.backends["openrouter"]
    assert openrouter.base_url.startswith("https://")
    assert openrouter.api_key_env == "OPENROUTER_API_KEY"
    assert config.backends["spark"].api_key_env is None


def test_context_windows_from_the_seed(config: Config) -> None:
    """gemma-4-31b has the 256K context and grok-4.20 the 2M context the seed states."""
    assert rules_of(config, "gemma-4-31b").context_window == 256 * 1024
    assert rules_of(config, "grok-4.20").context_window == 2_000_000


def test_gpt_5_5_pro_needs_200_max_tokens(config: Config) -> None:
    """gpt-5.5-pro declares min_max_tokens = 200 (the seed's "max_tokens >= 200")."""
    assert rules_of(config, "gpt-5.5-pro").min_max_tokens == 200


def test_only_gemini_takes_audio_and_video(config: Config) -> None:
    """gemini-3.1-pro is the one alias whose input has audio and video."""
    takers = {alias for alias in config.models if {"audio", "video"} & rules_of(config, alias).input}
    assert takers == {"gemini-3.1-pro"}
    assert {"audio", "video"} <= rules_of(config, "gemini-3.1-pro").input


@pytest.mark.parametrize(
    ("alias", "upstream_model", "latency_s", "cost"),
    [
        ("nano-banana", "google/gemini-3.1-flash-image-preview", (12, 15), 3.0),
        ("gpt-image", "openai/gpt-5.4-image-2", (100, 180), 15.0),
    ],
)
def test_image_generation_targets(
    config: Config, alias: str, upstream_model: str, latency_s: tuple[int, int], cost: float
) -> None:
    """The image aliases have the seed's underlying model, cold latency and rough cost, and image output."""
    spec = config.models[alias]
    assert (spec.backend, spec.model) == ("openrouter", upstream_model)
    assert tuple(spec.cold_latency_s or ()) == latency_s
    assert spec.cost_per_mtok_usd == cost
    assert rules_of(config, alias).output == frozenset({"image", "text"})
    assert "image" in rules_of(config, alias).input
    # Image output on OpenRouter-style APIs has to be asked for.
    assert "image" in spec.params["modalities"]


def test_image_gen_is_the_composite_banana_then_gpt_image(config: Config) -> None:
    """image-gen is a composite route nano-banana → gpt-image, with its members' image input and output."""
    spec = config.models["image-gen"]
    assert spec.route == ("nano-banana", "gpt-image")
    assert spec.backend is None and spec.model is None
    rules = rules_of(config, "image-gen")
    assert "image" in rules.input and "image" in rules.output


def test_a_local_text_only_alias_exists(config: Config) -> None:
    """At least one local alias takes text only, so the modality rules have something to refuse."""
    text_only_local = [
        alias
        for alias in config.models
        if is_local(config, alias) and rules_of(config, alias).input == frozenset({"text"})
    ]
    assert text_only_local
