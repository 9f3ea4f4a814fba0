"""The keys file and the key ring a configuration load serves with (SPEC §3).

Sources of keys: ``GATEWAY_API_KEYS`` (comma-separated keys, for simple setups)
and the keys file named by ``[auth] keys_file`` (relative to models.toml)::

    [keys.alice]
    hash = "sha256:9f86d0…"       # SHA-256 of the key; the key itself is never stored
    models = ["qwen3-8b"]         # optional allow-list of aliases
    rpm = 60                      # optional per-key rates (else [limits] key_rpm / key_tpm)
    tpm = 200_000
    enabled = true                # `gateway keys revoke` sets false

How it works:
1. ``reload`` calls ``build_keyring`` on every load and ``keys_file_path`` to know
   which extra file to watch.
2. The file is parsed as strictly as models.toml: unknown keys, wrong types and
   malformed hashes are a ``ConfigError`` naming the file, table path and line,
   and the last good configuration keeps serving. A missing file holds no keys.
3. ``gateway keys add|list|revoke`` (see ``keys_cli``) read the file with the same
   parser and write it back whole, atomically, under a lock.

A plain SHA-256 is enough here: generated keys carry 256 random bits, so there
is no dictionary to run against the hash, and a slow hash would only slow down
every request.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import secrets
import tempfile
import tomllib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import attrs

from gateway.auth import Identity, KeyRing
from gateway.config.load import CONVERTER, ConfigError, ConfigIssue, _issues_from, locate_lines
from gateway.config.model import Config, KeyEntry

log = logging.getLogger("gateway.keys")

HASH_PREFIX = "sha256:"
HASH_PATTERN = re.compile(r"sha256:[0-9a-f]{64}")
KEY_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")
# Env keys are named env-key-<digest prefix> (auth.env_identity): a file key must not share their rate counters.
RESERVED_PREFIX = "env-key-"
KEY_PREFIX = "sk-gw-"
FILE_HEADER = (
    "# Gateway API keys: SHA-256 hashes only, never the keys themselves.\n"
    "# Managed by `gateway keys add|list|revoke`; the gateway reloads this file when it changes.\n"
)


def keys_file_path(config: Config, config_path: Path) -> Path | None:
    """The keys file this config names, resolved next to models.toml; None when it names none."""
    return _beside(config.auth.keys_file, config_path)


def _beside(named: object, config_path: Path) -> Path | None:
    """A keys file path as models.toml names it, resolved next to models.toml; None for none."""
    if not isinstance(named, str) or not named:
        return None
    path = Path(named)
    return path if path.is_absolute() else config_path.parent / path


def keys_file_named_in(config_path: Path) -> Path | None:
    """The keys file a models.toml names, read from its TOML alone: for one that does not load."""
    try:
        raw = tomllib.loads(config_path.read_bytes().decode("utf-8-sig"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return None
    auth = raw.get("auth")
    return _beside(auth.get("keys_file") if isinstance(auth, dict) else None, config_path)


def build_keyring(config: Config, path: Path | None, environ: Mapping[str, str]) -> KeyRing:
    """The keys this configuration accepts, read from the keys file at ``path`` (``keys_file_path``,
    or a copy of it); a broken keys file raises ``ConfigError``."""
    env_keys = environ.get("GATEWAY_API_KEYS", "").split(",")
    entries = read_keys_file(path) if path is not None else {}
    if path is not None and not path.exists():
        log.warning("the keys file %s does not exist yet: only GATEWAY_API_KEYS keys are accepted", path)
    for name, entry in entries.items():
        # Not an error: the alias may come back, and the key keeps its other aliases. But an
        # operator who renamed an alias should hear that a key lost it.
        gone = sorted(set(entry.models or ()) - set(config.models))
        if gone and entry.enabled:
            log.warning("key %r may use %s, which models.toml no longer has", name, ", ".join(repr(alias) for alias in gone))
    from_file = {digest: identity for digest, identity in file_identities(entries)}
    return KeyRing.from_env_keys(env_keys, required=config.auth.required, extra=from_file, keys_file=path is not None)


def file_identities(entries: Mapping[str, KeyEntry]) -> Iterator[tuple[bytes, Identity]]:
    """(digest, identity) of each enabled key of the file."""
    for name, entry in entries.items():
        if not entry.enabled:
            continue
        allowed = frozenset(entry.models) if entry.models is not None else None
        yield digest_of(entry.hash), Identity(name, allowed, rpm=entry.rpm, tpm=entry.tpm)


# ---------------------------------------------------------------- keys and hashes


def new_key() -> str:
    """A fresh key: 256 random bits, URL-safe, recognisable by its prefix."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    return HASH_PREFIX + hashlib.sha256(key.encode("utf-8")).hexdigest()


def digest_of(hash_text: str) -> bytes:
    return bytes.fromhex(hash_text.removeprefix(HASH_PREFIX))


def key_name_problem(name: str) -> str | None:
    """Why ``name`` cannot name a key, or None when it can."""
    if not KEY_NAME_PATTERN.fullmatch(name):
        return "a key name is 1-64 letters, digits, '.', '_', '@' or '-', starting with a letter or digit"
    if name.startswith(RESERVED_PREFIX):
        return f"names starting with {RESERVED_PREFIX!r} are kept for GATEWAY_API_KEYS"
    return None


