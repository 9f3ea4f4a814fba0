#!/usr/bin/env python3
"""The gateway's own benchmark: what the gateway adds on top of a direct call.

Usage: ``.venv/bin/python scripts/bench.py [--duration 10] [--workers 2] [--scale 2000] [--only image] [--smoke] [--json PATH]``

How it works:

1. Start ``scripts/fast_upstream.py`` (a cheap OpenAI-compatible stand-in) and
   ``gateway serve`` on a ``models.toml`` generated in a temp dir: one backend
   at the upstream, alias ``bench-model`` (text and image) and
   ``bench-model-slow`` (the same upstream, paced at 50 ms per chunk through
   the upstream's ``model@NxMS`` convention), a client key in
   ``GATEWAY_API_KEYS``. Check one request of each kind end to end.
2. Run every phase twice, back to back: the load generator straight at the
   upstream ("direct"), then through the gateway. The machine may be busy, so
   only the differences and ratios between the two are meaningful.
3. While the gateway runs a phase, read its process tree's CPU time
   (utime+stime in ``/proc/PID/stat``) and, for the image phase, its peak RSS
   (VmHWM summed over the tree after ``clear_refs``, and a 10 Hz VmRSS sample).
4. Print a markdown table (figure | direct | gateway | overhead/ratio) and
   optionally write the raw numbers as JSON.
5. Phase ``image_floor`` sends the image requests to ``scripts/floor_app.py``
   instead: a bare ASGI app that only reads the body, under the gateway's own
   granian settings. Its row is granian's cost of receiving the body, which the
   gateway pays before it does anything; the rest of the image figure is the
   gateway's own work. Phase ``image_forwarder`` sends them to the same app
   run as a bare proxy (``--forward``): it reads the whole body, then sends it
   on to the upstream as it came. Its row is the least any proxy pays that
   judges a request before sending it, as the gateway does.
6. Phase ``big_image`` sends a 20 MB image (decoded: the size models.toml
   allows by default), 2 at a time: what the gateway's memory grows by per
   image in flight, as a multiple of the request body.

Non-streaming phases use ``wrk`` (with ``scripts/wrk_post.lua``) when it is on
PATH, else an asyncio+aiohttp client; streams always use the aiohttp client.
Every load loop is bounded by time and by count, every wait has a timeout, and
every process this script starts runs in its own process group, which is
stopped on exit, on errors and on Ctrl-C. Traffic goes to 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import functools
import json
import math
import os
import random
import re
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import zlib
from collections import Counter
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

SCRIPTS_DIR = Path(__file__).resolve().parent
UPSTREAM_SCRIPT = SCRIPTS_DIR / "fast_upstream.py"
WRK_SCRIPT = SCRIPTS_DIR / "wrk_post.lua"
HOST = "127.0.0.1"  # the only address this script talks to
CHAT_PATH = "/v1/chat/completions"
API_KEY = "sk-bench"
MODEL = "bench-model"
SLOW_MODEL = "bench-model-slow"
IDLE_MODEL = "bench-model-idle"

START_TIMEOUT_S = 60.0
STOP_GRACE_S = 8.0
REQUEST_TIMEOUT_S = 30.0
DRAIN_TIMEOUT_S = 60.0  # a phase may run this long past its duration before it is cut


@dataclass(frozen=True)
class Shape:
    """What the phases send; the same in a smoke run, only durations and caps shrink."""

    small_conc: tuple[int, int] = (1, 64)
    stream_conc: int = 16
    stream_chunks: int = 20
    stream_interval_ms: float = 1.0
    slow_conc: int = 200
    slow_chunks: int = 20
    slow_interval_ms: float = 50.0
    image_conc: int = 4
    image_mb: float = 4.0
    # A 20 MB image (decoded, under the default max_image_bytes of 20 MiB): ~27 MB of JSON.
    big_image_conc: int = 2
    big_image_mb: float = 20.0
    # --scale N: N concurrent streams that are mostly idle (a chunk a second), for
    # "does one worker hold them" and the memory each open stream costs. 0: skipped.
    scale_conc: int = 0
    scale_chunks: int = 5
    scale_interval_ms: float = 1000.0


@dataclass(frozen=True)
class Settings:
    """How long and how hard to run, from the command line."""

    duration_s: float
    warmup_s: float
    max_requests_per_s: int  # count bound of a non-streaming phase, per second of duration
    workers: int
    gateway_cmd: tuple[str, ...]
    smoke: bool
    shape: Shape = Shape()


class BenchError(RuntimeError):
    """The benchmark cannot go on; the message says why (with a log tail)."""


# ---------------------------------------------------------------- processes
def tree_pids(root: int) -> list[int]:
    """``root`` and all its descendants, from the parent links in /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, ()))
    return found


def cpu_seconds(pids: Sequence[int]) -> float:
    """utime + stime of ``pids``, summed (processes that are gone count as 0)."""
    ticks = 0
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def memory_kib(pids: Sequence[int], key: str) -> int:
    """A ``/proc/PID/status`` field in kB (VmRSS, VmHWM), summed over ``pids``."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as status:
                for line in status:
                    if line.startswith(key + ":"):
                        total += int(line.split()[1])
                        break
        except OSError:
            continue
    return total


def reset_peak_rss(pids: Sequence[int]) -> None:
    """Reset VmHWM to the current RSS, so it measures this phase's peak only."""
    for pid in pids:
        try:
            Path(f"/proc/{pid}/clear_refs").write_text("5")
        except OSError:
            pass  # an older kernel or a process that just exited: the sampler still covers it


