"""models.toml bytes → structured, cross-checked ``Config``, or every problem at once.

How it works:
1. Decode UTF-8 and parse with tomllib (a syntax error is one issue with its line).
2. Structure each section, each backend and each alias on its own with one strict
   cattrs converter, so one bad alias does not hide the problems of the next.
   cattrs' error groups are walked into ``ConfigIssue(path, message)``.
3. Check what types cannot say: positive numbers, known modalities, references
   between aliases and backends, exactly one of backend+model or route, cycles,
   composites declaring only what their members have.
4. Give every issue the line of its path (or of the nearest enclosing key) and
   raise ``ConfigError`` with all of them, in file order.
"""

from __future__ import annotations

import difflib
import json
import re
import tomllib
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

import attrs
import cattrs
from cattrs.errors import ClassValidationError, ForbiddenExtraKeysError, IterableValidationError

from gateway.config.model import (
    MODALITIES,
    OUTPUT_MODALITIES,
    AliasSpec,
    AuthConfig,
    Backend,
    Config,
    Defaults,
    LimitsConfig,
    RoutingConfig,
    ServerConfig,
)

ConfigPath = tuple[str | int, ...]
T = TypeVar("T")

SECTIONS: Mapping[str, type] = {
    "defaults": Defaults,
    "server": ServerConfig,
    "routing": RoutingConfig,
    "auth": AuthConfig,
    "limits": LimitsConfig,
}
TABLES_OF_ENTRIES: Mapping[str, type] = {"backends": Backend, "models": AliasSpec}
BARE_KEY = re.compile(r"[A-Za-z0-9_]+")


