"""Hypothesis strategies: valid models.toml documents, and requests built to satisfy an alias.

Documents are generated from the config model itself (``gateway.config.model``):
every attrs field of a section, backend or alias gets a strategy derived from its
type and metadata (``positive``), so a key added to the model is generated without
touching this file. Only keys whose valid values depend on the rest of the file
(backend, route, fallback, modalities, limits, capabilities, params, rename) are
drawn by hand here, following the loader's rules:
1. references (route, fallback) point only to aliases written later in the file,
   as in the shipped models.toml's fallbacks, so there are no cycles;
2. a composite declares only modalities, capabilities and limits a member has;
3. ``min_max_tokens`` <= ``max_output_tokens``; image limits stay small, so a
   request can break them cheaply.

``request_for(rules)`` builds a Chat Completions body that satisfies an alias's
compiled rules; tests inject exactly one violation into it (``test_rule_properties``).
"""

from __future__ import annotations

import base64
import types
from collections.abc import Mapping
from typing import Any, Union, get_args, get_origin, get_type_hints

import attrs
from hypothesis import strategies as st

from gateway.config.load import GATEWAY_HEADERS
from gateway.config.model import (
    MODALITIES,
    OUTPUT_MODALITIES,
    AliasSpec,
    Backend,
    Defaults,
    RoutingConfig,
    ServerConfig,
)
from gateway.rules import CAPABILITIES, AliasRules

Document = dict[str, Any]
Draw = Any  # hypothesis' draw function

# ---------------------------------------------------------------- leaves

NAMES = st.from_regex(r"\A[a-z][a-z0-9]{0,6}(?:[.-][a-z0-9]{1,4}){0,2}\Z")
IDENTIFIERS = st.from_regex(r"\A[a-z][a-z0-9_]{0,10}\Z")
TEXT = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=24)
# What a header value may hold (load.HEADER_VALUE): tab, visible ASCII and space, Latin-1's upper half.
HEADER_VALUES = st.text(st.characters(codec="latin-1", exclude_categories=("Cc",)) | st.just("\t"), max_size=24)
JSON_LEAVES = st.none() | st.booleans() | st.integers(-(10**6), 10**6) | TEXT
TOML_LEAVES = st.booleans() | st.integers(-(10**6), 10**6) | st.floats(-1e6, 1e6, allow_nan=False) | TEXT
TOML_VALUES = st.recursive(
    TOML_LEAVES,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(IDENTIFIERS, inner, max_size=3),
    max_leaves=6,
)


def _positive_float() -> st.SearchStrategy[float]:
    return st.floats(0.001, 10_000.0, allow_nan=False, allow_infinity=False)


def strategy_for_type(kind: Any, *, positive: bool) -> st.SearchStrategy[Any]:
    """A strategy for one config field's type; ``None`` stands for "key absent"."""
    origin, args = get_origin(kind), get_args(kind)
    if origin in (Union, types.UnionType) and type(None) in args:
        (inner,) = [arg for arg in args if arg is not type(None)]
        return st.none() | strategy_for_type(inner, positive=positive)
    if kind is bool:
        return st.booleans()
    if kind is int:
        return st.integers(1 if positive else 0, 1_000_000)
    if kind is float:
        return _positive_float() if positive else st.floats(0.0, 10_000.0, allow_nan=False)
    if kind is str:
        return TEXT
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        return st.lists(strategy_for_type(args[0], positive=positive), max_size=3).map(tuple)
    if origin in (Mapping, dict):
        values = TOML_VALUES if args[1] is Any else strategy_for_type(args[1], positive=positive)
        return st.dictionaries(IDENTIFIERS, values, max_size=3)
    raise TypeError(f"tests/strategies.py cannot generate a config value of type {kind!r}; teach strategy_for_type")


def fields_strategy(cls: type, overrides: Mapping[str, st.SearchStrategy[Any]], skip: frozenset[str] = frozenset()) -> st.SearchStrategy[Document]:
    """A TOML table for attrs class ``cls``: every field from its type unless overridden; None drops the key."""
    hints = get_type_hints(cls)
    parts: dict[str, st.SearchStrategy[Any]] = {}
    for field in attrs.fields(cls):
        if field.name in skip:
            continue
        strategy = overrides.get(field.name)
        if strategy is None:
            strategy = strategy_for_type(hints[field.name], positive=bool(field.metadata.get("positive")))
            if field.default is not attrs.NOTHING:
                strategy = st.none() | strategy  # optional keys are sometimes left out
        parts[field.name] = strategy
    return st.fixed_dictionaries(parts).map(lambda table: {k: v for k, v in table.items() if v is not None})