class Child:
    """A process this script started, in its own process group, with output in a log file."""

    def __init__(self, name: str, argv: Sequence[str], env: dict[str, str], workdir: Path) -> None:
        self.name = name
        self.log_path = workdir / f"{name}.log"
        with open(self.log_path, "wb") as log:
            try:
                # A new session: Ctrl-C in the terminal reaches only us, and we stop the whole group.
                self.popen = subprocess.Popen(
                    list(argv),
                    env=env,
                    cwd=workdir,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            except OSError as exc:
                raise BenchError(f"cannot start the {name} ({shlex.join(argv)}): {exc}") from exc
        self.pid = self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def pids(self) -> list[int]:
        return tree_pids(self.pid) if self.alive() else []

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.strip().splitlines()[-lines:])

    def stop(self) -> None:
        """SIGTERM to our process group, then SIGKILL to whatever of it is left."""
        for sig, grace_s in ((signal.SIGTERM, STOP_GRACE_S), (signal.SIGKILL, 3.0)):
            try:
                os.killpg(self.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.popen.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                continue
            if not _group_alive(self.pid):
                break


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def local_opener() -> urllib.request.OpenerDirector:
    # No proxy from the environment may ever see this loopback traffic.
    return urllib.request.build_opener(urllib.request.ProxyHandler({}))


def http_call(url: str, body: bytes | None = None, timeout_s: float = REQUEST_TIMEOUT_S) -> tuple[int, bytes]:
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    request = urllib.request.Request(url, data=body, headers=headers, method="POST" if body else "GET")
    try:
        with local_opener().open(request, timeout=timeout_s) as response:
            return int(response.status), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def start_upstream(workdir: Path, shape: Shape) -> tuple[Child, int]:
    argv = [
        sys.executable,
        str(UPSTREAM_SCRIPT),
        "--port",
        "0",
        "--chunks",
        str(shape.stream_chunks),
        "--interval-ms",
        f"{shape.stream_interval_ms:g}",
    ]
    child = Child("upstream", argv, dict(os.environ), workdir)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        match = re.search(r"listening on http://127\.0\.0\.1:(\d+)", child.log_tail(5))
        if match:
            return child, int(match.group(1))
        if not child.alive():
            break
        time.sleep(0.05)
    raise BenchError(f"the upstream did not start:\n{child.log_tail()}")


def write_config(workdir: Path, upstream_port: int, shape: Shape) -> Path:
    image_limit = 64 * 1024 * 1024
    slow_upstream_model = f"{MODEL}@{shape.slow_chunks}x{shape.slow_interval_ms:g}"
    text = f"""# generated by scripts/bench.py
[defaults]
timeout_s = 600
max_image_bytes = {image_limit}

[server]
max_request_bytes = {2 * image_limit}

[auth]
# the client key comes from GATEWAY_API_KEYS

[backends.bench]
base_url = "http://{HOST}:{upstream_port}/v1"

[models."{MODEL}"]
backend = "bench"
model = "{MODEL}"
input = ["text", "image"]
max_image_bytes = {image_limit}

[models."{SLOW_MODEL}"]
backend = "bench"
model = "{slow_upstream_model}"

[models."{IDLE_MODEL}"]
backend = "bench"
model = "{idle_upstream_model(shape)}"
"""
    path = workdir / "models.toml"
    path.write_text(text)
    return path


def idle_upstream_model(shape: Shape) -> str:
    return f"{MODEL}@{shape.scale_chunks}x{shape.scale_interval_ms:g}"


def start_gateway(workdir: Path, config: Path, settings: Settings) -> tuple[Child, int]:
    port = free_port()
    argv = [*settings.gateway_cmd, "serve", "--config", str(config), "--host", HOST, "--port", str(port)]
    argv += ["--workers", str(settings.workers)]
    env = dict(os.environ, GATEWAY_API_KEYS=API_KEY, NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost")
    child = Child("gateway", argv, env, workdir)
    return wait_ready(child, f"http://{HOST}:{port}/readyz", "the gateway"), port


def wait_ready(child: Child, url: str, what: str) -> Child:
    """``child`` once ``url`` answers 200; BenchError if it exits or takes too long."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if not child.alive():
            raise BenchError(f"{what} exited at start:\n{child.log_tail()}")
        try:
            if http_call(url, timeout_s=2)[0] == 200:
                return child
        except OSError:
            pass
        time.sleep(0.1)
    raise BenchError(f"{what} was not ready in {START_TIMEOUT_S:g} s:\n{child.log_tail()}")


def start_floor(workdir: Path, forward_url: str | None = None) -> tuple[Child, int]:
    """``scripts/floor_app.py``: a bare ASGI app under the gateway's granian settings (a bare proxy to ``forward_url``)."""
    port = free_port()
    argv = [sys.executable, str(SCRIPTS_DIR / "floor_app.py"), "--host", HOST, "--port", str(port)]
    argv += ["--forward", forward_url] if forward_url else []
    name = "forwarder" if forward_url else "floor"
    child = Child(name, argv, dict(os.environ), workdir)
    return wait_ready(child, f"http://{HOST}:{port}/", f"the bare {'proxy' if forward_url else 'app'}"), port


# ------------------------------------------------------------------ payloads
def make_png(payload_bytes: int, seed: int = 7) -> bytes:
    """A real PNG of random pixels, about ``payload_bytes`` long (stored zlib: random data does not compress)."""
    width = max(16, int(math.sqrt(payload_bytes / 3)))
    rows = random.Random(seed)
    raw = b"".join(b"\x00" + rows.randbytes(3 * width) for _ in range(width))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, width, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 0)) + chunk(b"IEND", b"")


