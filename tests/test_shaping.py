"""Unit tests of ``shaping.upstream_body``: the request each target gets, from the alias's entry."""

from __future__ import annotations

import copy
from typing import Any

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.config import parse_config
from gateway.shaping import upstream_body
from gateway.snapshot import Target, build_snapshot
from strategies import IDENTIFIERS, JSON_LEAVES

BASE = {"model": "alias", "messages": [{"role": "user", "content": "hi"}]}


def target(keys: str = "") -> Target:
    toml = f'[backends.b]\nbase_url = "http://127.0.0.1:9/v1"\n[models.alias]\nbackend = "b"\nmodel = "up/model-1"\n{keys}\n'
    return build_snapshot(parse_config(toml.encode()), environ={}).lookup("alias").targets[0]


def shaped(body: dict[str, Any], keys: str = "") -> dict[str, Any]:
    before = copy.deepcopy(body)
    out: dict[str, Any] = msgspec.json.decode(upstream_body(body, target(keys)))
    assert body == before, "shaping changed the client's body"
    return out


def test_model_becomes_the_backends_id_and_the_rest_passes() -> None:
    """`model` is the upstream id; messages and unknown fields pass untouched."""
    out = shaped({**BASE, "top_k": 3, "provider": {"order": ["x"]}, "temperature": None})
    assert out == {**BASE, "model": "up/model-1", "top_k": 3, "provider": {"order": ["x"]}, "temperature": None}


def test_rename_moves_a_field_to_the_providers_name() -> None:
    """max_tokens is sent as max_completion_tokens for an alias that renames it."""
    out = shaped({**BASE, "max_tokens": 300}, 'rename = { max_tokens = "max_completion_tokens" }')
    assert out["max_completion_tokens"] == 300 and "max_tokens" not in out


def test_rename_keeps_the_clients_own_value_under_the_providers_name() -> None:
    """When the client sent both names, its value under the provider's name wins; the other is dropped."""
    out = shaped({**BASE, "max_tokens": 300, "max_completion_tokens": 500}, 'rename = { max_tokens = "max_completion_tokens" }')
    assert out["max_completion_tokens"] == 500 and "max_tokens" not in out


def test_renames_apply_at_once_so_a_swap_works() -> None:
    """Renaming a to b and b to a swaps their values."""
    out = shaped({**BASE, "a": 1, "b": 2}, 'rename = { a = "b", b = "a" }')
    assert (out["a"], out["b"]) == (2, 1)


def test_params_fill_what_the_client_did_not_set() -> None:
    """params are added when the field is absent or null, and never override the client's value."""
    keys = 'params = { modalities = ["image", "text"], temperature = 0.2 }'
    assert shaped(BASE, keys)["modalities"] == ["image", "text"]
    assert shaped({**BASE, "modalities": None}, keys)["modalities"] == ["image", "text"]
    out = shaped({**BASE, "modalities": ["text"], "temperature": 1.0}, keys)
    assert (out["modalities"], out["temperature"]) == (["text"], 1.0)


def test_params_tables_merge_key_by_key_into_the_clients_object() -> None:
    """A params table fills the client's object key by key; the client's keys win."""
    keys = 'params = { provider = { order = ["a"], allow_fallbacks = false, sort = { by = "price" } } }'
    out = shaped({**BASE, "provider": {"allow_fallbacks": True, "sort": {"partition": "model"}}}, keys)
    assert out["provider"] == {"allow_fallbacks": True, "order": ["a"], "sort": {"partition": "model", "by": "price"}}


def test_a_param_under_a_renamed_name_lands_under_the_providers_name() -> None:
    """params written with the client's name follow the alias's rename."""
    out = shaped(BASE, 'rename = { max_tokens = "max_completion_tokens" }\nparams = { max_tokens = 64 }')
    assert out["max_completion_tokens"] == 64 and "max_tokens" not in out


@pytest.mark.parametrize(
    ("extra", "gone"),
    [
        ({"tools": [], "tool_choice": "auto", "parallel_tool_calls": True}, ("tools", "tool_choice", "parallel_tool_calls")),
        ({"tools": None, "tool_choice": None}, ("tools", "tool_choice")),
        ({"tool_choice": "none"}, ("tool_choice",)),
        ({"functions": [], "function_call": "auto"}, ("functions", "function_call")),
        ({"response_format": None}, ("response_format",)),
    ],
)
def test_what_providers_refuse_without_tools_is_dropped(extra: dict[str, Any], gone: tuple[str, ...]) -> None:
    """Empty or null tools, their companions left without tools, and non-nullable nulls are not sent."""
    out = shaped({**BASE, **extra})
    assert not set(gone) & set(out)


def test_an_integer_fields_integral_float_goes_up_as_an_integer() -> None:
    """200.0 passes as a JSON Schema integer; providers that refuse a decimal point there get 200."""
    body = upstream_body({**BASE, "max_tokens": 200.0, "n": 1.0, "seed": 7, "temperature": 1.0}, target())
    assert b'"max_tokens":200,' in body and b'"n":1,' in body and b'"seed":7' in body and b'"temperature":1.0' in body
    renamed = upstream_body({**BASE, "max_tokens": 300.0}, target('rename = { max_tokens = "max_completion_tokens" }'))
    assert b'"max_completion_tokens":300}' in renamed


def test_tools_with_their_choice_are_kept() -> None:
    """Non-empty tools travel with tool_choice and parallel_tool_calls."""
    tools = [{"type": "function", "function": {"name": "f"}}]
    out = shaped({**BASE, "tools": tools, "tool_choice": "required", "parallel_tool_calls": False})
    assert (out["tools"], out["tool_choice"], out["parallel_tool_calls"]) == (tools, "required", False)


@given(st.dictionaries(IDENTIFIERS.filter(lambda k: k not in ("model", "messages")), JSON_LEAVES, max_size=5))
def test_fields_the_alias_does_not_shape_pass_untouched(extra: dict[str, Any]) -> None:
    """Any field no rule of the alias names reaches the upstream as the client sent it."""
    shaping_fields = {"tools", "tool_choice", "parallel_tool_calls", "functions", "function_call", "response_format"}
    out = shaped({**BASE, **extra})
    for key, value in extra.items():
        if key not in shaping_fields:
            assert out[key] == value
