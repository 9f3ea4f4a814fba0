"""The benchmark script runs end to end (``scripts/bench.py --smoke``); no thresholds, CI machines vary."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness import ManagedProcess, free_port, local_client

REPO_ROOT = Path(__file__).resolve().parent.parent
BENCH_SCRIPT = REPO_ROOT / "scripts" / "bench.py"
NUMBER = r"-?[\d,]+(?:\.\d+)?"

# Each figure row: its label, and whether it has a direct number next to the gateway's.
FIGURE_ROWS = [
    (r"small, c=1: p50 latency \(ms\)", True),
    (r"small, c=64: req/s", True),
    (r"small, c=64: p99 latency \(ms\)", True),
    (r"small, c=64: gateway CPU per request \(µs\)", False),
    (r"16 streams \([^|]*\): TTFB p50 \(ms\)", True),
    (r"16 streams \([^|]*\): total p50 \(ms\)", True),
    (r"200 streams \([^|]*\): streams/s", True),
    (r"200 streams \([^|]*\): first byte p50 \(ms\)", True),
    (r"4 MB PNG image_url, c=4: p50 latency \(ms\)", True),
    (r"4 MB PNG image_url, c=4: gateway CPU per request \(µs\)", False),
    (r"4 MB PNG image_url, c=4: gateway peak RSS \(MiB\)", False),
    (r"4 MB PNG image_url, c=4: bare granian app p50 latency \(ms\)", True),
    (r"4 MB PNG image_url, c=4: bare granian app CPU per request \(µs\)", False),
    (r"4 MB PNG image_url, c=4: bare granian proxy p50 latency \(ms\)", True),
    (r"4 MB PNG image_url, c=4: bare granian proxy CPU per request \(µs\)", False),
    (r"20 MB PNG \(decoded\) image_url, c=2: p50 latency \(ms\)", True),
    (r"20 MB PNG \(decoded\) image_url, c=2: gateway CPU per request \(µs\)", False),
    (r"20 MB PNG \(decoded\) image_url, c=2: gateway peak RSS \(MiB\)", False),
    (r"20 MB PNG \(decoded\) image_url, c=2: gateway memory per image in flight \(× its \d+ MiB body\)", False),
    (r"40 open streams \([^|]*\): streams/s", True),
    (r"40 open streams \([^|]*\): first byte p50 \(ms\)", True),
    (r"40 open streams \([^|]*\): gateway memory per open stream \(KiB\)", False),
]


def run_smoke(json_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``bench.py --smoke ARGS --json JSON_PATH``, as ``.venv/bin/python scripts/bench.py`` would run."""
    # The venv's bin first on PATH, as `.venv/bin/python scripts/bench.py` would have it.
    env = dict(os.environ, PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    return subprocess.run(
        [sys.executable, str(BENCH_SCRIPT), "--smoke", *args, "--json", str(json_path)],
        check=False, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=100,
    )


def report_rows(stdout: str) -> list[str]:
    """The figure rows of the report's table (no header, no rule)."""
    return [line for line in stdout.splitlines() if line.startswith("| ") and "---" not in line][1:]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess[str], Path]:
    json_path = tmp_path_factory.mktemp("bench") / "bench.json"
    return run_smoke(json_path, "--scale", "40"), json_path


def test_smoke_run_exits_zero(smoke_run: tuple[subprocess.CompletedProcess[str], Path]) -> None:
    """A smoke run finishes cleanly."""
    done, _ = smoke_run
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]


@pytest.mark.parametrize(("label", "has_direct"), FIGURE_ROWS)
def test_every_figure_row_has_numbers(
    smoke_run: tuple[subprocess.CompletedProcess[str], Path], label: str, has_direct: bool
) -> None:
    """Every figure of the report appears as a table row with the gateway's number (and the direct one)."""
    done, _ = smoke_run
    direct = NUMBER if has_direct else "—"
    row = re.compile(rf"^\| {label} \| {direct} \| {NUMBER} \| [^|]+ \|$", re.MULTILINE)
    assert row.search(done.stdout), f"no row for {label!r} in:\n{done.stdout}"


def test_report_names_its_load_generator(smoke_run: tuple[subprocess.CompletedProcess[str], Path]) -> None:
    """The report says which load generator made the numbers."""
    done, _ = smoke_run
    assert re.search(r"^load generator: (wrk|python asyncio\+aiohttp)", done.stdout, re.MULTILINE), done.stdout