@dataclass(frozen=True)
class Bodies:
    """Request bodies per target: the gateway is asked for an alias, the upstream for its model id."""

    small: bytes
    stream: bytes
    slow: bytes
    idle: bytes
    image: bytes
    big_image: bytes


def _encode(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def make_bodies(model: str, slow_model: str, idle_model: str, image_uri: str, big_image_uri: str) -> Bodies:
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Say hello in one short sentence."},
    ]
    small = {"model": model, "messages": messages, "max_tokens": 32}
    stream_extra = {"stream": True, "stream_options": {"include_usage": True}}

    def image(uri: str) -> bytes:
        parts = [{"type": "text", "text": "What is in this image?"}, {"type": "image_url", "image_url": {"url": uri}}]
        return _encode({"model": model, "max_tokens": 32, "messages": [{"role": "user", "content": parts}]})

    return Bodies(
        small=_encode(small),
        stream=_encode({**small, **stream_extra}),
        slow=_encode({**small, "model": slow_model, **stream_extra}),
        idle=_encode({**small, "model": idle_model, **stream_extra}),
        image=image(image_uri),
        big_image=image(big_image_uri),
    )


def image_uri(megabytes: float) -> str:
    """A PNG data URI of about ``megabytes`` MB of base64."""
    return png_uri(make_png(int(megabytes * 1e6 * 3 / 4)))


def png_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


# ----------------------------------------------------------- load generators
@dataclass
class LoadResult:
    """One phase on one target. Latencies in ms; ``ttfb`` only for streams."""

    requests: int = 0
    seconds: float = 0.0
    rate: float = math.nan
    p50: float = math.nan
    p90: float = math.nan
    p99: float = math.nan
    ttfb_p50: float = math.nan
    ttfb_p99: float = math.nan
    errors: dict[str, int] = field(default_factory=dict)
    gateway: dict[str, float] = field(default_factory=dict)


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def run_wrk(url: str, body_file: Path, conc: int, duration_s: float, max_requests: int) -> LoadResult:
    env = dict(
        os.environ,
        BENCH_BODY_FILE=str(body_file),
        BENCH_MAX_REQ=str(max_requests),
        BENCH_HEADERS=f"Authorization: Bearer {API_KEY}",
    )
    seconds = max(1, round(duration_s))  # wrk takes whole seconds
    argv = ["wrk", "-t1", f"-c{conc}", f"-d{seconds}s", "--timeout", f"{REQUEST_TIMEOUT_S:g}s"]
    argv += ["-s", str(WRK_SCRIPT), url]
    try:
        done = subprocess.run(
            argv, check=False, env=env, capture_output=True, text=True, timeout=seconds + DRAIN_TIMEOUT_S
        )
    except subprocess.TimeoutExpired:
        return LoadResult(errors={"wrk timed out": 1})
    match = re.search(r"BENCHJSON (\{.*\})", done.stdout)
    if match is None:
        return LoadResult(errors={f"wrk gave no result: {(done.stdout + done.stderr)[-200:]}": 1})
    raw = json.loads(match.group(1))
    secs = raw["duration_us"] / 1e6
    errors = {k: raw[k] for k in ("connect", "read", "write", "status", "timeout") if raw[k]}
    ok = raw["requests"] - raw["status"]
    return LoadResult(
        requests=raw["requests"],
        seconds=secs,
        rate=ok / secs if secs else math.nan,
        p50=raw["p50_us"] / 1000,
        p90=raw["p90_us"] / 1000,
        p99=raw["p99_us"] / 1000,
        errors={("non-2xx" if k == "status" else k): v for k, v in errors.items()},
    )


T = TypeVar("T")


def _run_async(coro: Coroutine[Any, Any, T]) -> T:
    try:
        import uvloop

        return uvloop.run(coro)
    except ImportError:
        return asyncio.run(coro)


def _session(conc: int) -> Any:
    import aiohttp

    connector = aiohttp.TCPConnector(limit=conc, limit_per_host=0)
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S * 2, sock_connect=10)
    # trust_env=False (the default): no proxy for loopback traffic.
    return aiohttp.ClientSession(connector=connector, timeout=timeout, auto_decompress=False)


async def run_workers(worker: Callable[[], Coroutine[Any, Any, None]], count: int, limit_s: float) -> bool:
    """Run ``count`` copies of ``worker``; False if they were cut at ``limit_s``.

    A task group, unlike gather, cancels and awaits every worker when one fails or on Ctrl-C.
    """
    try:
        async with asyncio.timeout(limit_s), asyncio.TaskGroup() as group:
            for _ in range(count):
                group.create_task(worker())
    except TimeoutError:
        return False
    return True


async def run_phase(
    worker: Callable[[Any], Coroutine[Any, Any, None]], conc: int, duration_s: float, errors: Counter[str]
) -> float:
    """Run ``conc`` workers on one session for the phase (plus a drain); its seconds, cuts counted in ``errors``."""
    async with _session(conc) as session:
        t0 = time.perf_counter()
        if not await run_workers(lambda: worker(session), conc, duration_s + DRAIN_TIMEOUT_S):
            errors["phase cut at its time limit"] += 1
        return time.perf_counter() - t0