def render_path(path: ConfigPath) -> str:
    """``("models", "image-gen", "route", 1)`` → ``models."image-gen".route[1]``."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            key = part if BARE_KEY.fullmatch(part) else json.dumps(part)
            out += f".{key}" if out else key
    return out or "(file)"


@attrs.frozen
class ConfigIssue:
    """One problem in the file: where (table path, line) and what."""

    path: ConfigPath
    message: str
    line: int | None = None

    def render(self, source: str) -> str:
        where = f"{source}:{self.line}" if self.line else source
        return f"{where}: {render_path(self.path)}: {self.message}"


class ConfigError(Exception):
    """The file cannot be used; ``issues`` lists every problem found in one pass."""

    def __init__(self, source: str, issues: Iterable[ConfigIssue]) -> None:
        self.source = source
        self.issues = tuple(sorted(issues, key=lambda i: (i.line or 0, render_path(i.path))))
        super().__init__(self.render())

    def render(self) -> str:
        return "\n".join(issue.render(self.source) for issue in self.issues)


# ---------------------------------------------------------------- strict structuring


def _describe(value: Any) -> str:
    text = json.dumps(value, default=str) if not isinstance(value, dict) else "a table"
    return text if len(text) <= 60 else text[:57] + "..."


def _strict(kind: type[T], name: str, accept: tuple[type, ...]) -> Any:
    # bool is an int subclass: `true` must not pass as 1, nor 1 as a number of seconds for a flag.
    def hook(value: Any, _: Any) -> T:
        if type(value) not in accept:
            raise TypeError(f"expected {name}, got {_describe(value)}")
        return kind(value)  # type: ignore[call-arg]

    return hook


def make_converter() -> cattrs.Converter:
    """The one converter: unknown keys are errors and nothing is coerced."""
    converter = cattrs.Converter(forbid_extra_keys=True, detailed_validation=True)
    converter.register_structure_hook(int, _strict(int, "an integer", (int,)))
    converter.register_structure_hook(float, _strict(float, "a number", (int, float)))
    converter.register_structure_hook(str, _strict(str, "a string", (str,)))
    converter.register_structure_hook(bool, _strict(bool, "true or false", (bool,)))
    return converter


CONVERTER = make_converter()


def _field_names(cls: type) -> list[str]:
    return [f.name for f in attrs.fields(cls)]


def _unknown_key_message(key: str, known: list[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else f"; known keys: {', '.join(known)}"
    return f"unknown key {key!r}{hint}"


def _step(exc: BaseException) -> ConfigPath:
    for note in getattr(exc, "__notes__", ()):
        if hasattr(note, "name"):
            return (note.name,)
        if hasattr(note, "index"):
            return (note.index,)
    return ()


def _issues_from(exc: BaseException, path: ConfigPath) -> Iterator[ConfigIssue]:
    if isinstance(exc, ForbiddenExtraKeysError):
        known = _field_names(exc.cl)
        for key in sorted(exc.extra_fields):
            yield ConfigIssue(path + (key,), _unknown_key_message(key, known))
    elif isinstance(exc, (ClassValidationError, IterableValidationError)):
        for sub in exc.exceptions:
            yield from _issues_from(sub, path + _step(sub))
    elif isinstance(exc, KeyError):
        yield ConfigIssue(path, "missing: this key is required")
    elif isinstance(exc, TypeError) and str(exc).startswith("expected "):
        yield ConfigIssue(path, str(exc))
    else:
        # A non-table where a table belongs, a string where a list belongs, ...
        yield ConfigIssue(path, f"wrong type: {exc}")


def _structure(raw: Any, cls: type[T], path: ConfigPath, issues: list[ConfigIssue]) -> T | None:
    if not isinstance(raw, dict):
        issues.append(ConfigIssue(path, f"expected a table, got {_describe(raw)}"))
        return None
    try:
        value = CONVERTER.structure(raw, cls)
    except Exception as exc:  # cattrs raises groups and plain errors alike
        issues.extend(_issues_from(exc, path))
        return None
    issues.extend(_check_positive(value, path))
    return value


def _check_positive(value: Any, path: ConfigPath) -> Iterator[ConfigIssue]:
    for field in attrs.fields(type(value)):
        number = getattr(value, field.name)
        if field.metadata.get("positive") and number is not None and number <= 0:
            yield ConfigIssue(path + (field.name,), f"must be a positive number, got {_describe(number)}")


# ---------------------------------------------------------------- cross-checks


def _unknown_name_message(kind: str, name: str, known: Iterable[str]) -> str:
    known = sorted(known)
    close = difflib.get_close_matches(name, known, n=3)
    hint = f"did you mean {', '.join(repr(c) for c in close)}?" if close else f"known: {', '.join(known) or 'none'}"
    return f"unknown {kind} {name!r}; {hint}"


def _check_alias_shape(name: str, spec: AliasSpec, backends: Mapping[str, Any]) -> Iterator[ConfigIssue]:
    at: ConfigPath = ("models", name)
    if spec.route is not None:
        if spec.backend is not None or spec.model is not None:
            yield ConfigIssue(at + ("route",), "an alias has either backend + model or route, not both")
        if not spec.route:
            yield ConfigIssue(at + ("route",), "a route names at least one alias")
        return
    if spec.backend is None and spec.model is None:
        yield ConfigIssue(at, "an alias needs backend + model (a target) or route (a composite)")
        return
    if spec.backend is None:
        yield ConfigIssue(at + ("backend",), "missing: name the backend that serves this model")
    elif spec.backend not in backends:
        yield ConfigIssue(at + ("backend",), _unknown_name_message("backend", spec.backend, backends))
    if spec.model is None:
        yield ConfigIssue(at + ("model",), "missing: the model id the backend knows")


def _check_modalities(name: str, spec: AliasSpec) -> Iterator[ConfigIssue]:
    for key, allowed in (("input", MODALITIES), ("output", OUTPUT_MODALITIES)):
        for i, modality in enumerate(getattr(spec, key) or ()):
            if modality not in allowed:
                yield ConfigIssue(("models", name, key, i), f"unknown modality {modality!r}; one of {', '.join(allowed)}")
    if spec.cold_latency_s is not None and (
        not 1 <= len(spec.cold_latency_s) <= 2 or list(spec.cold_latency_s) != sorted(spec.cold_latency_s)
    ):
        yield ConfigIssue(("models", name, "cold_latency_s"), "expected [seconds] or [low, high] with low <= high")


def _members(spec: AliasSpec) -> Iterator[tuple[str, int, str]]:
    for i, member in enumerate(spec.route or ()):
        yield "route", i, member
    for i, member in enumerate(spec.fallback):
        yield "fallback", i, member


def _check_references(models: Mapping[str, AliasSpec], all_names: set[str]) -> Iterator[ConfigIssue]:
    for name, spec in models.items():
        for key, i, member in _members(spec):
            if member not in all_names:
                yield ConfigIssue(("models", name, key, i), _unknown_name_message("alias", member, all_names))


def _check_cycles(models: Mapping[str, AliasSpec]) -> Iterator[ConfigIssue]:
    """Depth-first search; each back edge is reported once, at the key that closes the cycle."""
    done: set[str] = set()
    reported: set[frozenset[str]] = set()

    def visit(name: str, trail: list[str]) -> Iterator[ConfigIssue]:
        spec = models[name]
        for key, i, member in _members(spec):
            if member not in models:
                continue
            if member in trail:
                cycle = trail[trail.index(member) :] + [name]
                if frozenset(cycle) not in reported:
                    reported.add(frozenset(cycle))
                    shown = " → ".join([*cycle, member])
                    yield ConfigIssue(("models", name, key, i), f"cycle through route/fallback: {shown}")
            elif member not in done:
                yield from visit(member, [*trail, name])
        done.add(name)

    for name in models:
        if name not in done:
            yield from visit(name, [])


def effective_modalities(models: Mapping[str, AliasSpec], name: str, key: str, seen: frozenset[str] = frozenset()) -> tuple[str, ...]:
    """An alias's input or output modalities: declared, or for a composite the union of its members'."""
    spec = models[name]
    declared = getattr(spec, key)
    if declared is not None:
        return tuple(declared)
    if spec.route is None:
        return ("text",)
    union: list[str] = []
    for member in spec.route:
        if member in models and member not in seen:
            for modality in effective_modalities(models, member, key, seen | {name}):
                if modality not in union:
                    union.append(modality)
    return tuple(union) or ("text",)


def _check_composite_capabilities(models: Mapping[str, AliasSpec]) -> Iterator[ConfigIssue]:
    for name, spec in models.items():
        if not spec.route or any(m not in models for m in spec.route):
            continue
        for key in ("input", "output"):
            had = {m for member in spec.route for m in effective_modalities(models, member, key, frozenset({name}))}
            for i, modality in enumerate(getattr(spec, key) or ()):
                if modality not in had:
                    yield ConfigIssue(
                        ("models", name, key, i),
                        f"no member of the route has {key} {modality!r} (members: {', '.join(spec.route)})",
                    )
        for flag in ("streaming", "tools", "structured_output", "thinking"):
            if getattr(spec, flag) is True and all(getattr(models[m], flag) is False for m in spec.route):
                yield ConfigIssue(("models", name, flag), f"declared true, but every member of the route declares {flag} = false")


# ---------------------------------------------------------------- line locator


def _table_path(header: str) -> ConfigPath | None:
    try:
        node: Any = tomllib.loads(header)
    except tomllib.TOMLDecodeError:
        return None
    path: list[str | int] = []
    while isinstance(node, dict) and len(node) == 1:
        key, node = next(iter(node.items()))
        path.append(key)
        if isinstance(node, list):  # [[array.of.tables]]
            node = node[-1] if node else {}
    return tuple(path)


KEY_LINE = re.compile(r"""^\s*((?:[A-Za-z0-9_-]+|"[^"]*"|'[^']*')(?:\s*\.\s*(?:[A-Za-z0-9_-]+|"[^"]*"|'[^']*'))*)\s*=""")


def locate_lines(text: str) -> dict[ConfigPath, int]:
    """Map each table and key path of the file to the line where it is written."""
    lines: dict[ConfigPath, int] = {}
    table: ConfigPath = ()
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if stripped.startswith("["):
            found = _table_path(stripped.split("#", 1)[0] if '"' not in stripped else stripped)
            if found is None:
                found = _table_path(stripped.split("#", 1)[0])
            if found is not None:
                table = found
                lines.setdefault(table, number)
            continue
        match = KEY_LINE.match(line)
        if match:
            key_path = _table_path(f"[{match.group(1)}]")
            if key_path:
                lines.setdefault(table + key_path, number)
    return lines


def _with_lines(issues: Iterable[ConfigIssue], lines: Mapping[ConfigPath, int]) -> Iterator[ConfigIssue]:
    for issue in issues:
        path = issue.path
        while path and path not in lines:
            path = path[:-1]
        yield attrs.evolve(issue, line=lines.get(path)) if path else issue


# ---------------------------------------------------------------- entry points

SYNTAX_LINE = re.compile(r"at line (\d+)")


def parse_config(data: bytes, source: str = "models.toml") -> Config:
    """Parse, structure and check the bytes of a models.toml; raise ``ConfigError`` with every issue."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(source, [ConfigIssue((), f"not UTF-8 text: {exc.reason} at byte {exc.start}")]) from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        found = SYNTAX_LINE.search(str(exc))
        line = int(found.group(1)) if found else None
        raise ConfigError(source, [ConfigIssue((), f"TOML syntax error: {exc}", line)]) from None

    issues: list[ConfigIssue] = []
    sections: dict[str, Any] = {}
    known_tables = [*SECTIONS, *TABLES_OF_ENTRIES]
    for key, value in raw.items():
        if key in SECTIONS:
            sections[key] = _structure(value, SECTIONS[key], (key,), issues)
        elif key not in TABLES_OF_ENTRIES:
            issues.append(ConfigIssue((key,), _unknown_key_message(key, known_tables).replace("key", "table", 1)))

    entries: dict[str, dict[str, Any]] = {}
    raw_names: dict[str, set[str]] = {}
    for table, cls in TABLES_OF_ENTRIES.items():
        value = raw.get(table, {})
        entries[table] = {}
        if not isinstance(value, dict):
            issues.append(ConfigIssue((table,), f"expected a table, got {_describe(value)}"))
            value = {}
        raw_names[table] = set(value)
        for name, entry in value.items():
            structured = _structure(entry, cls, (table, name), issues)
            if structured is not None:
                entries[table][name] = structured

    models: dict[str, AliasSpec] = entries["models"]
    for name, spec in models.items():
        issues.extend(_check_alias_shape(name, spec, raw_names["backends"]))
        issues.extend(_check_modalities(name, spec))
    # Names that failed to structure still exist: do not report them as dangling too.
    issues.extend(_check_references(models, raw_names["models"]))
    issues.extend(_check_cycles(models))
    if not any(i.message.startswith("cycle") for i in issues):
        issues.extend(_check_composite_capabilities(models))
    if not raw_names["models"]:
        issues.append(ConfigIssue(("models",), "no aliases: add at least one [models.\"ALIAS\"] table"))

    if issues:
        raise ConfigError(source, _with_lines(issues, locate_lines(text)))
    present = {key: value for key, value in sections.items() if value is not None}
    return Config(backends=entries["backends"], models=models, **present)


def load_config(path: str | Path) -> Config:
    """Read and parse a models.toml file; unreadable files are a ``ConfigError`` too."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(str(path), [ConfigIssue((), f"cannot read the file: {exc.strerror or exc}")]) from None
    return parse_config(data, str(path))