# Fields whose valid values are narrower than their type (the loader's value checks),
# or kept small so a request can break them cheaply.
SMALL_IMAGES = st.none() | st.integers(1, 6)
SMALL_IMAGE_BYTES = st.none() | st.integers(64, 4_096)
# Retries stay below cooldown_failures (3 by default): a target's own failures would cool it first.
RETRIES = st.none() | st.integers(0, 2)
ROUTING_OVERRIDES = {"cooldown_failures": st.none() | st.integers(3, 1_000_000)}
DEFAULTS_OVERRIDES = {"max_images": SMALL_IMAGES, "max_image_bytes": SMALL_IMAGE_BYTES, "retries": RETRIES}
BACKEND_OVERRIDES = {
    "base_url": st.sampled_from(["http://127.0.0.1:8000/v1", "https://api.example.test/v1", "http://[::1]:9/v1/"]),
    "api_key_env": st.none() | st.from_regex(r"\A[A-Z][A-Z0-9_]{0,12}\Z"),
    "headers": st.dictionaries(st.from_regex(r"\A[A-Za-z][A-Za-z0-9-]{0,12}\Z").filter(lambda n: n.lower() not in GATEWAY_HEADERS), HEADER_VALUES, max_size=2),
    "retries": RETRIES,
    "max_queue": st.none() | st.integers(0, 64),
}
# Alias keys drawn by ``_alias`` itself, because they depend on the rest of the file.
ALIAS_STRUCTURAL = frozenset({
    "backend", "model", "route", "fallback", "input", "output",
    "context_window", "max_output_tokens", "min_max_tokens", "max_images", "max_image_bytes",
    *CAPABILITIES, "params", "rename", "cold_latency_s",
})
ALIAS_OVERRIDES = {"retries": RETRIES, "cost_per_mtok_usd": st.none() | st.floats(0.0, 100.0, allow_nan=False)}
RENAMES = {"max_tokens": "max_completion_tokens", "user": "safety_identifier", "seed": "random_seed"}
RESERVED_FIELDS = ("model", "messages", "stream")

# Built once: hypothesis validates a strategy the first time it draws from it.
TABLES: Mapping[str, st.SearchStrategy[Document]] = {
    "defaults": fields_strategy(Defaults, DEFAULTS_OVERRIDES),
    "server": fields_strategy(ServerConfig, {}),
    "routing": fields_strategy(RoutingConfig, ROUTING_OVERRIDES),
    "backend": fields_strategy(Backend, BACKEND_OVERRIDES),
    "alias": fields_strategy(AliasSpec, ALIAS_OVERRIDES, skip=ALIAS_STRUCTURAL),
}
MODEL_IDS = st.from_regex(r"\A[a-z0-9-]{1,10}(?:/[a-z0-9.:-]{1,16})?\Z")
MIN_TOKENS = st.none() | st.integers(1, 500)
CONTEXT_WINDOWS = st.none() | st.integers(1, 3_000)
MAYBE_BOOL = st.none() | st.booleans()
PARAMS = st.dictionaries(IDENTIFIERS.filter(lambda k: k not in RESERVED_FIELDS), TOML_VALUES, max_size=2)
BACKEND_NAMES = st.lists(IDENTIFIERS, min_size=1, max_size=3, unique=True)
LATENCIES = st.none() | st.lists(st.floats(0.0, 500.0, allow_nan=False), min_size=1, max_size=2)


# ---------------------------------------------------------------- documents


def _modalities(draw: Draw, allowed: tuple[str, ...] | list[str]) -> list[str]:
    return draw(st.lists(st.sampled_from(sorted(allowed)), min_size=1, max_size=len(allowed), unique=True))


def _effective(models: Mapping[str, Document], name: str, key: str) -> set[str]:
    entry = models[name]
    if key in entry:
        return set(entry[key])
    if "route" not in entry:
        return {"text"}
    return set().union(*(_effective(models, member, key) for member in entry["route"]))


def _widest(models: Mapping[str, Document], defaults: Document, name: str, key: str) -> int | None:
    entry = models[name]
    if key in entry:
        return int(entry[key])
    if "route" not in entry:
        return defaults.get(key) if key in ("max_images", "max_image_bytes") else None
    limits = [_widest(models, defaults, member, key) for member in entry["route"]]
    return None if None in limits else max(x for x in limits if x is not None)