class Budget:
    """The shared bounds of one phase: stop starting requests at the deadline or at the cap."""

    def __init__(self, duration_s: float, max_requests: int) -> None:
        self.deadline = time.perf_counter() + duration_s
        self.left = max_requests

    def take(self) -> bool:
        if self.left <= 0 or time.perf_counter() >= self.deadline:
            return False
        self.left -= 1
        return True


async def _plain_load(url: str, body: bytes, conc: int, duration_s: float, max_requests: int) -> LoadResult:
    import aiohttp

    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    budget = Budget(duration_s, max_requests)

    async def worker(session: aiohttp.ClientSession) -> None:
        while budget.take():
            t0 = time.perf_counter()
            try:
                async with session.post(url, data=body, headers=headers) as response:
                    await response.read()
                    status = response.status
            except (TimeoutError, aiohttp.ClientError) as exc:
                errors[type(exc).__name__] += 1
                await asyncio.sleep(0.01)  # a failing target must not turn this into a busy loop
                continue
            if status == 200:
                latencies.append((time.perf_counter() - t0) * 1000)
            else:
                errors[f"http {status}"] += 1

    seconds = await run_phase(worker, conc, duration_s, errors)
    return LoadResult(
        requests=len(latencies) + sum(errors.values()),
        seconds=seconds,
        rate=len(latencies) / seconds,
        p50=percentile(latencies, 0.5),
        p90=percentile(latencies, 0.9),
        p99=percentile(latencies, 0.99),
        errors=dict(errors),
    )


async def _stream_load(
    url: str, body: bytes, conc: int, duration_s: float, max_streams: int, min_events: int
) -> LoadResult:
    import aiohttp

    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json", "Accept": "text/event-stream"}
    ttfbs: list[float] = []
    totals: list[float] = []
    errors: Counter[str] = Counter()
    budget = Budget(duration_s, max_streams)

    worker_rates: list[float] = []

    async def one(session: aiohttp.ClientSession) -> bool:
        t0 = time.perf_counter()
        async with session.post(url, data=body, headers=headers) as response:
            if response.status != 200:
                await response.read()
                errors[f"http {response.status}"] += 1
                return False
            ttfb = None
            parts = []
            async for data in response.content.iter_any():
                if ttfb is None and b"data:" in data:
                    ttfb = time.perf_counter() - t0
                parts.append(data)
        total = time.perf_counter() - t0
        received = b"".join(parts)
        if ttfb is None or b"data: [DONE]" not in received or received.count(b"data:") < min_events:
            errors["incomplete stream"] += 1
            return False
        ttfbs.append(ttfb * 1000)
        totals.append(total * 1000)
        return True

    async def worker(session: aiohttp.ClientSession) -> None:
        completed, t0 = 0, time.perf_counter()
        while budget.take():
            try:
                completed += await one(session)
            except (TimeoutError, aiohttp.ClientError) as exc:
                errors[type(exc).__name__] += 1
                await asyncio.sleep(0.01)
        worker_rates.append(completed / (time.perf_counter() - t0))

    seconds = await run_phase(worker, conc, duration_s, errors)
    # The sum of each worker's own rate (its streams ÷ the time to its last one's end): the
    # phase's wall time is set by the one worker whose last stream started just before the
    # deadline, and with second-long streams that alone is a 20 % swing.
    return LoadResult(
        requests=len(totals) + sum(errors.values()),
        seconds=seconds,
        rate=sum(worker_rates),
        p50=percentile(totals, 0.5),
        p90=percentile(totals, 0.9),
        p99=percentile(totals, 0.99),
        ttfb_p50=percentile(ttfbs, 0.5),
        ttfb_p99=percentile(ttfbs, 0.99),
        errors=dict(errors),
    )


class PlainLoad:
    """Non-streaming load: wrk when it is installed (it costs far less CPU), else the aiohttp client."""

    def __init__(self, workdir: Path, use_wrk: bool, why_not_wrk: str = "") -> None:
        self.workdir = workdir
        self.use_wrk = use_wrk
        self.why_not_wrk = why_not_wrk
        self._files: dict[bytes, Path] = {}

    def describe(self) -> str:
        if not self.use_wrk:
            return f"python asyncio+aiohttp client ({self.why_not_wrk})"
        version = subprocess.run(["wrk", "-v"], check=False, capture_output=True, text=True, timeout=10).stdout.split()
        return f"wrk {version[1] if len(version) > 1 else '?'} (1 thread, scripts/wrk_post.lua)"

    def run(self, url: str, body: bytes, conc: int, duration_s: float, max_requests: int) -> LoadResult:
        if not self.use_wrk:
            return _run_async(_plain_load(url, body, conc, duration_s, max_requests))
        return run_wrk(url, self._body_file(body), conc, duration_s, max_requests)

    def _body_file(self, body: bytes) -> Path:
        path = self._files.get(body)
        if path is None:
            path = self.workdir / f"body-{len(self._files)}.json"
            path.write_bytes(body)
            self._files[body] = path
        return path


def run_streams(url: str, body: bytes, conc: int, duration_s: float, max_streams: int, min_events: int) -> LoadResult:
    return _run_async(_stream_load(url, body, conc, duration_s, max_streams, min_events))


# ----------------------------------------------------------------- measuring
class RssSampler(threading.Thread):
    """Sums VmRSS over a process tree 10 times a second; VmHWM misses nothing, this covers exited workers."""

    def __init__(self, root: Child) -> None:
        super().__init__(daemon=True)
        self.root = root
        self.peak_kib = 0
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.is_set():
            self.peak_kib = max(self.peak_kib, memory_kib(self.root.pids(), "VmRSS"))
            self.stopping.wait(0.1)


