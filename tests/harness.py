"""Process harness for integration tests: the upstream stand-in and the gateway.

Tests start real processes (``scripts/standin_upstream.py`` and
``python -m gateway serve``) on 127.0.0.1, talk to them over HTTP and tear them
down reliably, including worker processes, with every wait bounded.

    with start_standin() as upstream, start_gateway(cfg) as gateway:
        upstream.script("m", [{"kind": "status", "status": 503}])
        httpx.post(f"{gateway.url}/v1/chat/completions", ...)
"""

from __future__ import annotations

import contextlib
import gc
import importlib.util
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import httpx

REPO_ROOT = Path(__file__).resolve().parent.parent
STANDIN_SCRIPT = REPO_ROOT / "scripts" / "standin_upstream.py"

# The client key the test gateways accept, and the key their backend sends upstream.
CLIENT_KEY = "sk-test-client"
UPSTREAM_KEY = "sk-test-upstream"
SRC_DIR = REPO_ROOT / "src"
LOOPBACK = "127.0.0.1"
STOP_GRACE_S = 5.0
POLL_INTERVAL_S = 0.05
LISTENING_LINE = re.compile(r"listening on http://127\.0\.0\.1:(\d+)")


def cyclic_garbage_now() -> list[Any]:
    """Everything only the cyclic collector could free now: collected, and handed back to look at."""
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        gc.collect()
        return list(gc.garbage)
    finally:
        gc.set_debug(0)
        gc.garbage.clear()


class ProcessStartError(RuntimeError):
    """A managed process exited or never became ready; the message carries its log tail."""


RATE_WINDOW_S = 60  # the rate counters' fixed windows are whole minutes of the clock (epoch-aligned)


def clear_of_rate_window_roll(needed_s: float) -> None:
    """Wait, if need be, until the current rate window has ``needed_s`` left.

    Just after a roll the last minute's count is weighed and rounded down, so a test that counts
    requests to an exact 429 would see one more let through if its requests straddled the roll.
    """
    left_s = RATE_WINDOW_S - time.time() % RATE_WINDOW_S
    if left_s < needed_s:
        time.sleep(left_s + 0.05)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (bind to 0, then release)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def local_client(timeout_s: float = 5.0) -> httpx.Client:
    # trust_env=False: a proxy from the environment must never see loopback test traffic.
    return httpx.Client(timeout=timeout_s, trust_env=False)


