"""models.toml bytes → structured, cross-checked ``Config``, or every problem at once.

How it works:
1. Decode UTF-8 and parse with tomllib (a syntax error is one issue with its line).
2. Structure each section, each backend and each alias on its own with one strict
   cattrs converter, so one bad alias does not hide the problems of the next.
   cattrs' error groups are walked into ``ConfigIssue(path, message)``.
3. Check the values types cannot judge (positive numbers, known modalities) on the
   raw tables, so they are reported even next to a type error in the same entry.
4. Cross-check what spans entries: references between aliases and backends,
   exactly one of backend+model or route, cycles, composites declaring only what
   their members have. An entry with a type error takes part without its bad
   keys, so a typo in one key does not hide a dangling route in another.
5. Give every issue the line of its path (or of the nearest enclosing key) and
   raise ``ConfigError`` with all of them, in file order.
"""

from __future__ import annotations

import difflib
import json
import math
import re
import tomllib
import urllib.parse
from collections.abc import Collection, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar, get_origin

import attrs
import cattrs
from cattrs.errors import ClassValidationError, ForbiddenExtraKeysError, IterableValidationError

from gateway.config.model import (
    BUILTIN_RETRIES,
    MODALITIES,
    OUTPUT_MODALITIES,
    REDIS_SCHEMES,
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
# Numbers where 0 means something (no retries, no queue, free) but a negative one is a typo.
NON_NEGATIVE_FIELDS = frozenset({"retries", "max_queue", "cost_per_mtok_usd"})
# Keys whose problems make the alias's shape unknowable: its shape check is skipped then.
SHAPE_KEYS = frozenset({"backend", "model", "route"})
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# A header's name is an RFC 9110 token; its value holds no CR, LF or other control
# character (one would start another header line) and is Latin-1, as HTTP/1.1 sends it.
HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
HEADER_VALUE = re.compile(r"[\t\x20-\x7e\x80-\xff]*")
# Set by the gateway on every upstream request: a second one from the file would
# contradict it (two Content-Length headers desynchronise a kept-alive connection).
GATEWAY_HEADERS = frozenset(
    {"host", "content-length", "transfer-encoding", "connection", "keep-alive", "te", "trailer", "upgrade", "proxy-connection", "expect"}
    # The body is always JSON, and an answer must come in an encoding the gateway reads.
    | {"content-type", "accept-encoding"}
)


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
        if not self.path:  # the file as a whole: syntax, encoding, unreadable
            return f"{where}: {self.message}"
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
        # TOML has nan and inf; no timeout, limit or price means either.
        if type(value) is float and not math.isfinite(value):
            raise TypeError(f"expected a finite number, got {_describe(value)}")
        return kind(value)  # type: ignore[call-arg]

    return hook


def _shaped(container: type, name: str, inner: Any) -> Any:
    # cattrs would take any iterable: `input = "image"` must not become ("i", "m", "a", "g", "e").
    def hook(value: Any, kind: Any) -> Any:
        if not isinstance(value, container):
            raise TypeError(f"expected {name}, got {_describe(value)}")
        return inner(value, kind)

    return hook


def make_converter() -> cattrs.Converter:
    """The one converter: unknown keys are errors and nothing is coerced."""
    converter = cattrs.Converter(forbid_extra_keys=True, detailed_validation=True)
    converter.register_structure_hook(int, _strict(int, "an integer", (int,)))
    converter.register_structure_hook(float, _strict(float, "a number", (int, float)))
    converter.register_structure_hook(str, _strict(str, "a string", (str,)))
    converter.register_structure_hook(bool, _strict(bool, "true or false", (bool,)))
    # The element hooks are the strict ones above; only the container's own shape is added.
    elements = converter.copy()
    converter.register_structure_hook_factory(
        _is_tuple_type, lambda kind: _shaped(list, "an array", elements.get_structure_hook(kind))
    )
    converter.register_structure_hook_factory(
        _is_mapping_type, lambda kind: _shaped(dict, "a table", elements.get_structure_hook(kind))
    )
    return converter


def _is_tuple_type(kind: Any) -> bool:
    return get_origin(kind) is tuple


def _is_mapping_type(kind: Any) -> bool:
    return get_origin(kind) in (Mapping, dict)


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


def _structure(raw: Any, cls: type[T], path: ConfigPath, issues: list[ConfigIssue]) -> tuple[T | None, frozenset[str]]:
    """Structure one table; report its problems; return it (without its bad keys, if any) and those keys."""
    if not isinstance(raw, dict):
        issues.append(ConfigIssue(path, f"expected a table, got {_describe(raw)}"))
        return None, frozenset()
    issues.extend(_check_values(raw, cls, path))
    try:
        return CONVERTER.structure(raw, cls), frozenset()
    except Exception as exc:  # noqa: BLE001 -- cattrs raises groups and plain errors alike; all are issues
        found = list(_issues_from(exc, path))
    issues.extend(found)
    bad = frozenset(str(issue.path[len(path)]) for issue in found if len(issue.path) > len(path))
    # The entry without its bad keys still takes part in the cross-checks (their
    # problems are reported already); a missing required key leaves nothing to check.
    try:
        return CONVERTER.structure({k: v for k, v in raw.items() if k not in bad}, cls), bad
    except Exception:  # noqa: BLE001 -- already reported above
        return None, bad


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_values(raw: Mapping[str, Any], cls: type, path: ConfigPath) -> Iterator[ConfigIssue]:
    """Value checks on the raw table; a value of the wrong type is left to the converter's report."""
    for field in attrs.fields(cls):
        value = raw.get(field.name)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            continue  # the converter reports a wrong type and a nan or inf
        if field.metadata.get("positive") and value <= 0:
            yield ConfigIssue(path + (field.name,), f"must be a positive number, got {_describe(value)}")
        elif field.name in NON_NEGATIVE_FIELDS and value < 0:
            yield ConfigIssue(path + (field.name,), f"must be 0 or more, got {_describe(value)}")
    if cls is AliasSpec:
        yield from _check_alias_values(raw, path)
    elif cls is Backend:
        yield from _check_backend_values(raw, path)
    elif cls is LimitsConfig and isinstance(raw.get("storage"), str):
        problem = _storage_problem(raw["storage"])
        if problem is not None:
            yield ConfigIssue(path + ("storage",), problem)


def _holds_password(text: str, url: str) -> bool:
    try:
        password = urllib.parse.urlsplit(url).password
    except ValueError:
        return True  # cannot tell: assume it does
    return password is not None and (password in text or urllib.parse.unquote(password) in text)


def _storage_problem(storage: str) -> str | None:
    """What keeps ``storage`` from being ``"memory"`` or a Redis URL the client library can use, or None.

    The value is never shown: a Redis URL may hold its password.
    """
    if storage == "memory":
        return None
    if not storage.startswith(REDIS_SCHEMES):
        return 'expected "memory" or a redis:// (or rediss://) URL such as "redis://127.0.0.1:6379/0" (the value is not shown here)'
    # Imported only when a Redis URL is configured, as the rate counters do.
    import redis.asyncio

    try:
        # What the counters build from it, without connecting: an unknown option fails only here.
        redis.asyncio.ConnectionPool.from_url(storage).make_connection()  # type: ignore[no-untyped-call]
    except (ValueError, TypeError, redis.RedisError) as exc:
        text = str(exc)
        if isinstance(exc, redis.RedisError) and not _holds_password(text, storage):
            return f"not a Redis URL the gateway can use: {text[:120]}"
        if "unexpected keyword argument" in text:
            # Names the option, which came from the URL's query: no secret.
            return f"{text.partition('argument ')[2]} is not an option of a Redis connection"
        if text.startswith("Invalid value for"):
            return text.removesuffix(".")
        return (
            "not a Redis URL the gateway can use: redis://[:password@]host[:port][/db], the port a number "
            "up to 65535, and a password holding '/', '@' or ':' percent-encoded (the value is not shown here)"
        )
    return None


def _check_backend_values(raw: Mapping[str, Any], path: ConfigPath) -> Iterator[ConfigIssue]:
    # No message repeats a value: a URL may hold credentials, a header a key, and
    # api_key_env the key itself pasted where its variable's name belongs.
    url = raw.get("base_url")
    if isinstance(url, str):
        problem = _url_problem(url)
        if problem is not None:
            yield ConfigIssue(path + ("base_url",), problem + "; for example http://127.0.0.1:8000/v1")
    env = raw.get("api_key_env")
    if isinstance(env, str) and not ENV_NAME.fullmatch(env):
        yield ConfigIssue(
            path + ("api_key_env",),
            "must be the name of an environment variable (letters, digits and _) that holds the key, "
            "not the key itself (the value is not shown here)",
        )
    headers = raw.get("headers")
    seen: dict[str, str] = {}
    for name, value in headers.items() if isinstance(headers, dict) else ():
        at = path + ("headers", name)
        if not HEADER_NAME.fullmatch(name):
            yield ConfigIssue(at, "not a header name: letters, digits and - _ . and the like; no space, colon or line break")
        elif name.lower() in GATEWAY_HEADERS:
            yield ConfigIssue(at, f"the gateway sets {name} itself on every upstream request")
        elif name.lower() in seen:
            yield ConfigIssue(at, f"the same header as {seen[name.lower()]} (header names ignore case): keep one")
        elif name.lower() == "authorization" and isinstance(env, str):
            yield ConfigIssue(at, "api_key_env sends the backend's key as Authorization: set the header or api_key_env, not both")
        elif name.lower() == "authorization" and isinstance(url, str) and "@" in url.partition("://")[2].partition("/")[0]:
            yield ConfigIssue(at, "the credentials in base_url are sent as Authorization (Basic): set the header or put them in base_url, not both")
        seen.setdefault(name.lower(), name)
        if isinstance(value, str) and not HEADER_VALUE.fullmatch(value):
            yield ConfigIssue(at, "the value holds a line break or another control character, or a character outside Latin-1")


def _url_problem(url: str) -> str | None:
    """What keeps ``url`` from being a backend's base URL, or None."""
    if not all("!" <= c <= "~" for c in url):
        # A request line and a Host header hold ASCII without spaces: anything else breaks every request.
        return (
            "holds a space or a character beyond printable ASCII: percent-encode it in the path "
            "(%20 for a space), and write an international host name in its xn-- form"
        )
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError as exc:  # a port that is no number or out of range, a broken [IPv6] host
        return f"not a URL the gateway can call ({exc})"
    if parts.scheme not in ("http", "https"):
        return "must begin with http:// or https://" + (f", not {parts.scheme}://" if parts.scheme.isalnum() else "")
    if not parts.hostname:
        return "names no host"
    if port == 0:
        return "port 0 cannot be called"
    return None


def _check_alias_values(raw: Mapping[str, Any], path: ConfigPath) -> Iterator[ConfigIssue]:
    for key, allowed in (("input", MODALITIES), ("output", OUTPUT_MODALITIES)):
        listed = raw.get(key)
        if not isinstance(listed, list):
            continue
        if not listed:
            yield ConfigIssue(path + (key,), f"lists no modality; one or more of {', '.join(allowed)}")
        for i, modality in enumerate(listed):
            if isinstance(modality, str) and modality not in allowed:
                close = difflib.get_close_matches(modality, allowed, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                yield ConfigIssue(path + (key, i), f"unknown modality {modality!r}{hint}; one of {', '.join(allowed)}")
    params = raw.get("params")
    for at, value in _leaves(params, path + ("params",)) if isinstance(params, dict) else ():
        if isinstance(value, float) and not math.isfinite(value):
            yield ConfigIssue(at, f"{_describe(value)} cannot be sent: JSON has no nan or inf")
    latency = raw.get("cold_latency_s")
    if not isinstance(latency, list) or not all(_is_number(x) for x in latency):
        return  # a wrong type is the converter's to report
    if not 1 <= len(latency) <= 2 or latency != sorted(latency) or any(x < 0 for x in latency):
        yield ConfigIssue(path + ("cold_latency_s",), "expected [seconds] or [low, high] with 0 <= low <= high")


def _leaves(value: Any, at: ConfigPath) -> Iterator[tuple[ConfigPath, Any]]:
    """Every scalar inside ``value`` (tables and arrays walked), with its path."""
    if isinstance(value, dict):
        for key, inner in value.items():
            yield from _leaves(inner, at + (key,))
    elif isinstance(value, list):
        for i, inner in enumerate(value):
            yield from _leaves(inner, at + (i,))
    else:
        yield at, value


# ---------------------------------------------------------------- cross-checks


def _unknown_name_message(kind: str, name: str, known: Iterable[str]) -> str:
    known = sorted(known)
    close = difflib.get_close_matches(name, known, n=3)
    hint = f"did you mean {', '.join(repr(c) for c in close)}?" if close else f"known: {', '.join(known) or 'none'}"
    return f"unknown {kind} {name!r}; {hint}"


def _check_alias_shape(name: str, spec: AliasSpec, backends: Collection[str]) -> Iterator[ConfigIssue]:
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
        here = [*trail, name]  # the path from the start of the search to this alias
        for key, i, member in _members(spec):
            if member not in models:
                continue
            if member in here:
                cycle = here[here.index(member) :]
                if frozenset(cycle) not in reported:
                    reported.add(frozenset(cycle))
                    shown = " → ".join([*cycle, member])
                    yield ConfigIssue(("models", name, key, i), f"cycle through route/fallback: {shown}")
            elif member not in done:
                yield from visit(member, here)
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
            if getattr(spec, flag) is True and all(_refuses(models, m, flag, frozenset({name})) for m in spec.route):
                yield ConfigIssue(("models", name, flag), f"declared true, but every member of the route declares {flag} = false")


def _refuses(models: Mapping[str, AliasSpec], name: str, flag: str, seen: frozenset[str]) -> bool:
    """Whether alias ``name`` refuses capability ``flag``: it says false, or it is a composite all of whose members do."""
    spec = models.get(name)
    if spec is None or name in seen or getattr(spec, flag) is True:
        return False
    if getattr(spec, flag) is False:
        return True
    return spec.route is not None and all(_refuses(models, m, flag, seen | {name}) for m in spec.route)


# Request fields the gateway itself decides: `params` may not set them and `rename`
# may not move them (a default `stream = true` would break a client that did not ask).
RESERVED_FIELDS = ("model", "messages", "stream")
# Limits a composite may declare only as large as a member's: what no member takes is
# a capability no member has (rule 6). Image limits of a target fall back to [defaults].
COMPOSITE_LIMITS = ("context_window", "max_output_tokens", "max_images", "max_image_bytes")


def _member_limit(models: Mapping[str, AliasSpec], defaults: Defaults, name: str, key: str, seen: frozenset[str]) -> int | None:
    """The most any target under ``name`` takes for ``key`` (None: no limit, or unknowable)."""
    spec = models.get(name)
    if spec is None or name in seen:
        return None
    declared: int | None = getattr(spec, key)
    if declared is not None:
        return declared
    if spec.route is None:
        return getattr(defaults, key, None)
    limits = [_member_limit(models, defaults, member, key, seen | {name}) for member in spec.route]
    return None if not limits or None in limits else max(x for x in limits if x is not None)


def _check_composite_limits(models: Mapping[str, AliasSpec], defaults: Defaults) -> Iterator[ConfigIssue]:
    for name, spec in models.items():
        if not spec.route or any(m not in models for m in spec.route):
            continue
        for key in COMPOSITE_LIMITS:
            declared = getattr(spec, key)
            limits = [_member_limit(models, defaults, m, key, frozenset({name})) for m in spec.route]
            if declared is None or None in limits:
                continue
            most = max(x for x in limits if x is not None)
            if declared > most:
                yield ConfigIssue(
                    ("models", name, key),
                    f"{declared} is more than any member of the route takes (at most {most}; members: {', '.join(spec.route)})",
                )


def _is_clean_name(name: str) -> bool:
    # Names reach logs, headers and tables, and clients type them: " x" and "x" must not both exist.
    return bool(name) and name == name.strip() and name.isprintable()


def _check_alias_rules(models: Mapping[str, AliasSpec]) -> Iterator[ConfigIssue]:
    """Keys of one alias that contradict each other or the gateway's own fields."""
    for name, spec in models.items():
        at: ConfigPath = ("models", name)
        if spec.model is not None and not _is_clean_name(spec.model):
            yield ConfigIssue(at + ("model",), "the model id must not be empty, begin or end with a space, or hold a control character")
        if spec.min_max_tokens is not None and spec.max_output_tokens is not None and spec.min_max_tokens > spec.max_output_tokens:
            yield ConfigIssue(
                at + ("min_max_tokens",),
                f"{spec.min_max_tokens} is more than max_output_tokens ({spec.max_output_tokens}): no max_tokens could pass",
            )
        for key in spec.params:
            if key in RESERVED_FIELDS:
                yield ConfigIssue(at + ("params", key), f"the gateway sets `{key}` itself; params may not")
        targets: dict[str, str] = {}
        for old, new in spec.rename.items():
            if old in RESERVED_FIELDS or new in RESERVED_FIELDS:
                yield ConfigIssue(at + ("rename", old), f"the gateway sets `{old if old in RESERVED_FIELDS else new}` itself; rename may not move it")
            elif old == new:
                yield ConfigIssue(at + ("rename", old), "renames a field to itself")
            elif not new.strip():
                yield ConfigIssue(at + ("rename", old), "renames a field to an empty name")
            elif new in targets:
                yield ConfigIssue(at + ("rename", old), f"`{targets[new]}` is renamed to {new!r} already")
            targets.setdefault(new, old)


def _check_retries(
    models: Mapping[str, AliasSpec], backends: Mapping[str, Backend], defaults: Defaults, routing: RoutingConfig
) -> Iterator[ConfigIssue]:
    """``retries`` a target could never make: its own failures cool it down first, and a cooled
    target is not called again (the dispatcher does not hammer it), so the retries would stop short."""
    limit = routing.cooldown_failures
    places: list[tuple[ConfigPath, int | None]] = [(("defaults", "retries"), defaults.retries)]
    places += [(("backends", name, "retries"), backend.retries) for name, backend in backends.items()]
    places += [(("models", name, "retries"), spec.retries) for name, spec in models.items()]
    unset = [
        name for name, spec in models.items()
        if spec.route is None and spec.retries is None and getattr(backends.get(spec.backend or ""), "retries", None) is None
    ]
    if defaults.retries is None and BUILTIN_RETRIES >= limit and unset:
        # Those targets make the built-in number of retries: said where the conflict is set.
        yield ConfigIssue(
            ("routing", "cooldown_failures"),
            f"{limit} cools a target after its first failure, before the retry that '{unset[0]}'"
            f"{' and others make' if len(unset) > 1 else ' makes'} by default (retries = {BUILTIN_RETRIES}): raise it "
            f"above {BUILTIN_RETRIES}, or set retries = 0 in [defaults]",
        )
    for path, retries in places:
        if retries is not None and retries >= limit:
            yield ConfigIssue(
                path,
                f"{retries} retries would take {retries + 1} calls, but [routing] cooldown_failures = {limit} cools "
                f"the target after {limit} failures in a row, which ends its retries there: set retries below "
                f"{limit} or raise cooldown_failures",
            )


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


def _string_end(text: str, i: int) -> int:
    """The offset just past the TOML string that opens at ``text[i]``."""
    for quotes in ('"""', "'''"):
        if text.startswith(quotes, i):
            close = text.find(quotes, i + 3)
            return len(text) if close < 0 else close + 3
    quote, i = text[i], i + 1
    while i < len(text) and text[i] not in (quote, "\n"):
        i += 2 if quote == '"' and text[i] == "\\" else 1
    return i + 1


def _array_lines(text: str, i: int, line: int) -> tuple[dict[int, int], int]:
    """For the array opening at ``text[i]``: the line of each element, and the line it closes on.

    A dangling ``route[1]`` then points at its own line of a multi-line array.
    """
    elements: dict[int, int] = {}
    depth, index, expecting = 0, 0, False
    while i < len(text):
        char = text[i]
        if char == "\n":
            line += 1
        elif char == "#":
            i = text.find("\n", i)
            if i < 0:
                break
            continue
        elif depth == 1 and expecting and not char.isspace() and char not in ",]":
            elements[index], expecting = line, False
        if char in "\"'":
            end = _string_end(text, i)
            line += text.count("\n", i, end)
            i = end
            continue
        if char in "[{":
            depth += 1
            expecting = expecting or depth == 1
        elif char in "]}":
            depth -= 1
            if depth == 0:
                break
        elif char == "," and depth == 1:
            index, expecting = index + 1, True
        i += 1
    return elements, line


def locate_lines(text: str) -> dict[ConfigPath, int]:
    """Map each table, key and array element path of the file to the line where it is written."""
    lines: dict[ConfigPath, int] = {}
    table: ConfigPath = ()
    # TOML counts lines by "\n" only; str.splitlines() would also split at \x0c or \u2028.
    starts = [0]
    starts += [i + 1 for i, char in enumerate(text) if char == "\n"]
    number = 0
    while number < len(starts):
        offset = starts[number]
        number += 1
        line = text[offset : starts[number] - 1] if number < len(starts) else text[offset:]
        stripped = line.strip()
        if stripped.startswith("["):
            found = _table_path(stripped.split("#", 1)[0] if '"' not in stripped else stripped)
            if found is None:
                found = _table_path(stripped.split("#", 1)[0])
            if found is not None:
                table = found
                # [models."a"] is also where the file first speaks of models.
                for end in range(1, len(table) + 1):
                    lines.setdefault(table[:end], number)
            continue
        match = KEY_LINE.match(line)
        if not match:
            continue
        key_path = _table_path(f"[{match.group(1)}]")
        if not key_path:
            continue
        lines.setdefault(table + key_path, number)
        value_at = offset + match.end() + len(line[match.end() :]) - len(line[match.end() :].lstrip())
        if text.startswith("[", value_at):
            elements, last = _array_lines(text, value_at, number)
            for index, element_line in elements.items():
                lines.setdefault((*table, *key_path, index), element_line)
            number = last  # the array's own lines hold no keys or headers
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
    # Windows editors save UTF-8 with a byte-order mark, which TOML does not allow
    # ("Invalid statement" at 1:1, naming no mark): it is no part of the text.
    data = data.removeprefix(b"\xef\xbb\xbf")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        message = f"not UTF-8 text: byte 0x{data[exc.start]:02x} at line {line}, column {column} ({exc.reason}); save the file as UTF-8"
        raise ConfigError(source, [ConfigIssue((), message, line)]) from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        found = SYNTAX_LINE.search(str(exc))
        # tomllib says "(at end of document)" without a line: a half-written file ends there.
        line = int(found.group(1)) if found else text.count("\n") + 1
        raise ConfigError(source, [ConfigIssue((), f"TOML syntax error: {exc}", line)]) from None

    issues: list[ConfigIssue] = []
    sections: dict[str, Any] = {}
    known_tables = [*SECTIONS, *TABLES_OF_ENTRIES]
    for key, value in raw.items():
        if key in SECTIONS:
            sections[key], _ = _structure(value, SECTIONS[key], (key,), issues)
        elif key not in TABLES_OF_ENTRIES:
            issues.append(ConfigIssue((key,), _unknown_key_message(key, known_tables).replace("key", "table", 1)))

    entries: dict[str, dict[str, Any]] = {}
    raw_names: dict[str, set[str]] = {}
    bad_keys: dict[str, frozenset[str]] = {}
    for table, cls in TABLES_OF_ENTRIES.items():
        value = raw.get(table, {})
        entries[table] = {}
        if not isinstance(value, dict):
            issues.append(ConfigIssue((table,), f"expected a table, got {_describe(value)}"))
            value = None
        raw_names[table] = set(value or ())
        for name, entry in (value or {}).items():
            if not _is_clean_name(name):
                issues.append(ConfigIssue((table, name), "a name must not be empty, begin or end with a space, or hold a line break or another control character"))
            elif table == "models" and (name.startswith("/") or name.endswith("/") or "//" in name):
                # A URL path drops such slashes: GET /v1/models/{alias} could never name the alias.
                issues.append(ConfigIssue((table, name), "an alias name must not begin or end with '/' or hold '//'"))
            elif table == "models" and not name.isascii():
                # It goes back to clients in the x-gateway-served-by header, whose values are read as Latin-1.
                issues.append(ConfigIssue((table, name), "an alias name must be ASCII: letters, digits and . - _ / : and the like"))
            structured, bad = _structure(entry, cls, (table, name), issues)
            if structured is not None:
                entries[table][name] = structured
            if table == "models":
                bad_keys[name] = bad

    models: dict[str, AliasSpec] = entries["models"]
    for name, spec in models.items():
        if not bad_keys[name] & SHAPE_KEYS:
            issues.extend(_check_alias_shape(name, spec, raw_names["backends"]))
    # Names that failed to structure still exist: do not report them as dangling too.
    issues.extend(_check_references(models, raw_names["models"]))
    issues.extend(_check_cycles(models))
    issues.extend(_check_composite_capabilities(models))
    issues.extend(_check_composite_limits(models, sections.get("defaults") or Defaults()))
    issues.extend(_check_alias_rules(models))
    issues.extend(
        _check_retries(models, entries["backends"], sections.get("defaults") or Defaults(), sections.get("routing") or RoutingConfig())
    )
    if raw.get("models", {}) == {}:
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