def measure_gateway(gateway: Child, phase: Callable[[], LoadResult]) -> LoadResult:
    """Run ``phase`` against the gateway and add the gateway's CPU time and peak RSS to its result."""
    pids = gateway.pids()
    rss_before_kib = memory_kib(pids, "VmRSS")
    reset_peak_rss(pids)
    cpu_before = cpu_seconds(pids)
    sampler = RssSampler(gateway)
    sampler.start()
    t0 = time.perf_counter()
    try:
        result = phase()
    finally:
        sampler.stopping.set()
        sampler.join(timeout=5)
    wall_s = time.perf_counter() - t0
    pids_after = gateway.pids()
    cpu_s = cpu_seconds(pids_after) - cpu_before
    peak_kib = max(memory_kib(pids_after, "VmHWM"), sampler.peak_kib)
    result.gateway = {
        "cpu_s": cpu_s,
        "cpu_pct": 100 * cpu_s / wall_s,
        "cpu_us_per_request": 1e6 * cpu_s / result.requests if result.requests else math.nan,
        "peak_rss_mib": peak_kib / 1024,
        "rss_before_mib": rss_before_kib / 1024,
        "alive": float(gateway.alive()),
    }
    return result


# -------------------------------------------------------------------- phases
@dataclass(frozen=True)
class Target:
    name: str
    url: str
    bodies: Bodies


@dataclass(frozen=True)
class Phase:
    key: str
    title: str
    run: Callable[[Target], LoadResult]
    side: str = "gateway"  # what is measured after the direct call: the gateway, the bare "floor" app or the bare "forwarder"


PHASE_KEYS = ("small_c1", "small_c64", "streams", "slow_streams", "image", "image_floor", "image_forwarder", "big_image", "scale")


def build_phases(settings: Settings, plain: PlainLoad) -> list[Phase]:
    shape, duration_s = settings.shape, settings.duration_s
    cap = int(settings.max_requests_per_s * duration_s)
    c1, c64 = shape.small_conc
    # A stream lasts at least chunks × interval, so these caps are out of reach of a working
    # target; they bound a broken one that answers every request at once.
    stream_cap = max(shape.stream_conc, int(1000 * duration_s))
    slow_cap = max(shape.slow_conc, int(shape.slow_conc * (duration_s + 2)))
    image_cap = max(shape.image_conc, int(2000 * duration_s))
    big_image_cap = max(shape.big_image_conc, int(200 * duration_s))
    scale_cap = int(shape.scale_conc * (duration_s + 2))
    scale = Phase(
        "scale",
        f"{shape.scale_conc} open streams",
        lambda t: run_streams(t.url, t.bodies.idle, shape.scale_conc, duration_s, scale_cap, shape.scale_chunks),
    )
    return [
        Phase("small_c1", f"small, c={c1}", lambda t: plain.run(t.url, t.bodies.small, c1, duration_s, cap)),
        Phase("small_c64", f"small, c={c64}", lambda t: plain.run(t.url, t.bodies.small, c64, duration_s, cap)),
        Phase(
            "streams",
            f"{shape.stream_conc} streams",
            lambda t: run_streams(
                t.url, t.bodies.stream, shape.stream_conc, duration_s, stream_cap, shape.stream_chunks
            ),
        ),
        Phase(
            "slow_streams",
            f"{shape.slow_conc} slow streams",
            lambda t: run_streams(t.url, t.bodies.slow, shape.slow_conc, duration_s, slow_cap, shape.slow_chunks),
        ),
        Phase(
            "image",
            f"{shape.image_mb:g} MB image, c={shape.image_conc}",
            lambda t: plain.run(t.url, t.bodies.image, shape.image_conc, duration_s, image_cap),
        ),
        Phase(
            "image_floor",
            f"{shape.image_mb:g} MB image, c={shape.image_conc}, bare app",
            lambda t: plain.run(t.url, t.bodies.image, shape.image_conc, duration_s, image_cap),
            side="floor",
        ),
        Phase(
            "image_forwarder",
            f"{shape.image_mb:g} MB image, c={shape.image_conc}, bare proxy",
            lambda t: plain.run(t.url, t.bodies.image, shape.image_conc, duration_s, image_cap),
            side="forwarder",
        ),
        Phase(
            "big_image",
            f"{shape.big_image_mb:g} MB image, c={shape.big_image_conc}",
            lambda t: plain.run(t.url, t.bodies.big_image, shape.big_image_conc, duration_s, big_image_cap),
        ),
    ] + ([scale] if shape.scale_conc else [])


def warm_up(target: Target, settings: Settings, plain: PlainLoad, streams: bool = True) -> None:
    """Open connections and fill caches on both sides before anything is timed."""
    seconds = settings.warmup_s
    plain.run(target.url, target.bodies.small, 16, seconds, int(settings.max_requests_per_s * seconds) + 16)
    if streams:
        run_streams(target.url, target.bodies.stream, 4, seconds, 200, settings.shape.stream_chunks)