class ManagedProcess:
    """A child process in its own session with output captured to a log file.

    Starts at construction.  ``stop()`` signals the whole process group, so
    server workers forked by the child are stopped with it.
    """

    def __init__(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        log_dir: str | Path | None = None,
        name: str = "process",
        cwd: str | Path | None = None,
        base_url: str | None = None,
    ) -> None:
        self.argv = [str(arg) for arg in argv]
        self.name = name
        self.base_url = base_url
        self._owned_log_dir = None if log_dir else tempfile.TemporaryDirectory(prefix=f"{name}-")
        directory = Path(log_dir) if log_dir else Path(self._owned_log_dir.name)  # type: ignore[union-attr]
        directory.mkdir(parents=True, exist_ok=True)
        # mkstemp: several processes may share one log_dir without clobbering each other's logs.
        log_fd, log_name = tempfile.mkstemp(prefix=f"{name}-", suffix=".log", dir=directory)
        self.log_path = Path(log_name)
        self._log_file = os.fdopen(log_fd, "wb")
        self.process = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            env=dict(env) if env is not None else None,
            cwd=str(cwd) if cwd else None,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.process.pid

    def is_running(self) -> bool:
        return self.process.poll() is None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, n: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-n:])

    def _failure(self, reason: str) -> ProcessStartError:
        return ProcessStartError(f"{self.name} (pid {self.pid}) {reason}; log tail:\n{self.log_tail()}")

    def wait_for_log(self, pattern: re.Pattern[str], timeout_s: float) -> re.Match[str]:
        """Wait until the log contains `pattern`; fails early if the process exits."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            match = pattern.search(self.log_text())
            if match:
                return match
            if not self.is_running():
                raise self._failure(f"exited with code {self.process.returncode} before logging {pattern.pattern!r}")
            time.sleep(POLL_INTERVAL_S)
        raise self._failure(f"did not log {pattern.pattern!r} within {timeout_s} s")

    def wait_ready(self, url_path: str, timeout_s: float = 30.0) -> None:
        """Poll GET `url_path` (a full URL, or a path under base_url) until it answers < 500."""
        url = url_path if "://" in url_path else f"{(self.base_url or '').rstrip('/')}{url_path}"
        deadline = time.monotonic() + timeout_s
        last_problem = "no attempt made"
        with local_client(timeout_s=2.0) as client:
            while time.monotonic() < deadline:
                if not self.is_running():
                    raise self._failure(f"exited with code {self.process.returncode} while waiting for {url}")
                try:
                    status = client.get(url).status_code
                    if status < 500:
                        return
                    last_problem = f"HTTP {status}"
                except httpx.HTTPError as exc:
                    last_problem = f"{type(exc).__name__}: {exc}"
                time.sleep(POLL_INTERVAL_S)
        raise self._failure(f"not ready at {url} within {timeout_s} s (last: {last_problem})")

    def _signal_group(self, signum: int) -> bool:
        """Send `signum` to the process group; False once no member is left."""
        try:
            os.killpg(self.pid, signum)
            return True
        except (ProcessLookupError, PermissionError):
            return False

    def _wait_group_gone(self, deadline: float) -> bool:
        while time.monotonic() < deadline:
            self.process.poll()
            if not self._signal_group(0):
                return True
            time.sleep(POLL_INTERVAL_S)
        return False

    def stop(self, grace_s: float = STOP_GRACE_S) -> int | None:
        """SIGTERM the process group, wait up to `grace_s`, then SIGKILL it. Idempotent."""
        if self._signal_group(signal.SIGTERM) and not self._wait_group_gone(time.monotonic() + grace_s):
            self._signal_group(signal.SIGKILL)
            self._wait_group_gone(time.monotonic() + STOP_GRACE_S)
        try:
            self.process.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=STOP_GRACE_S)
        if not self._log_file.closed:
            self._log_file.close()
        return self.process.returncode

    def cleanup(self) -> None:
        """stop(), then delete the log directory if this object created it."""
        self.stop()
        if self._owned_log_dir is not None:
            self._owned_log_dir.cleanup()
            self._owned_log_dir = None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


class StandIn:
    """A running upstream stand-in and a client for its /_standin control endpoints."""

    def __init__(self, process: ManagedProcess, port: int) -> None:
        self.process = process
        self.port = port
        self.root_url = f"http://{LOOPBACK}:{port}"
        self.base_url = f"{self.root_url}/v1"
        self._client = local_client()

    @property
    def pid(self) -> int:
        return self.process.pid

    def _control(self, method: str, path: str, payload: Any = None) -> Any:
        response = self._client.request(method, f"{self.root_url}/_standin/{path}", json=payload)
        response.raise_for_status()
        return response.json()

    def script(self, model: str, steps: Sequence[Mapping[str, Any]]) -> None:
        """Replace `model`'s script: each request takes the next step, the last one repeats."""
        self._control("POST", "script", {"model": model, "steps": [dict(step) for step in steps]})

    def reset(self) -> None:
        """Clear scripts, the request log and the cancellation log."""
        self._control("POST", "reset")

    def requests(self) -> list[dict[str, Any]]:
        return list(self._control("GET", "requests")["requests"])

    def connections(self) -> dict[str, Any]:
        return dict(self._control("GET", "connections"))

    def wait_for_cancelled(self, count: int = 1, timeout_s: float = 2.0) -> list[dict[str, Any]]:
        """Poll until at least `count` cancellations are recorded; returns them (possibly fewer on timeout)."""
        deadline = time.monotonic() + timeout_s
        cancelled: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            cancelled = self.connections()["cancelled"]
            if len(cancelled) >= count:
                break
            time.sleep(POLL_INTERVAL_S)
        return cancelled

    def log_tail(self, n: int = 40) -> str:
        return self.process.log_tail(n)

    def stop(self) -> None:
        self._client.close()
        self.process.cleanup()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def start_standin(*, log_dir: str | Path | None = None, timeout_s: float = 10.0) -> StandIn:
    """Start the stand-in on a free port and return once it is listening."""
    process = ManagedProcess(
        [sys.executable, str(STANDIN_SCRIPT), "--host", LOOPBACK, "--port", "0"],
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        log_dir=log_dir,
        name="standin",
    )
    try:
        port = int(process.wait_for_log(LISTENING_LINE, timeout_s).group(1))
    except BaseException:
        process.cleanup()
        raise
    return StandIn(process, port)


class GatewayProcess:
    """A running gateway (`python -m gateway serve`) on 127.0.0.1."""

    def __init__(self, process: ManagedProcess, port: int) -> None:
        self.process = process
        self.port = port
        self.url = f"http://{LOOPBACK}:{port}"

    @property
    def pid(self) -> int:
        return self.process.pid

    def log_tail(self, n: int = 40) -> str:
        return self.process.log_tail(n)

    def wait_for_workers(self, count: int, timeout_s: float = 20.0) -> None:
        """Until `count` worker processes have answered /readyz: before that, every connection goes to the first."""
        pids: set[int] = set()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with local_client() as fresh:  # a new connection each time
                answer = fresh.get(f"{self.url}/readyz")
            if answer.status_code == 200:
                pids.add(int(answer.json()["pid"]))
                if len(pids) >= count:
                    return
            time.sleep(0.02)
        raise AssertionError(f"only workers {sorted(pids)} answered within {timeout_s:g} s")

    def stop(self, grace_s: float = STOP_GRACE_S) -> int | None:
        """SIGTERM the gateway's process group (workers included), SIGKILL after `grace_s`."""
        return self.process.stop(grace_s)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


