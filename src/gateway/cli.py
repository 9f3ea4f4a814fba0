"""The command line: ``gateway serve``, ``gateway check``, ``gateway models`` (SPEC §8)."""

from __future__ import annotations

import argparse
import errno
import os
import shutil
import socket
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gateway.config import Config, ConfigError, load_config
from gateway.keys import build_keyring, keys_file_named_in, keys_file_path, read_keys_file
from gateway.keys_cli import add_keys_parser
from gateway.reload import LAST_GOOD_ENV
from gateway.shared_slots import SHARED_DIR_ENV


def _config_path(value: str | None) -> Path:
    return Path(value or os.environ.get("GATEWAY_CONFIG") or "models.toml")


def _load_or_report(path: Path, consequence: str) -> Config | None:
    """models.toml and the keys file it names, both checked; every problem of both printed."""
    problems: list[ConfigError] = []
    config: Config | None = None
    try:
        config = load_config(path)
    except ConfigError as exc:
        problems.append(exc)
    try:
        if config is not None:
            # The same reader the running gateway uses: a keys file it would refuse fails here too.
            build_keyring(config, keys_file_path(config, path), os.environ)
        elif (keys := keys_file_named_in(path)) is not None:
            read_keys_file(keys)
    except ConfigError as exc:
        problems.append(exc)
    for problem in problems:
        print(problem.render(), file=sys.stderr)
        print(f"{problem.source}: {len(problem.issues)} problem(s); {consequence}", file=sys.stderr)
    return config if not problems else None


def cmd_check(args: argparse.Namespace) -> int:
    path = _config_path(args.config)
    config = _load_or_report(path, "fix them and run `gateway check` again.")
    if config is None:
        return 1
    print(f"{path}: OK, {len(config.models)} aliases, {len(config.backends)} backends")
    # Not a problem of the file (the gateway's environment may differ from this shell's), but
    # the first thing to know when a cloud alias answers 503 backend_not_configured.
    for name, backend in config.backends.items():
        if backend.api_key_env and not os.environ.get(backend.api_key_env):
            print(f"note: backends.{name}: {backend.api_key_env} is not set in this environment; "
                  "where the gateway runs without it, its aliases answer 503 backend_not_configured")
    keys_file = keys_file_path(config, path)
    if keys_file is not None and not keys_file.exists():
        print(f"note: auth.keys_file names {keys_file}, which does not exist: `gateway keys add` creates it; "
              "until then only GATEWAY_API_KEYS keys are accepted")
    if config.auth.required and keys_file is None and not os.environ.get("GATEWAY_API_KEYS", "").strip(", "):
        print("note: no client keys (no GATEWAY_API_KEYS in this environment, no auth.keys_file): where the "
              "gateway runs so, every request is answered 401 no_api_keys_configured")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from gateway.tables import alias_rows, render_markdown, render_rules_text, render_text, rules_rows, seed_markdown

    config = _load_or_report(_config_path(args.config), "no table printed.")
    if config is None:
        return 1
    if args.rules:
        # What each alias accepts, from the same compiled rules that judge requests.
        print(render_markdown(rules_rows(config)) if args.markdown else render_rules_text(rules_rows(config)))
    elif args.markdown:
        print(seed_markdown(config))
        print("### All aliases\n")
        print(render_markdown(alias_rows(config)))
    else:
        print(render_text(alias_rows(config)))
    return 0


def raise_open_files_limit() -> None:
    """Lift the soft limit on open files to the hard one (workers inherit it).

    Each stream holds two sockets (client and upstream): 2,000 concurrent
    streams need ~4,000 descriptors, over the 1,024 many systems default to.
    """
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            pass  # keep the soft limit: the gateway still runs, with fewer streams


# granian reads a request body into a buffer that grows to at most this size, and
# hands each read to the app as one piece: a bigger buffer means fewer pieces per
# large body, and every piece is a hand-off between granian's I/O thread and the
# event loop. 1 MiB against granian's default of 408 KiB, measured with 4 images
# of 4 MB in flight (wrk against a worker and the upstream stand-in, runs of each
# interleaved): p50 15.8 ms instead of 17.1, 0.3 ms less CPU per request, 14 MiB
# more peak RSS.
# 2, 4 and 16 MiB measured no better, for more RSS.
HTTP1_BUFFER_BYTES = 1024 * 1024
# Long enough for most answers in flight to end; a stream longer than that is cut when stopping.
DEFAULT_SHUTDOWN_TIMEOUT_S = 30