def _refuses(models: Mapping[str, Document], name: str, capability: str) -> bool:
    """An alias says false, or is a composite all of whose members refuse (references point forward: no cycles)."""
    entry = models[name]
    if capability in entry:
        return entry[capability] is False
    return "route" in entry and all(_refuses(models, m, capability) for m in entry["route"])


def _target_keys(draw: Draw, backends: list[str]) -> Document:
    entry: Document = {"backend": draw(st.sampled_from(backends)), "model": draw(MODEL_IDS)}
    if draw(st.booleans()):
        entry["input"] = _modalities(draw, MODALITIES)
    if draw(st.integers(0, 3)) == 0:
        entry["output"] = _modalities(draw, OUTPUT_MODALITIES)
    low = draw(MIN_TOKENS)
    high = draw(st.none() | st.integers(low or 1, 5_000))
    limits = {
        "min_max_tokens": low,
        "max_output_tokens": high,
        "context_window": draw(CONTEXT_WINDOWS),
        "max_images": draw(SMALL_IMAGES),
        "max_image_bytes": draw(SMALL_IMAGE_BYTES),
    }
    entry.update({k: v for k, v in limits.items() if v is not None})
    for capability in CAPABILITIES:
        declared = draw(MAYBE_BOOL)
        if declared is not None:
            entry[capability] = declared
    params = draw(PARAMS)
    if params:
        entry["params"] = params
    renamed = draw(st.lists(st.sampled_from(sorted(RENAMES)), unique=True, max_size=2))
    if renamed:
        entry["rename"] = {old: RENAMES[old] for old in renamed}
    return entry


def _composite_keys(draw: Draw, models: Mapping[str, Document], defaults: Document) -> Document:
    route = draw(st.lists(st.sampled_from(sorted(models)), min_size=1, max_size=3, unique=True))
    entry: Document = {"route": route}
    # Declared modalities, capabilities and limits: only what a member has (loader rule).
    for key in ("input", "output"):
        had = set().union(*(_effective(models, m, key) for m in route))
        if draw(st.integers(0, 3)) == 0:
            entry[key] = _modalities(draw, sorted(had))
    for capability in CAPABILITIES:
        declared = draw(MAYBE_BOOL)
        if declared is True and all(_refuses(models, m, capability) for m in route):
            declared = None
        if declared is not None:
            entry[capability] = declared
    for key in ("context_window", "max_output_tokens", "max_images", "max_image_bytes"):
        if draw(st.integers(0, 4)) == 0:
            widest = [_widest(models, defaults, m, key) for m in route]
            most = None if None in widest else max(x for x in widest if x is not None)
            least = 64 if key == "max_image_bytes" else 1
            entry[key] = draw(st.integers(least, max(least, most or 10_000)))
    return entry


@st.composite
def config_documents(draw: Draw, max_aliases: int = 6) -> Document:
    """A valid models.toml document as the dict ``tomllib`` would read."""
    doc: Document = {}
    defaults = draw(TABLES["defaults"])
    for key in ("defaults", "server", "routing"):
        value = defaults if key == "defaults" else draw(TABLES[key])
        if value or draw(st.booleans()):
            doc[key] = value
    backend_names = draw(BACKEND_NAMES)
    doc["backends"] = {name: draw(TABLES["backend"]) for name in backend_names}

    names = draw(st.lists(NAMES, min_size=1, max_size=max_aliases, unique=True))
    later: dict[str, Document] = {}  # built last to first: an alias references only later ones
    for i in reversed(range(len(names))):
        entry = draw(TABLES["alias"])
        if later and draw(st.integers(0, 2)) == 0:
            entry.update(_composite_keys(draw, later, defaults))
        else:
            entry.update(_target_keys(draw, backend_names))
        if later and draw(st.booleans()):
            entry["fallback"] = draw(st.lists(st.sampled_from(sorted(later)), max_size=2, unique=True))
        latency = draw(LATENCIES)
        if latency is not None:
            entry["cold_latency_s"] = sorted(latency)
        later[names[i]] = entry
    models = {name: later[name] for name in names}
    doc["models"] = models
    return doc


def document_of(config: Any) -> Document:
    """A loaded ``Config`` back as a TOML document (absent keys stay absent)."""
    return attrs.asdict(config, filter=lambda _, value: value is not None)  # type: ignore[no-any-return]