# ---------------------------------------------------------------- reading


def read_keys_file(path: Path) -> dict[str, KeyEntry]:
    """The file's entries by name (none when the file does not exist), or ``ConfigError`` with every problem."""
    source = str(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise ConfigError(source, [ConfigIssue((), f"cannot read the keys file: {exc.strerror or exc}")]) from None
    return parse_keys(data, source)


def parse_keys(data: bytes, source: str = "keys.toml") -> dict[str, KeyEntry]:
    try:
        text = data.decode("utf-8")
        raw = tomllib.loads(text)
    except UnicodeDecodeError as exc:
        raise ConfigError(source, [ConfigIssue((), f"not UTF-8 text: {exc.reason} at byte {exc.start}")]) from None
    except tomllib.TOMLDecodeError as exc:
        found = re.search(r"at line (\d+)", str(exc))
        # tomllib says "(at end of document)" without a line: a half-written file ends there.
        line = int(found.group(1)) if found else text.count("\n") + 1
        raise ConfigError(source, [ConfigIssue((), f"TOML syntax error: {exc}", line)]) from None

    if not text.strip():
        # What a save by truncate-then-write passes through: taken as "no keys", it would lock every
        # key out (or, with auth optional, let anyone in) until the write ends.
        raise ConfigError(source, [ConfigIssue((), "the keys file is empty; it holds [keys.NAME] tables (`gateway keys add`)")])
    issues: list[ConfigIssue] = []
    for key in raw:
        if key != "keys":
            issues.append(ConfigIssue((key,), f"unknown table {key!r}; a keys file holds only [keys.NAME] tables"))
    table = raw.get("keys", {})
    if not isinstance(table, dict):
        issues.append(ConfigIssue(("keys",), "expected a table of [keys.NAME] entries"))
        table = {}
    entries: dict[str, KeyEntry] = {}
    seen_hashes: dict[str, str] = {}
    for name, value in table.items():
        entry = _parse_entry(name, value, issues)
        # Duplicates are found among entries with other problems too: one report shows them all.
        hash_text = value.get("hash") if isinstance(value, dict) else None
        if isinstance(hash_text, str) and seen_hashes.setdefault(hash_text, name) != name:
            issues.append(ConfigIssue(("keys", name, "hash"), f"the same key as keys.{seen_hashes[hash_text]}: each key has one entry"))
        elif entry is not None:
            entries[name] = entry
    if issues:
        lines = locate_lines(text)
        raise ConfigError(source, [_with_line(issue, lines) for issue in issues])
    return entries


def _parse_entry(name: str, value: Any, issues: list[ConfigIssue]) -> KeyEntry | None:
    at = ("keys", name)
    problem = key_name_problem(name)
    if problem:
        issues.append(ConfigIssue(at, problem))
    if not isinstance(value, dict):
        issues.append(ConfigIssue(at, "expected a table with at least `hash`"))
        return None
    found = len(issues)
    entry: KeyEntry | None
    try:
        entry = CONVERTER.structure(value, KeyEntry)
    except Exception as exc:  # noqa: BLE001  # cattrs raises groups and plain errors alike
        issues.extend(_issues_from(exc, at))
        entry = None
    # Checked on the table's own values too, so one field's wrong type hides no other problem.
    hash_text = value.get("hash")
    if isinstance(hash_text, str) and not HASH_PATTERN.fullmatch(hash_text):
        # Never echo the value: an operator may have pasted the key itself here.
        issues.append(ConfigIssue(at + ("hash",), 'expected "sha256:" and 64 lowercase hex digits (`gateway keys add` writes it)'))
    for field in ("rpm", "tpm"):
        number = value.get(field)
        if type(number) is int and number <= 0:
            issues.append(ConfigIssue(at + (field,), f"must be a positive number, got {number}"))
    return entry if len(issues) == found and not problem else None


def _with_line(issue: ConfigIssue, lines: Mapping[tuple[str | int, ...], int]) -> ConfigIssue:
    path = issue.path
    while path and path not in lines:
        path = path[:-1]
    return attrs.evolve(issue, line=lines.get(path)) if path else issue


# ---------------------------------------------------------------- writing


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on the keys file's directory: one `gateway keys` writer at a time."""
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        fcntl.flock(directory, fcntl.LOCK_EX)
        yield
    finally:
        os.close(directory)  # closing releases the lock


def render_keys(entries: Mapping[str, KeyEntry]) -> str:
    """The keys file's text: one [keys.NAME] table per entry, only the fields that are set."""
    out = [FILE_HEADER]
    for name, entry in entries.items():
        out.append(f"\n[keys.{json.dumps(name)}]\n")
        for field in attrs.fields(KeyEntry):
            value = getattr(entry, field.name)
            if value is None:
                continue
            out.append(f"{field.name} = {_toml_value(value)}\n")
    return "".join(out)


def _toml_value(value: Any) -> str:
    # JSON's string escapes are valid TOML basic-string escapes.
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, str)):
        return json.dumps(value)
    return "[" + ", ".join(_toml_value(v) for v in value) + "]"


def write_keys_file(path: Path, entries: Mapping[str, KeyEntry]) -> None:
    """Replace the file in one rename, so the gateway's watcher never reads half a file."""
    text = render_keys(entries)
    parse_keys(text.encode("utf-8"), str(path))  # what we write must read back
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temporary, 0o600)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
