"""``gateway keys add|list|revoke``: manage the keys file named by ``[auth] keys_file``.

``add`` creates a strong key, prints it once on stdout (the only place it ever
appears) and writes only its hash. ``list`` shows names, allow-lists, rates and
state, never hashes. ``revoke`` disables a key; the running gateway reloads the
file and refuses it from then on.

These commands read models.toml only for ``[auth] keys_file`` and the alias
names, without the full check, so a broken models.toml never stands in the way
of revoking a key.
"""

from __future__ import annotations

import argparse
import datetime
import difflib
import os
import sys
import tomllib
from pathlib import Path
from typing import Any

import attrs

from gateway.config import ConfigError
from gateway.config.model import KeyEntry
from gateway.keys import hash_key, key_name_problem, locked, new_key, read_keys_file, write_keys_file


class KeysCommandError(Exception):
    """A problem the command reports on stderr before exiting 1."""


def _config_path(value: str | None) -> Path:
    return Path(value or os.environ.get("GATEWAY_CONFIG") or "models.toml")


def _raw_config(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise KeysCommandError(f"{path}: cannot read the file: {exc.strerror or exc}") from None
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise KeysCommandError(f"{path}: not readable TOML ({exc}); name the keys file with --file") from None


def keys_file_for(args: argparse.Namespace) -> tuple[Path, dict[str, Any] | None]:
    """The keys file to work on, and the raw models.toml when it was read."""
    if args.file:
        return Path(args.file), None
    config_path = _config_path(args.config)
    raw = _raw_config(config_path)
    auth = raw.get("auth")
    keys_file = auth.get("keys_file") if isinstance(auth, dict) else None
    if not isinstance(keys_file, str) or not keys_file:
        raise KeysCommandError(
            f'{config_path}: no [auth] keys_file; add `keys_file = "keys.toml"` under [auth], or pass --file'
        )
    path = Path(keys_file)
    return (path if path.is_absolute() else config_path.parent / path), raw


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _split_models(values: list[str] | None) -> tuple[str, ...] | None:
    if values is None:
        return None
    names = [name.strip() for value in values for name in value.split(",")]
    return tuple(dict.fromkeys(name for name in names if name))


def _check_aliases(models: tuple[str, ...], raw: dict[str, Any] | None) -> None:
    known = raw.get("models") if raw is not None else None
    if not isinstance(known, dict):
        return  # --file without a config: nothing to check against
    for name in models:
        if name not in known:
            close = difflib.get_close_matches(name, list(known), n=3)
            hint = f"did you mean {', '.join(repr(c) for c in close)}?" if close else "see `gateway models`"
            raise KeysCommandError(f"--models: unknown alias {name!r}; {hint}")


def cmd_add(args: argparse.Namespace) -> int:
    problem = key_name_problem(args.name)
    if problem:
        raise KeysCommandError(f"{args.name!r}: {problem}")
    path, raw = keys_file_for(args)
    models = _split_models(args.models)
    if models is not None:
        _check_aliases(models, raw)
    for flag in ("rpm", "tpm"):
        value = getattr(args, flag)
        if value is not None and value <= 0:
            raise KeysCommandError(f"--{flag} must be a positive number, got {value}")
    key = new_key()
    with locked(path):
        entries = read_keys_file(path)
        if args.name in entries:
            raise KeysCommandError(f"{path}: a key named {args.name!r} exists already; revoke it or pick another name")
        entries[args.name] = KeyEntry(hash=hash_key(key), models=models, rpm=args.rpm, tpm=args.tpm, created_at=_now())
        write_keys_file(path, entries)
    print(key)
    print(f"Key {args.name!r} added to {path}. This is the only time it is shown: store it now.", file=sys.stderr)
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    path, _ = keys_file_for(args)
    entries = read_keys_file(path)
    if not entries:
        print(f"{path}: no keys", file=sys.stderr)
        return 0
    rows = [("name", "state", "models", "rpm", "tpm", "created")]
    for name, entry in entries.items():
        rows.append((
            name,
            "enabled" if entry.enabled else "revoked",
            ",".join(entry.models) if entry.models is not None else "*",
            str(entry.rpm or "-"),
            str(entry.tpm or "-"),
            entry.created_at or "-",
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    return 0


def cmd_revoke(args: argparse.Namespace) -> int:
    path, _ = keys_file_for(args)
    with locked(path):
        entries = read_keys_file(path)
        entry = entries.get(args.name)
        if entry is None:
            known = ", ".join(entries) or "none"
            raise KeysCommandError(f"{path}: no key named {args.name!r} (keys: {known})")
        if entry.enabled:
            entries[args.name] = attrs.evolve(entry, enabled=False, revoked_at=_now())
            write_keys_file(path, entries)
    print(f"Key {args.name!r} revoked in {path}; the gateway refuses it once it has reloaded the file.", file=sys.stderr)
    return 0


def _run(command: Any) -> Any:
    def run(args: argparse.Namespace) -> int:
        try:
            return int(command(args))
        except KeysCommandError as exc:
            print(f"gateway keys: {exc}", file=sys.stderr)
            return 1
        except ConfigError as exc:
            print(exc.render(), file=sys.stderr)
            print("gateway keys: the keys file has problems; fix them first (nothing was written).", file=sys.stderr)
            return 1
        except OSError as exc:
            print(f"gateway keys: {exc.filename or ''}: {exc.strerror or exc}", file=sys.stderr)
            return 1

    return run


def add_keys_parser(sub: Any) -> None:
    """Add ``keys add|list|revoke`` to the ``gateway`` command's subparsers."""
    keys = sub.add_parser("keys", help="manage the API keys file named by [auth] keys_file")
    actions = keys.add_subparsers(dest="keys_command", required=True)

    def common(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--config", help="models.toml naming the keys file (default: $GATEWAY_CONFIG or ./models.toml)")
        parser.add_argument("--file", help="the keys file itself, instead of the one models.toml names")

    add = actions.add_parser("add", help="create a key, print it once, store only its hash")
    add.add_argument("name")
    add.add_argument("--models", nargs="+", metavar="ALIAS", help="aliases the key may use (default: all)")
    add.add_argument("--rpm", type=int, help="requests per minute for this key")
    add.add_argument("--tpm", type=int, help="tokens per minute for this key")
    common(add)
    add.set_defaults(run=_run(cmd_add))

    listing = actions.add_parser("list", help="show the keys (names, allow-lists, rates; never hashes)")
    common(listing)
    listing.set_defaults(run=_run(cmd_list))

    revoke = actions.add_parser("revoke", help="disable a key")
    revoke.add_argument("name")
    common(revoke)
    revoke.set_defaults(run=_run(cmd_revoke))