def check_end_to_end(gateway: Target, upstream_url: str, shape: Shape) -> None:
    """One request of each kind through the gateway; the upstream must see each with its whole body."""
    status, data = http_call(gateway.url, gateway.bodies.small)
    if status != 200 or b'"content":"Hello' not in data.replace(b" ", b""):
        raise BenchError(f"non-streaming request through the gateway: HTTP {status} {data[:300]!r}")
    for body, chunks in ((gateway.bodies.stream, shape.stream_chunks), (gateway.bodies.slow, shape.slow_chunks)):
        result = run_streams(gateway.url, body, 1, 30, 1, chunks)
        if result.errors or not result.requests:
            raise BenchError(f"streaming request through the gateway failed: {result.errors}")
    before = json.loads(http_call(f"{upstream_url}/stats")[1])["body_bytes"]
    status, data = http_call(gateway.url, gateway.bodies.image, timeout_s=60)
    if status != 200:
        raise BenchError(f"image request through the gateway: HTTP {status} {data[:300]!r}")
    received = json.loads(http_call(f"{upstream_url}/stats")[1])["body_bytes"] - before
    if received < 0.9 * len(gateway.bodies.image):
        raise BenchError(f"the upstream got {received} of the image request's {len(gateway.bodies.image)} bytes")


def run_phases(
    phases: list[Phase], direct: Target, sides: dict[str, tuple[Target, Child]]
) -> dict[str, dict[str, LoadResult]]:
    """Every phase, direct then its side (the gateway or the bare app), back to back: each figure sits next to its floor."""
    results: dict[str, dict[str, LoadResult]] = {}
    for phase in phases:
        target, child = sides[phase.side]
        if not child.alive():
            raise BenchError(f"the {child.name} died before phase {phase.key}:\n{child.log_tail()}")
        direct_result = phase.run(direct)
        log(f"{phase.title:28} direct  {_summary(direct_result)}")
        side_result = measure_gateway(child, functools.partial(phase.run, target))
        log(f"{phase.title:28} {phase.side:7} {_summary(side_result)}")
        results[phase.key] = {"direct": direct_result, phase.side: side_result}
    return results


def _summary(result: LoadResult) -> str:
    text = f"{result.rate:9.1f}/s p50 {result.p50:8.2f} ms"
    if not math.isnan(result.ttfb_p50):
        text += f" ttfb {result.ttfb_p50:7.2f} ms"
    return text + (f" errors {result.errors}" if result.errors else "")


# -------------------------------------------------------------------- report
@dataclass(frozen=True)
class Figure:
    """One row of the report: the number on each side and how they compare."""

    figure: str
    direct: float
    gateway: float
    kind: str  # "added" (gateway − direct, ms), "ratio" (gateway ÷ direct) or "gateway" (no direct side)
    digits: int = 2

    @property
    def comparison(self) -> float:
        if self.kind == "added":
            return self.gateway - self.direct
        if self.kind == "ratio":
            return self.gateway / self.direct if self.direct else math.nan
        return math.nan

    def cells(self) -> list[str]:
        direct = "—" if self.kind == "gateway" else _number(self.direct, self.digits)
        if self.kind == "added":
            compare = "—" if math.isnan(self.comparison) else f"{self.comparison:+.{self.digits}f} ms"
        elif self.kind == "ratio":
            compare = "—" if math.isnan(self.comparison) else f"×{self.comparison:.3f}"
        else:
            compare = "—"
        return [self.figure, direct, _number(self.gateway, self.digits), compare]


def _number(value: float, digits: int) -> str:
    return "—" if value is None or math.isnan(value) else f"{value:,.{digits}f}"