# ---------------------------------------------------------------- requests

IMAGE_MAGIC = {
    "jpeg": b"\xff\xd8\xff\xe0",
    "png": b"\x89PNG\r\n\x1a\n",
    "gif": b"GIF89a",
    "webp": b"RIFF\x24\x00\x00\x00WEBPVP8 ",
}


def image_uri(kind: str, size: int) -> str:
    """A data URI of ``size`` decoded bytes whose first bytes are a ``kind`` image's."""
    data = (IMAGE_MAGIC[kind] + bytes(size))[:size]
    return f"data:image/{kind};base64," + base64.b64encode(data).decode("ascii")


def image_part(kind: str = "png", size: int = 32) -> Document:
    return {"type": "image_url", "image_url": {"url": image_uri(kind, size), "detail": "auto"}}


MODAL_PARTS: Mapping[str, Document] = {
    "audio": {"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}},
    "video": {"type": "video_url", "video_url": {"url": "data:video/mp4;base64,AAAAIGZ0eXA="}},
    "file": {"type": "file", "file": {"file_data": "data:application/pdf;base64,JVBERi0=", "filename": "a.pdf"}},
}


def part_of(modality: str) -> Document:
    """A valid content part carrying ``modality``."""
    if modality == "image":
        return image_part()
    return _copy(MODAL_PARTS[modality])


def _copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return value


@attrs.frozen
class Allowed:
    """What a request may use to pass an alias: its own rules met with its first member's, down the route."""

    input: frozenset[str]
    output: frozenset[str]
    min_tokens: int | None
    max_tokens: int | None
    max_chars: int | None
    max_images: int | None
    max_image_bytes: int | None
    capabilities: frozenset[str]


def _tighter(a: int | None, b: int | None, pick: Any) -> int | None:
    return b if a is None else a if b is None else pick(a, b)


def allowed_by(rules: AliasRules) -> Allowed:
    """The envelope a request must stay inside to be accepted by ``rules`` (via its first member)."""
    own = Allowed(
        input=rules.input,
        output=rules.output,
        min_tokens=rules.min_max_tokens,
        max_tokens=rules.max_output_tokens,
        max_chars=rules.context_window * 256 if rules.context_window is not None else None,
        max_images=rules.max_images,
        max_image_bytes=rules.max_image_bytes,
        capabilities=frozenset(c for c in CAPABILITIES if getattr(rules, c) is not False),
    )
    if not rules.members:
        return own
    first = allowed_by(rules.members[0])
    return Allowed(
        input=own.input & first.input,
        output=own.output & first.output,
        min_tokens=_tighter(own.min_tokens, first.min_tokens, max),
        max_tokens=_tighter(own.max_tokens, first.max_tokens, min),
        max_chars=_tighter(own.max_chars, first.max_chars, min),
        max_images=_tighter(own.max_images, first.max_images, min),
        max_image_bytes=_tighter(own.max_image_bytes, first.max_image_bytes, min),
        capabilities=own.capabilities & first.capabilities,
    )


NULLABLE_EXTRAS = ("temperature", "top_p", "n", "seed", "stop", "logprobs", "user", "metadata", "stream_options")
EXTRA_VALUES: Mapping[str, st.SearchStrategy[Any]] = {
    "temperature": st.floats(0, 2),
    "top_p": st.floats(0, 1),
    "n": st.integers(1, 4),
    "seed": st.integers(-(2**40), 2**40),
    "stop": st.text(max_size=4) | st.lists(st.text(max_size=4), min_size=1, max_size=4),
    "logprobs": st.booleans(),
    "user": st.text(max_size=8),
    "metadata": st.dictionaries(IDENTIFIERS, st.text(max_size=8), max_size=2),
    "stream_options": st.just({"include_usage": True}),
}


@st.composite
def request_for(draw: Draw, alias: str, rules: AliasRules) -> Document:
    """A Chat Completions body that ``rules`` accept: every part, field and size inside its envelope."""
    allowed = allowed_by(rules)
    smallest_image = len(IMAGE_MAGIC["webp"])
    no_images = allowed.max_images == 0 or (allowed.max_image_bytes or smallest_image) < smallest_image
    modal = sorted(m for m in allowed.input if m != "text" and (m != "image" or not no_images))
    images_left = min(allowed.max_images if allowed.max_images is not None else 3, 3)
    image_bytes = min(allowed.max_image_bytes or 2_048, 2_048)
    chars_left = allowed.max_chars if allowed.max_chars is not None else 10_000

    def text(limit: int = 40) -> str:
        nonlocal chars_left
        value: str = draw(st.text(max_size=min(limit, chars_left)))
        chars_left -= len(value)
        return value

    messages: list[Document] = []
    if draw(st.booleans()):
        messages.append({"role": draw(st.sampled_from(["system", "developer"])), "content": text()})
    for _ in range(draw(st.integers(1, 3))):
        parts: list[Document] = [{"type": "text", "text": text()}]
        for modality in draw(st.lists(st.sampled_from(modal), max_size=3)) if modal else []:
            if modality == "image":
                if images_left == 0:
                    continue
                images_left -= 1
                kind = draw(st.sampled_from(sorted(IMAGE_MAGIC)))
                parts.append(image_part(kind, draw(st.integers(smallest_image, image_bytes))))
            else:
                parts.append(part_of(modality))
        content: Any = text() if draw(st.booleans()) and len(parts) == 1 else draw(st.permutations(parts))
        messages.append({"role": "user", "content": content})
        if draw(st.booleans()):
            messages.append({"role": "assistant", "content": text()})
    if draw(st.booleans()):
        call = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
        messages += [
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "call_1", "content": text()},
        ]

    body: Document = {"model": alias, "messages": messages}
    low, high = allowed.min_tokens or 1, allowed.max_tokens or 100_000
    for field in ("max_tokens", "max_completion_tokens"):
        # A composite may narrow below its first member's minimum: then only "absent" passes both.
        choice = draw(st.sampled_from(["absent", "null", "value"] if low <= high else ["absent", "null"]))
        if choice == "null":
            body[field] = None
        elif choice == "value":
            body[field] = draw(st.integers(low, high))
    if "streaming" in allowed.capabilities:
        stream = draw(st.sampled_from([None, False, True, "absent"]))
    else:
        stream = draw(st.sampled_from([None, False, "absent"]))
    if stream != "absent":
        body["stream"] = stream
    if "tools" in allowed.capabilities and draw(st.booleans()):
        body["tools"] = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
        body["tool_choice"] = draw(st.sampled_from(["auto", "none", "required"]))
    elif draw(st.booleans()):
        body["tools"] = draw(st.sampled_from([[], None]))
    if "structured_output" in allowed.capabilities and draw(st.booleans()):
        body["response_format"] = {"type": "json_object"}
    elif draw(st.booleans()):
        body["response_format"] = {"type": "text"}
    if "thinking" in allowed.capabilities and draw(st.booleans()):
        body["reasoning_effort"] = draw(st.sampled_from(["low", "medium", "high"]))
    elif draw(st.booleans()):
        body["reasoning_effort"] = draw(st.sampled_from(["none", None]))
    if draw(st.booleans()):
        body["modalities"] = ["text", *sorted(allowed.output - {"text"})]
    for field in draw(st.lists(st.sampled_from(NULLABLE_EXTRAS), unique=True, max_size=4)):
        body[field] = draw(st.none() | EXTRA_VALUES[field])
    if draw(st.booleans()):
        body["x_provider_extra"] = draw(JSON_LEAVES)  # unknown fields pass through
    return body


def resolve_pointer(body: Any, pointer: str) -> Any:
    """The value an RFC 6901 pointer names in ``body``; KeyError/IndexError when it names nothing."""
    node = body
    if pointer == "":
        return node
    assert pointer.startswith("/"), pointer
    for token in pointer[1:].split("/"):
        token = token.replace("~1", "/").replace("~0", "~")
        if isinstance(node, list):
            if not token.isdigit():
                raise KeyError(token)
            node = node[int(token)]
        elif isinstance(node, dict):
            node = node[token]
        else:
            raise KeyError(token)
    return node


def resolve_param(body: Any, param: str) -> Any:
    """The value a seed-style ``param`` (``messages[0].content[1].image_url.url``) names in ``body``."""
    node = body
    for name, indexes in _param_steps(param):
        node = node[name]
        for index in indexes:
            if not isinstance(node, list):
                raise KeyError(index)
            node = node[index]
    return node


def _param_steps(param: str) -> list[tuple[str, list[int]]]:
    steps = []
    for segment in param.split("."):
        name, _, rest = segment.partition("[")
        indexes = [int(i) for i in rest.rstrip("]").split("][")] if rest else []
        steps.append((name, indexes))
    return steps
