"""The command line: ``gateway serve``, ``gateway check``, ``gateway models`` (SPEC §8)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from gateway.config import ConfigError, load_config


def _config_path(value: str | None) -> Path:
    return Path(value or os.environ.get("GATEWAY_CONFIG") or "models.toml")


def _load_or_report(path: Path) -> object | None:
    try:
        return load_config(path)
    except ConfigError as exc:
        print(exc.render(), file=sys.stderr)
        print(f"{path}: {len(exc.issues)} problem(s); nothing was served.", file=sys.stderr)
        return None


def cmd_check(args: argparse.Namespace) -> int:
    path = _config_path(args.config)
    config = _load_or_report(path)
    if config is None:
        return 1
    print(f"{path}: OK, {len(config.models)} aliases, {len(config.backends)} backends")  # type: ignore[attr-defined]
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from gateway.tables import alias_rows, render_markdown, render_text, seed_markdown

    config = _load_or_report(_config_path(args.config))
    if config is None:
        return 1
    if args.markdown:
        print(seed_markdown(config))  # type: ignore[arg-type]
        print("### All aliases\n")
        print(render_markdown(alias_rows(config)))  # type: ignore[arg-type]
    else:
        print(render_text(alias_rows(config)))  # type: ignore[arg-type]
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    path = _config_path(args.config).resolve()
    if _load_or_report(path) is None:
        return 1
    from granian import Granian
    from granian.constants import Interfaces, Loops

    # Workers are separate processes: they find the config through the environment.
    os.environ["GATEWAY_CONFIG"] = str(path)
    try:
        import uvloop  # noqa: F401

        loop = Loops.uvloop
    except ImportError:
        loop = Loops.asyncio
    server = Granian(
        "gateway.app:create_app",
        factory=True,
        address=args.host,
        port=args.port,
        interface=Interfaces.ASGI,
        workers=args.workers,
        loop=loop,
        log_access=False,
        backlog=2048,
    )
    server.serve()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gateway", description="DGX LLM Chat Gateway")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the gateway under granian")
    serve.add_argument("--config", help="models.toml to serve (default: $GATEWAY_CONFIG or ./models.toml)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8080)
    serve.add_argument("--workers", type=int, default=1)
    serve.set_defaults(run=cmd_serve)

    check = sub.add_parser("check", help="validate a models.toml without serving (exit 1 listing every problem)")
    check.add_argument("config", nargs="?")
    check.set_defaults(run=cmd_check)

    models = sub.add_parser("models", help="print the alias table")
    models.add_argument("--config")
    models.add_argument("--markdown", action="store_true", help="markdown: the seed pages' tables, then every alias")
    models.set_defaults(run=cmd_models)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.run(args))