def figures(results: dict[str, dict[str, LoadResult]], shape: Shape, big_body_bytes: int) -> list[Figure]:
    def pair(key: str) -> tuple[LoadResult, LoadResult]:
        return results[key]["direct"], results[key]["gateway"]

    c1, c64 = shape.small_conc
    streams = f"{shape.stream_conc} streams ({shape.stream_chunks} chunks {shape.stream_interval_ms:g} ms apart)"
    slow = f"{shape.slow_conc} streams ({shape.slow_chunks} chunks {shape.slow_interval_ms:g} ms apart)"
    image = f"{shape.image_mb:g} MB PNG image_url, c={shape.image_conc}"
    rows: list[Figure] = []
    if "small_c1" in results:
        d1, g1 = pair("small_c1")
        rows.append(Figure(f"small, c={c1}: p50 latency (ms)", d1.p50, g1.p50, "added"))
    if "small_c64" in results:
        d64, g64 = pair("small_c64")
        cpu_us = g64.gateway["cpu_us_per_request"]
        rows += [
            Figure(f"small, c={c64}: req/s", d64.rate, g64.rate, "ratio", 0),
            Figure(f"small, c={c64}: p99 latency (ms)", d64.p99, g64.p99, "added"),
            Figure(f"small, c={c64}: gateway CPU per request (µs)", math.nan, cpu_us, "gateway", 0),
        ]
    if "streams" in results:
        ds, gs = pair("streams")
        rows += [
            Figure(f"{streams}: TTFB p50 (ms)", ds.ttfb_p50, gs.ttfb_p50, "added"),
            Figure(f"{streams}: total p50 (ms)", ds.p50, gs.p50, "added"),
        ]
    if "slow_streams" in results:
        dl, gl = pair("slow_streams")
        rows += [
            Figure(f"{slow}: streams/s", dl.rate, gl.rate, "ratio", 1),
            Figure(f"{slow}: first byte p50 (ms)", dl.ttfb_p50, gl.ttfb_p50, "added"),
        ]
    if "image" in results:
        di, gi = pair("image")
        rows += [
            Figure(f"{image}: p50 latency (ms)", di.p50, gi.p50, "added", 1),
            Figure(f"{image}: gateway CPU per request (µs)", math.nan, gi.gateway["cpu_us_per_request"], "gateway", 0),
            Figure(f"{image}: gateway peak RSS (MiB)", math.nan, gi.gateway["peak_rss_mib"], "gateway", 0),
        ]
    if "image_floor" in results:
        # The same requests to a bare ASGI app under the gateway's granian settings: what
        # receiving the body costs any app there, before the gateway does anything.
        df, ff = results["image_floor"]["direct"], results["image_floor"]["floor"]
        rows += [
            Figure(f"{image}: bare granian app p50 latency (ms)", df.p50, ff.p50, "added", 1),
            Figure(f"{image}: bare granian app CPU per request (µs)", math.nan, ff.gateway["cpu_us_per_request"], "gateway", 0),
        ]
    if "image_forwarder" in results:
        # The same app as a bare proxy: it reads the body, then sends it on as it came. The
        # least a proxy that judges a request before sending it pays, the upstream's time included.
        dw, fw = results["image_forwarder"]["direct"], results["image_forwarder"]["forwarder"]
        rows += [
            Figure(f"{image}: bare granian proxy p50 latency (ms)", dw.p50, fw.p50, "added", 1),
            Figure(f"{image}: bare granian proxy CPU per request (µs)", math.nan, fw.gateway["cpu_us_per_request"], "gateway", 0),
        ]
    if "big_image" in results:
        db, gb = pair("big_image")
        big = f"{shape.big_image_mb:g} MB PNG (decoded) image_url, c={shape.big_image_conc}"
        # What the gateway's memory grew by during the phase, per image in flight, in request bodies.
        body_mib = big_body_bytes / 2**20
        per_image = (gb.gateway["peak_rss_mib"] - gb.gateway["rss_before_mib"]) / shape.big_image_conc / body_mib
        rows += [
            Figure(f"{big}: p50 latency (ms)", db.p50, gb.p50, "added", 1),
            Figure(f"{big}: gateway CPU per request (µs)", math.nan, gb.gateway["cpu_us_per_request"], "gateway", 0),
            Figure(f"{big}: gateway peak RSS (MiB)", math.nan, gb.gateway["peak_rss_mib"], "gateway", 0),
            Figure(f"{big}: gateway memory per image in flight (× its {body_mib:.0f} MiB body)", math.nan, per_image, "gateway", 2),
        ]
    if "scale" in results:
        dn, gn = pair("scale")
        opened = f"{shape.scale_conc} open streams ({shape.scale_chunks} chunks {shape.scale_interval_ms:g} ms apart)"
        # The peak over the phase, less the worker's RSS before it, shared out over the open streams.
        per_stream_kib = (gn.gateway["peak_rss_mib"] - gn.gateway["rss_before_mib"]) * 1024 / shape.scale_conc
        rows += [
            Figure(f"{opened}: streams/s", dn.rate, gn.rate, "ratio", 1),
            Figure(f"{opened}: first byte p50 (ms)", dn.ttfb_p50, gn.ttfb_p50, "added"),
            Figure(f"{opened}: gateway memory per open stream (KiB)", math.nan, per_stream_kib, "gateway", 0),
        ]
    return rows


def render(rows: list[Figure], results: dict[str, dict[str, LoadResult]], meta: dict[str, Any]) -> str:
    lines = [
        f"Gateway benchmark: {meta['workers']} worker(s), {meta['duration_s']:g} s per phase"
        + (" (smoke run: numbers mean nothing)" if meta["smoke"] else ""),
        f"load generator: {meta['plain_load']} for non-streaming phases; python asyncio+aiohttp client for streams",
        f"machine: {meta['cpus']} CPUs, load average {meta['loadavg_before']} before, {meta['loadavg_after']} after",
        "",
        "| figure | direct | gateway | overhead/ratio |",
        "|---|---|---|---|",
    ]
    lines += ["| " + " | ".join(row.cells()) + " |" for row in rows]
    lines.append("")
    lines.append("overhead = gateway − direct; ratio = gateway ÷ direct, both measured back to back in this run.")
    errors = [
        f"{key} {side}: {result.errors}"
        for key, sides in results.items()
        for side, result in sides.items()
        if result.errors
    ]
    lines.append("errors: " + ("; ".join(errors) if errors else "none"))
    return "\n".join(lines) + "\n"


def to_json(rows: list[Figure], results: dict[str, dict[str, LoadResult]], meta: dict[str, Any]) -> str:
    def clean(value: Any) -> Any:
        if isinstance(value, float) and math.isnan(value):
            return None
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        return value

    document = {
        "meta": meta,
        "figures": [clean({**asdict(row), "comparison": row.comparison}) for row in rows],
        "phases": {key: {side: clean(asdict(r)) for side, r in sides.items()} for key, sides in results.items()},
    }
    return json.dumps(document, indent=1, ensure_ascii=False)


# ---------------------------------------------------------------------- main
_T0 = time.monotonic()


