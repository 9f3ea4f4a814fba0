"""Property tests of the config schema: generated models.toml documents load, round-trip and
compile; corrupting one leaf gives an issue at exactly that leaf.

The documents come from ``strategies.config_documents``, which derives them from the attrs
config model, so a key added to the model is covered here without a new test.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import tomli_w
from hypothesis import given, note
from hypothesis import strategies as st

from gateway.config import Config, ConfigError, parse_config
from gateway.config.load import ConfigPath
from gateway.snapshot import build_snapshot
from strategies import Document, config_documents, document_of

# Tables whose keys are free (any name is valid), and values the loader does not type.
FREE_TABLES = frozenset({"headers", "params", "rename"})


def load(doc: Document) -> Config:
    return parse_config(tomli_w.dumps(doc).encode("utf-8"))


def issues_of(doc: Document) -> list[tuple[ConfigPath, str]]:
    try:
        load(doc)
    except ConfigError as error:
        return [(issue.path, issue.message) for issue in error.issues]
    raise AssertionError("the corrupted document loaded")


def set_at(doc: Document, path: ConfigPath, value: Any) -> None:
    node: Any = doc
    for step in path[:-1]:
        node = node[step]
    node[path[-1]] = value


def get_at(doc: Document, path: ConfigPath) -> Any:
    node: Any = doc
    for step in path:
        node = node[step]
    return node


def leaves(node: Any, path: ConfigPath = ()) -> Iterator[tuple[ConfigPath, Any]]:
    """Every value of the document the loader types: scalars, arrays and their elements, tables."""
    if path:
        yield path, node
    if isinstance(node, dict) and (not path or path[-1] not in ("params",)):
        for key, value in node.items():
            yield from leaves(value, (*path, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from leaves(value, (*path, i))


def wrong_type(value: Any) -> Any:
    """A TOML value of another type than ``value``, and not one the loader would coerce."""
    if isinstance(value, str):
        return 12345
    if isinstance(value, (bool, int, float)):
        return "12"
    return True  # a table or an array


def reachers(models: dict[str, Document], target: str) -> list[str]:
    """The aliases from which ``target`` is reachable through route/fallback, in file order."""
    found: set[str] = set()
    changed = True
    while changed:
        changed = False
        for name, entry in models.items():
            refs = [*entry.get("route", []), *entry.get("fallback", [])]
            if name not in found and any(r == target or r in found for r in refs):
                found.add(name)
                changed = True
    return [name for name in models if name in found]


# ---------------------------------------------------------------- valid documents


@given(config_documents())
def test_generated_documents_load_and_every_alias_compiles(doc: Document) -> None:
    """A generated document loads, and every alias compiles to rules that explain themselves."""
    config = load(doc)
    assert list(config.models) == list(doc["models"])
    snapshot = build_snapshot(config, environ={})
    for name, compiled in snapshot.aliases.items():
        assert compiled.rules.alias == name
        words = dict(compiled.rules.explain())
        assert {"input", "output", "images", "max_tokens", "context", "features"} <= set(words)
        assert compiled.targets, f"{name} has no target"


@given(config_documents())
def test_config_round_trips_through_toml(doc: Document) -> None:
    """Writing a loaded config back to TOML and loading it again gives the same config."""
    config = load(doc)
    again = load(document_of(config))
    assert again == config
    assert document_of(again) == document_of(config)


# ---------------------------------------------------------------- one corrupted leaf


@given(config_documents(), st.data())
def test_a_wrong_type_is_reported_at_its_leaf(doc: Document, data: st.DataObject) -> None:
    """Replacing any typed value by one of another type gives an issue at exactly that path."""
    candidates = [(path, value) for path, value in leaves(doc) if not (len(path) >= 2 and path[-2] in ("params",))]
    path, value = data.draw(st.sampled_from(candidates), label="leaf")
    set_at(doc, path, wrong_type(value))
    found = issues_of(doc)
    note(f"issues: {found}")
    assert path in [where for where, _ in found]


@given(config_documents(), st.data())
def test_an_unknown_key_is_reported_at_its_path(doc: Document, data: st.DataObject) -> None:
    """An unknown key added to any table (a typo) gives an issue naming that key's path."""
    # In [backends] and [models] every key is a name, so a new one is an entry, not a typo.
    entry_tables = [("backends",), ("models",)]
    tables = [()] + [
        path
        for path, value in leaves(doc)
        if isinstance(value, dict) and path[-1] not in FREE_TABLES and path not in entry_tables
    ]
    table = data.draw(st.sampled_from(tables), label="table")
    key = data.draw(st.sampled_from(["max_tokenz", "inputs", "zz_typo", "timeout"]), label="key")
    path = (*table, key)
    get_at(doc, table)[key] = 1
    found = issues_of(doc)
    note(f"issues: {found}")
    assert path in [where for where, _ in found]
    message = dict(found)[path]
    assert "unknown" in message and key in message


@given(config_documents(), st.data())
def test_a_dangling_reference_is_reported_at_its_leaf(doc: Document, data: st.DataObject) -> None:
    """A route, fallback or backend naming nothing that exists gives an issue at that leaf."""
    references = [
        path
        for path, _ in leaves(doc)
        if path[0] == "models" and (path[-1] == "backend" or (len(path) == 4 and path[2] in ("route", "fallback")))
    ]
    if not references:
        name = data.draw(st.sampled_from(sorted(doc["models"])), label="alias")
        doc["models"][name].setdefault("fallback", []).append("placeholder")
        references = [("models", name, "fallback", len(doc["models"][name]["fallback"]) - 1)]
    path = data.draw(st.sampled_from(references), label="leaf")
    set_at(doc, path, "no-such-name")
    found = issues_of(doc)
    note(f"issues: {found}")
    assert path in [where for where, _ in found]
    assert "unknown" in dict(found)[path]


@given(config_documents(), st.data())
def test_a_cycle_is_reported_at_the_reference_that_closes_it(doc: Document, data: st.DataObject) -> None:
    """A reference leading back to the first alias of a cycle (or to itself) is the reported leaf."""
    models = doc["models"]
    closing = data.draw(st.sampled_from(list(models)), label="alias")
    back = reachers(models, closing)
    # The earliest alias that reaches `closing` is where the search enters the cycle first,
    # so the new reference back to it is the one that closes it; with none, a self-loop.
    first = back[0] if back else closing
    entry = models[closing]
    fallback = entry.setdefault("fallback", [])
    if fallback and data.draw(st.booleans(), label="replace"):
        index = data.draw(st.integers(0, len(fallback) - 1), label="index")
        fallback[index] = first
    else:
        index = len(fallback)
        fallback.append(first)
    path = ("models", closing, "fallback", index)
    found = issues_of(copy.deepcopy(doc))
    note(f"issues: {found}")
    assert path in [where for where, _ in found]
    assert "cycle" in dict(found)[path]