def server_options(args: argparse.Namespace) -> dict[str, Any]:
    """What ``gateway serve`` gives granian, besides the app it runs."""
    from granian.constants import Interfaces, Loops
    from granian.http import HTTP1Settings

    try:
        import uvloop  # noqa: F401

        loop = Loops.uvloop
    except ImportError:
        loop = Loops.asyncio
    return {
        "factory": True,
        "address": args.host,
        "port": args.port,
        "interface": Interfaces.ASGI,
        "workers": args.workers,
        "loop": loop,
        "log_access": False,
        "backlog": 2048,
        "http1_settings": HTTP1Settings(max_buffer_size=HTTP1_BUFFER_BYTES),
        # A worker that dies (killed for memory, a crashing extension) is started again
        # instead of taking the gateway down; it serves the last good configuration.
        "respawn_failed_workers": True,
        "respawn_interval": 1.0,
        # Stopping, the main process waits this long for a worker to finish what runs, then kills it.
        # Unbounded, a second SIGINT or SIGTERM while a request runs (Ctrl-C twice) hung it for good:
        # granian's worker blocks in its signal handler and never exits.
        "workers_kill_timeout": args.shutdown_timeout,
    }


def check_address_free(host: str, port: int) -> str | None:
    """Why ``host:port`` cannot be served, or None when it is free.

    granian binds with SO_REUSEPORT, so a second ``gateway serve`` on a port in use
    does not fail: the kernel shares the port and splits connections between the two
    servers, and clients get one configuration or the other at random. A plain bind
    without SO_REUSEPORT fails on any listening socket there. SO_REUSEADDR, which
    granian sets too, lets a port whose old connections wait in TIME_WAIT count as free.
    """
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            # "address already in use" is also what tests/harness.py retries a start on.
            return (
                f"{address}: address already in use, likely by another gateway or server:"
                " stop it or pick another --port; not serving."
            )
        return f"{address}: cannot listen there: {exc.strerror or exc}; not serving."
    except OverflowError as exc:  # a port outside 0-65535
        return f"{address}: cannot listen there: {str(exc).rstrip('.')}; not serving."
    return None


def cmd_serve(args: argparse.Namespace) -> int:
    path = _config_path(args.config).absolute()
    if _load_or_report(path, "not serving.") is None:
        return 1
    # Port 0 asks for any free port: nothing to collide with.
    problem = check_address_free(args.host, args.port) if args.port != 0 else None
    if problem is not None:
        print(problem, file=sys.stderr)
        return 1
    from gateway.supervisor import GatewayGranian as Granian

    # Workers are separate processes: they find the config through the environment.
    os.environ["GATEWAY_CONFIG"] = str(path)
    # A directory private to this run, removed when it ends, holding:
    # - the last configuration that loaded, for a worker respawned while models.toml is broken;
    # - with several workers, what they share: each backend's max_concurrency slots, the
    #   counts of rates kept in memory, the targets' health, and each worker's metrics.
    run_dir = Path(tempfile.mkdtemp(prefix="gateway-run-"))
    os.environ[LAST_GOOD_ENV] = str(run_dir / "last-good")
    (run_dir / "last-good").mkdir(mode=0o700)
    if args.workers > 1:
        os.environ[SHARED_DIR_ENV] = str(run_dir / "shared")
        (run_dir / "shared").mkdir()
    else:
        os.environ.pop(SHARED_DIR_ENV, None)
    raise_open_files_limit()
    server = Granian("gateway.app:create_app", **server_options(args))
    try:
        server.serve()
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    return 0


def _at_least_one(unit: str = "") -> Callable[[str], int]:
    """An argparse type: a whole number (of ``unit``), 1 or more."""

    def parse(text: str) -> int:
        try:
            number = int(text)
        except ValueError:
            number = 0
        if number < 1:
            raise argparse.ArgumentTypeError(f"expected a whole number{unit}, 1 or more, got {text!r}")
        return number

    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gateway", description="DGX LLM Chat Gateway")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the gateway under granian")
    serve.add_argument("--config", help="models.toml to serve (default: $GATEWAY_CONFIG or ./models.toml)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8080)
    serve.add_argument("--workers", type=_at_least_one(), default=1)
    serve.add_argument(
        "--shutdown-timeout", type=_at_least_one(" of seconds"), default=DEFAULT_SHUTDOWN_TIMEOUT_S, metavar="SECONDS",
        help=f"on SIGTERM or Ctrl-C, how long requests in flight may run on before a worker is stopped (default {DEFAULT_SHUTDOWN_TIMEOUT_S})",
    )
    serve.set_defaults(run=cmd_serve)

    check = sub.add_parser("check", help="validate a models.toml without serving (exit 1 listing every problem)")
    check.add_argument("config", nargs="?")
    check.set_defaults(run=cmd_check)

    models = sub.add_parser("models", help="print the alias table")
    models.add_argument("--config")
    models.add_argument("--markdown", action="store_true", help="markdown: the seed pages' tables, then every alias")
    models.add_argument("--rules", action="store_true", help="what each alias accepts, in words (with --markdown: one table)")
    models.set_defaults(run=cmd_models)
    add_keys_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args))
    except BrokenPipeError:
        # `gateway models | head`: the reader left; that is not an error of ours.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