def log(message: str) -> None:
    print(f"[{time.monotonic() - _T0:6.1f}s] {message}", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None) -> tuple[Settings, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per phase and target (10)")
    parser.add_argument("--workers", type=int, default=1, help="gateway worker processes (1)")
    parser.add_argument("--smoke", action="store_true", help="~1 s per phase, small caps: proves the script runs")
    parser.add_argument("--json", metavar="PATH", help="also write the raw numbers here")
    parser.add_argument(
        "--gateway-cmd",
        help="command that runs the gateway CLI (default: this python -m gateway)",
    )
    parser.add_argument("--no-wrk", action="store_true", help="use the python client even when wrk is installed")
    parser.add_argument(
        "--scale", type=int, default=0, metavar="N",
        help="also hold N concurrent, mostly idle streams (a chunk a second; 2000 for the scale figure)",
    )
    parser.add_argument(
        "--only", metavar="PHASES",
        help=f"run only these phases, comma-separated ({', '.join(PHASE_KEYS)}); for profiling one of them",
    )
    args = parser.parse_args(argv)
    unknown = set(args.only.split(",")) - set(PHASE_KEYS) if args.only else set()
    if unknown:
        parser.error(f"--only: no phase named {', '.join(sorted(unknown))}")
    gateway_cmd = tuple(shlex.split(args.gateway_cmd)) if args.gateway_cmd else (sys.executable, "-m", "gateway")
    if args.smoke:
        shape = Shape(scale_conc=args.scale, scale_chunks=2, scale_interval_ms=200)
        settings = Settings(1.0, 0.3, 2_000, args.workers, gateway_cmd, True, shape)
    else:
        settings = Settings(args.duration, 2.0, 200_000, args.workers, gateway_cmd, False, Shape(scale_conc=args.scale))
    return settings, args


def _loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def run(settings: Settings, args: argparse.Namespace, workdir: Path, started: list[Child]) -> int:
    shape = settings.shape
    has_wrk = shutil.which("wrk") is not None
    why_not_wrk = "--no-wrk" if args.no_wrk else "wrk is not on PATH"
    plain = PlainLoad(workdir, use_wrk=has_wrk and not args.no_wrk, why_not_wrk=why_not_wrk)
    meta: dict[str, Any] = {
        "workers": settings.workers,
        "duration_s": settings.duration_s,
        "smoke": settings.smoke,
        "plain_load": plain.describe(),
        "cpus": os.cpu_count(),
        "loadavg_before": _loadavg(),
        "shape": asdict(shape),
    }
    uri = image_uri(shape.image_mb)
    big_uri = png_uri(make_png(int(shape.big_image_mb * 1e6)))
    upstream, upstream_port = start_upstream(workdir, shape)
    started.append(upstream)
    config = write_config(workdir, upstream_port, shape)
    gateway_child, gateway_port = start_gateway(workdir, config, settings)
    started.append(gateway_child)
    log(f"upstream :{upstream_port}, gateway :{gateway_port} ({settings.workers} worker(s)); {meta['plain_load']}")

    upstream_url = f"http://{HOST}:{upstream_port}"
    slow_upstream_model = f"{MODEL}@{shape.slow_chunks}x{shape.slow_interval_ms:g}"
    direct = Target("direct", upstream_url + CHAT_PATH, make_bodies(MODEL, slow_upstream_model, idle_upstream_model(shape), uri, big_uri))
    gateway = Target("gateway", f"http://{HOST}:{gateway_port}{CHAT_PATH}", make_bodies(MODEL, SLOW_MODEL, IDLE_MODEL, uri, big_uri))
    check_end_to_end(gateway, upstream_url, shape)
    for target in (direct, gateway):
        warm_up(target, settings, plain)
    meta["gateway_idle_rss_mib"] = memory_kib(gateway_child.pids(), "VmRSS") / 1024

    phases = build_phases(settings, plain)
    if args.only:
        wanted = set(args.only.split(","))
        phases = [phase for phase in phases if phase.key in wanted]
    sides = {"gateway": (gateway, gateway_child)}
    if any(phase.side == "floor" for phase in phases):
        floor_child, floor_port = start_floor(workdir)
        started.append(floor_child)
        floor = Target("floor", f"http://{HOST}:{floor_port}{CHAT_PATH}", gateway.bodies)
        warm_up(floor, settings, plain)
        sides["floor"] = (floor, floor_child)
    if any(phase.side == "forwarder" for phase in phases):
        forwarder_child, forwarder_port = start_floor(workdir, direct.url)
        started.append(forwarder_child)
        # It sends bodies on unchanged, so it is given the upstream's own (those the direct call sends).
        forwarder = Target("forwarder", f"http://{HOST}:{forwarder_port}{CHAT_PATH}", direct.bodies)
        warm_up(forwarder, settings, plain, streams=False)  # it relays whole answers only
        sides["forwarder"] = (forwarder, forwarder_child)
    results = run_phases(phases, direct, sides)
    meta["loadavg_after"] = _loadavg()
    rows = figures(results, shape, len(gateway.bodies.big_image))
    print(render(rows, results, meta), flush=True)
    if args.json:
        Path(args.json).write_text(to_json(rows, results, meta))
    missing = [row.figure for row in rows if math.isnan(row.gateway)]
    if missing:
        log(f"no number for: {missing}")
        return 1
    return 0


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def raise_open_files_limit() -> None:
    """Thousands of streams need thousands of sockets here and in the upstream (which inherits this)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
    if soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            pass


def main(argv: list[str] | None = None) -> int:
    settings, args = parse_args(argv)
    raise_open_files_limit()
    started: list[Child] = []
    # SIGTERM takes the same way out as Ctrl-C, through the finally below.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        with tempfile.TemporaryDirectory(prefix="gateway-bench-") as tmp:
            try:
                return run(settings, args, Path(tmp), started)
            except BenchError as exc:
                log(f"benchmark failed: {exc}")
                for child in started:  # the logs go with the temp dir: show their ends now
                    log(f"--- end of the {child.name} log:\n{child.log_tail()}")
                return 1
            finally:
                for child in reversed(started):
                    child.stop()
    except KeyboardInterrupt:
        log("interrupted; stopped every process this run started")
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