PROXY_VARIABLES = ("http_proxy", "https_proxy", "all_proxy", "no_proxy")


def gateway_env(extra: Mapping[str, str] | None) -> dict[str, str]:
    # The machine's own proxy settings must not decide where a test's upstream calls go;
    # a test of the proxy support gives its own.
    env = {name: value for name, value in os.environ.items() if name.lower() not in PROXY_VARIABLES}
    env["PYTHONUNBUFFERED"] = "1"
    # src/ on the path so the gateway runs from a checkout even when not pip-installed.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(SRC_DIR), env.get("PYTHONPATH", "")) if p)
    env.update(extra or {})
    return env


def start_gateway(
    config_path: str | Path,
    *,
    env: Mapping[str, str] | None = None,
    workers: int = 1,
    log_dir: str | Path | None = None,
    ready_timeout_s: float = 30.0,
    port_attempts: int = 3,
    args: Sequence[str] = (),
) -> GatewayProcess:
    """Start the gateway on a free port and wait for GET /healthz to answer < 500.

    free_port() can race with another process grabbing the port, so a start
    that dies with "address in use" is retried on a new port.
    """
    last_error: ProcessStartError | None = None
    for _ in range(port_attempts):
        port = free_port()
        process = ManagedProcess(
            [
                sys.executable, "-m", "gateway", "serve",
                "--config", str(config_path),
                "--host", LOOPBACK,
                "--port", str(port),
                "--workers", str(workers),
                *args,
            ],
            env=gateway_env(env),
            log_dir=log_dir,
            name=f"gateway-{port}",
            base_url=f"http://{LOOPBACK}:{port}",
        )
        try:
            process.wait_ready("/healthz", ready_timeout_s)
            return GatewayProcess(process, port)
        except ProcessStartError as exc:
            process.stop()
            last_error = exc
            address_in_use = "address already in use" in process.log_text().lower()
            process.cleanup()
            if not address_in_use:
                raise
        except BaseException:
            process.cleanup()
            raise
    assert last_error is not None
    raise last_error


def shipped_config(standin: StandIn) -> str:
    """The shipped models.toml with every backend's base_url pointed at the stand-in, and nothing else changed."""
    text = (REPO_ROOT / "models.toml").read_text(encoding="utf-8")
    pointed, count = re.subn(r'(?m)^base_url = "[^"]*"', f'base_url = "{standin.base_url}"', text)
    assert count == text.count("[backends."), "every backend must have its base_url replaced"
    return pointed


@contextlib.contextmanager
def serving_shipped(standin: StandIn, directory: Path) -> Iterator[GatewayProcess]:
    """The shipped models.toml served in front of the stand-in, with the test client key."""
    # The shipped openrouter backend reads its key from OPENROUTER_API_KEY; here it is the stand-in's key.
    with serving(shipped_config(standin), directory, env={"OPENROUTER_API_KEY": UPSTREAM_KEY}) as running:
        yield running


# --- test images -------------------------------------------------------------------------------


def tiny_jpeg() -> bytes:
    """The stand-in's valid 8x8 grey JPEG: one builder for the upstream's images and the tests' photos."""
    spec = importlib.util.spec_from_file_location("standin_upstream", STANDIN_SCRIPT)
    assert spec is not None and spec.loader is not None
    module = sys.modules.get(spec.name)
    if module is None:
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # its classes look their module up while being defined
        spec.loader.exec_module(module)
    return module.make_tiny_jpeg()  # type: ignore[no-any-return]


@contextlib.contextmanager
def serving(config_text: str, directory: Path, *, env: Mapping[str, str] | None = None) -> Iterator[GatewayProcess]:
    """Write ``config_text`` as models.toml in ``directory`` and serve it with the test keys."""
    config = Path(directory) / "models.toml"
    config.write_text(config_text)
    full_env = {"GATEWAY_API_KEYS": CLIENT_KEY, "STANDIN_KEY": UPSTREAM_KEY, **(env or {})}
    with start_gateway(config, env=full_env, log_dir=directory) as running:
        yield running


def process_gone(pid: int) -> bool:
    """Whether ``pid`` has exited: gone, or a zombie waiting for a reaper, which is as good as gone."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


def group_rss_bytes(pgid: int, field: str = "VmRSS") -> int:
    """Resident memory of every process in a process group (the gateway and its workers);
    ``field="VmHWM"``: the sum of each one's peak."""
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat_fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            if int(stat_fields[2]) != pgid:
                continue
            status = Path(f"/proc/{entry}/status").read_text()
        except (OSError, IndexError, ValueError):
            continue
        found = re.search(rf"{field}:\s+(\d+) kB", status)
        total += int(found.group(1)) * 1024 if found else 0
    return total


def scraped(client: httpx.Client, url: str, prefix: str) -> float:
    """The sum of the gateway's /metrics samples whose line starts with ``prefix`` (0 when none does)."""
    lines = [line for line in client.get(f"{url}/metrics").text.splitlines() if line.startswith(prefix)]
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines)