def test_json_holds_every_figure(smoke_run: tuple[subprocess.CompletedProcess[str], Path]) -> None:
    """--json writes every figure with a gateway number, and the raw per-phase results."""
    _, json_path = smoke_run
    document = json.loads(json_path.read_text())
    assert len(document["figures"]) == len(FIGURE_ROWS)
    assert all(isinstance(figure["gateway"], (int, float)) for figure in document["figures"])
    assert set(document["phases"]) == {
        "small_c1", "small_c64", "streams", "slow_streams", "image", "image_floor", "image_forwarder", "big_image", "scale"
    }


def test_only_runs_and_reports_the_phases_named(tmp_path: Path) -> None:
    """--only image runs that phase alone: its three rows are reported, no other phase's."""
    json_path = tmp_path / "bench.json"
    done = run_smoke(json_path, "--only", "image")
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    assert set(json.loads(json_path.read_text())["phases"]) == {"image"}
    rows = report_rows(done.stdout)
    assert len(rows) == 3 and all(row.startswith("| 4 MB PNG image_url, c=4:") for row in rows), done.stdout
    assert not any("bare granian" in row for row in rows), done.stdout


@pytest.mark.parametrize(
    ("phase", "side", "label"),
    [("image_floor", "floor", "bare granian app"), ("image_forwarder", "forwarder", "bare granian proxy")],
)
def test_floor_phases_measure_their_bare_server(tmp_path: Path, phase: str, side: str, label: str) -> None:
    """--only PHASE sends the image requests to that bare server, not the gateway, and reports them as its rows."""
    json_path = tmp_path / "bench.json"
    done = run_smoke(json_path, "--only", phase)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    phases = json.loads(json_path.read_text())["phases"]
    assert set(phases) == {phase} and set(phases[phase]) == {"direct", side}
    measured = phases[phase][side]
    assert measured["requests"] > 0 and not measured["errors"]
    assert measured["gateway"]["cpu_s"] > 0  # the bare server's own process tree
    rows = report_rows(done.stdout)
    assert len(rows) == 2 and all(label in row for row in rows), done.stdout


@pytest.fixture
def fast_upstream() -> Iterator[str]:
    port = free_port()
    upstream = ManagedProcess(
        [sys.executable, str(REPO_ROOT / "scripts" / "fast_upstream.py"), "--port", str(port)],
        name="fast-upstream", base_url=f"http://127.0.0.1:{port}",
    )
    try:
        upstream.wait_ready("/stats", timeout_s=15)
        yield f"http://127.0.0.1:{port}"
    finally:
        upstream.cleanup()


def test_bare_proxy_sends_the_whole_body_and_relays_the_answer(fast_upstream: str) -> None:
    """``floor_app.py --forward``: the upstream gets each body whole, in pieces or not, and the client its answer."""
    port = free_port()
    proxy = ManagedProcess(
        [sys.executable, str(REPO_ROOT / "scripts" / "floor_app.py"), "--port", str(port),
         "--forward", f"{fast_upstream}/v1/chat/completions"],
        name="bare-proxy", base_url=f"http://127.0.0.1:{port}",
    )
    try:
        proxy.wait_ready("/", timeout_s=30)
        with local_client(timeout_s=30) as client:
            before = client.get(f"{fast_upstream}/stats").json()
            bodies = [
                json.dumps({"model": "m", "messages": [{"role": "user", "content": text}]}).encode()
                for text in ("hi", "x" * 3_000_000)  # the large one reaches the app in several pieces
            ]
            for body in bodies * 2:  # the second round reuses the kept-alive upstream connection
                answer = client.post(f"http://127.0.0.1:{port}/v1/chat/completions", content=body)
                assert answer.status_code == 200, answer.text
                assert answer.json()["object"] == "chat.completion"
            after = client.get(f"{fast_upstream}/stats").json()
    finally:
        proxy.cleanup()
    assert after["chat_requests"] - before["chat_requests"] == 4
    assert after["body_bytes"] - before["body_bytes"] == 2 * sum(map(len, bodies))


def test_only_refuses_an_unknown_phase() -> None:
    """A phase name that does not exist is refused before anything starts, naming it."""
    done = subprocess.run(
        [sys.executable, str(BENCH_SCRIPT), "--only", "image,imgae"],
        check=False, cwd=REPO_ROOT, capture_output=True, text=True, timeout=30,
    )
    assert done.returncode == 2
    assert "no phase named imgae" in done.stderr
