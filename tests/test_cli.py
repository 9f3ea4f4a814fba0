"""The command line as an operator runs it: `gateway check`, `gateway models [--markdown]`, `gateway serve`."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import tomllib
from pathlib import Path

import httpx
import pytest

from conftest import CLIENT_KEY, backend_toml
from harness import (
    LOOPBACK,
    UPSTREAM_KEY,
    StandIn,
    free_port,
    gateway_env,
    local_client,
    process_gone,
    serving,
    start_gateway,
)

REPO = Path(__file__).resolve().parent.parent
SHIPPED = REPO / "models.toml"
README = REPO / "README.md"
BAD_DIR = Path(__file__).resolve().parent / "configs" / "bad"
SEEDS_DIR = REPO.parent / "shared" / "seeds"
CLI_TIMEOUT_S = 60
# A `gateway serve` that refuses its address does so right after loading the config.
REFUSAL_TIMEOUT_S = 15
SHIPPED_TABLES = tomllib.loads(SHIPPED.read_text(encoding="utf-8"))
SHIPPED_ALIASES = list(SHIPPED_TABLES["models"])

# The seed pages' two tables, row by row (cells as the seed writes them).
SEED_VISION_ROWS = [
    ("llama-4-scout (local)", "Strong on screenshots, charts"),
    ("mistral-small-4", "Good general-purpose vision"),
    ("qwen3-vl-30b-instruct", "Fast, multi-image, good for Asian-language captions"),
    ("qwen3-vl-30b-thinking", "Thinking variant — slower but better at complex visual reasoning"),
    ("gemma-4-31b", "Multi-image, 256 K context"),
    ("claude-opus-4.7", "Best at nuanced descriptions"),
    ("gemini-3.1-pro", "Only model that also accepts audio + video"),
    ("grok-4.20", "2 M token context"),
    ("gpt-5.5-pro", "Reasoning over images — max_tokens >= 200"),
    ("nano-banana, gpt-image, image-gen", "Vision input + image output"),
]
SEED_IMAGE_ROWS = [
    ("nano-banana", "google/gemini-3.1-flash-image-preview", "12-15 s", "~$3/M tokens"),
    ("gpt-image", "openai/gpt-5.4-image-2", "100-180 s", "~$15/M tokens"),
    ("image-gen", "composite (banana → gpt-image)", "12-180 s", "mixed"),
]
# The one deliberate difference: the seed's prose shortens nano-banana to "banana";
# the table generated from the config names route members by their full alias.
GENERATED_CELL = {"composite (banana → gpt-image)": "composite (nano-banana → gpt-image)"}


def gateway_cli(
    *args: str, cwd: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        cwd=cwd or REPO,
        env=gateway_env(env),
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT_S,
        check=False,
    )


def markdown_rows(text: str, heading: str) -> list[tuple[str, ...]]:
    """The body rows of the markdown table under `heading`."""
    section = text.split(heading, 1)[1]
    table = [line for line in section.split("\n\n", 2)[1].splitlines() if line.startswith("|")]
    return [tuple(cell.strip() for cell in row.strip("|").split(" | ")) for row in table[2:]]


@pytest.fixture
def bad_models_toml(tmp_path: Path) -> Path:
    """many_problems.toml copied as models.toml, so rendered lines start with "models.toml:"."""
    shutil.copy(BAD_DIR / "many_problems.toml", tmp_path / "models.toml")
    return tmp_path


# ---------------------------------------------------------------- check


def test_check_accepts_the_shipped_file() -> None:
    """`gateway check models.toml` exits 0 on the shipped file and says how many aliases it has."""
    done = gateway_cli("check", "models.toml", env={"OPENROUTER_API_KEY": "sk-or-test-not-a-key", "GATEWAY_API_KEYS": "sk-mine"})
    assert done.returncode == 0, done.stderr
    backends = len(SHIPPED_TABLES["backends"])
    assert done.stdout.strip() == f"models.toml: OK, {len(SHIPPED_ALIASES)} aliases, {backends} backends"


def test_check_notes_a_key_variable_unset_where_it_runs() -> None:
    """Still OK (the gateway's environment may differ), with a note naming the variable, never a value."""
    done = gateway_cli("check", "models.toml", env={"OPENROUTER_API_KEY": "", "GATEWAY_API_KEYS": "sk-mine"})
    assert done.returncode == 0, done.stderr
    note = (
        "note: backends.openrouter: OPENROUTER_API_KEY is not set in this environment; "
        "where the gateway runs without it, its aliases answer 503 backend_not_configured"
    )
    assert done.stdout.splitlines()[1:] == [note]


def test_check_notes_when_no_client_key_would_get_in(tmp_path: Path) -> None:
    """The shipped file with no GATEWAY_API_KEYS was OK and silent, and every request then got 401; a
    keys_file that names no file (a typo, say) was OK too, and every file key got 401."""
    alone = gateway_cli("check", "models.toml", env={"OPENROUTER_API_KEY": "x", "GATEWAY_API_KEYS": ""})
    assert alone.returncode == 0 and "every request is answered 401 no_api_keys_configured" in alone.stdout
    (tmp_path / "models.toml").write_text('[auth]\nkeys_file = "keys.tmol"\n' + one_backend_config("k"))
    typo = gateway_cli("check", "models.toml", cwd=tmp_path, env={"GATEWAY_API_KEYS": ""})
    assert typo.returncode == 0, typo.stderr
    assert "note: auth.keys_file names keys.tmol, which does not exist" in typo.stdout
    assert "no_api_keys_configured" not in typo.stdout  # keys are in use: the file's, once written


def test_serve_refuses_no_workers() -> None:
    """`--workers 0` (or -1) ran one worker without a word."""
    done = gateway_cli("serve", "--workers", "0")
    assert done.returncode == 2 and "expected a whole number, 1 or more, got '0'" in done.stderr


def test_check_lists_every_problem_and_exits_1(bad_models_toml: Path) -> None:
    """`gateway check` on a bad file exits 1 listing every problem with line and table path, then a count."""
    done = gateway_cli("check", "models.toml", cwd=bad_models_toml)
    assert done.returncode == 1
    expected = (BAD_DIR / "many_problems.expected").read_text(encoding="utf-8").splitlines()
    lines = done.stderr.splitlines()
    assert lines[:-1] == expected
    assert lines[-1].startswith(f"models.toml: {len(expected)} problem(s)")
    assert done.stdout == ""


def test_check_lists_the_keys_files_problems_beside_those_of_models_toml(tmp_path: Path) -> None:
    """Both files' problems in one run: the keys file's were shown only once models.toml had none."""
    (tmp_path / "models.toml").write_text(
        '[auth]\nkeys_file = "keys.toml"\n[backends.b]\nbase_url = "http://127.0.0.1:9/v1"\n'
        '[models.m1]\nbackend = "b"\nmodel = "m"\ntypo = 1\n'
    )
    (tmp_path / "keys.toml").write_text('[keys.alice]\nhash = "sha256:short"\nbogus = 2\n')
    done = gateway_cli("check", "models.toml", cwd=tmp_path)
    assert done.returncode == 1
    assert "models.toml:8: models.m1.typo: unknown key 'typo'" in done.stderr
    assert "keys.toml:2: keys.alice.hash: expected" in done.stderr and "keys.toml:3: keys.alice.bogus: unknown key" in done.stderr, done.stderr


def test_check_reads_gateway_config_without_an_argument(bad_models_toml: Path, tmp_path: Path) -> None:
    """Without an argument `gateway check` reads $GATEWAY_CONFIG (and ./models.toml without it)."""
    named = gateway_cli("check", cwd=REPO, env={"GATEWAY_CONFIG": str(bad_models_toml / "models.toml")})
    assert named.returncode == 1 and "min_max_tokens" in named.stderr
    default = gateway_cli("check", cwd=REPO, env={"GATEWAY_CONFIG": ""})
    assert default.returncode == 0, default.stderr


def test_check_of_a_missing_file_exits_1(tmp_path: Path) -> None:
    """`gateway check` of a path that does not exist exits 1 naming it, without a traceback."""
    done = gateway_cli("check", "absent.toml", cwd=tmp_path)
    assert done.returncode == 1
    assert done.stderr.startswith("absent.toml: cannot read the file: ")
    assert "Traceback" not in done.stderr


# ---------------------------------------------------------------- models


def test_models_prints_every_alias_with_its_target_and_limits() -> None:
    """`gateway models` prints a header and one line per alias: target, modalities, limits, notes."""
    done = gateway_cli("models", "--config", "models.toml")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].split() == ["alias", "backend/model", "input", "output", "limits", "notes"]
    by_alias = {line.split()[0]: line for line in lines[1:]}
    assert list(by_alias) == SHIPPED_ALIASES
    assert "openrouter/openai/gpt-5.5-pro" in by_alias["gpt-5.5-pro"]
    assert "max_tokens >= 200" in by_alias["gpt-5.5-pro"]
    assert "context 2,000,000" in by_alias["grok-4.20"]
    assert "audio, image, text, video" in by_alias["gemini-3.1-pro"]
    assert "composite (nano-banana → gpt-image)" in by_alias["image-gen"]


def test_models_markdown_reproduces_the_seed_tables() -> None:
    """`gateway models --markdown` of the shipped file gives the seed pages' vision and image-generation tables."""
    done = gateway_cli("models", "--markdown", "--config", "models.toml")
    assert done.returncode == 0, done.stderr
    assert markdown_rows(done.stdout, "### Vision-capable models") == SEED_VISION_ROWS
    expected_images = [tuple(GENERATED_CELL.get(cell, cell) for cell in row) for row in SEED_IMAGE_ROWS]
    assert markdown_rows(done.stdout, "### Image generation") == expected_images
    assert [row[0] for row in markdown_rows(done.stdout, "### All aliases")] == SHIPPED_ALIASES


def test_seed_table_rows_are_the_seed_pages() -> None:
    """The seed rows this file expects are the seed pages' rows (cells run together in the pages' text)."""
    pages = sorted(SEEDS_DIR.glob("*.txt")) if SEEDS_DIR.is_dir() else []
    if not pages:
        pytest.skip(f"the seed pages are not next to this checkout ({SEEDS_DIR.name} of ../shared)")
    lines = set("\n".join(page.read_text(encoding="utf-8") for page in pages).splitlines())
    for row in [*SEED_VISION_ROWS, *SEED_IMAGE_ROWS]:
        assert "".join(row) in lines, row


def test_models_markdown_is_generated_from_the_config(tmp_path: Path) -> None:
    """Another config gives other rows: local vision aliases get "(local)", image aliases their own data."""
    (tmp_path / "models.toml").write_text(
        """
[backends.box]
base_url = "http://localhost:9000/v1"
[backends.cloud]
base_url = "https://api.example.com/v1"

[models."see-local"]
backend = "box"
model = "m1"
input = ["text", "image"]
notes = "local eyes"

[models."see-cloud"]
backend = "cloud"
model = "m2"
input = ["text", "image"]
notes = '''cloud
eyes'''

[models."words"]
backend = "box"
model = "m3"

[models."paint"]
backend = "cloud"
model = "vendor/paint-1"
input = ["text", "image"]
output = ["image"]
notes = "paints | edits"
cold_latency_s = [5]
"""
    )
    done = gateway_cli("models", "--markdown", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert markdown_rows(done.stdout, "### Vision-capable models") == [
        ("see-local (local)", "local eyes"),
        ("see-cloud", "cloud eyes"),
        ("paint", "paints \\| edits"),
    ]
    assert markdown_rows(done.stdout, "### Image generation") == [("paint", "vendor/paint-1", "5 s", "-")]
    # A "|" in a note is escaped, not a new column (it was, in these two tables).
    assert "| paint | paints \\| edits |" in done.stdout.splitlines()
    # Notes over two lines still make one row of each table.
    assert "| see-cloud | cloud eyes |" in done.stdout.splitlines()
    text = gateway_cli("models", cwd=tmp_path).stdout.splitlines()
    assert len(text) == 1 + 4 and text[2].split()[-2:] == ["cloud", "eyes"]


def test_readme_alias_tables_are_the_models_markdown() -> None:
    """The README's alias tables are exactly `gateway models --markdown` of the shipped file."""
    done = gateway_cli("models", "--markdown")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() in README.read_text(encoding="utf-8")


def test_models_of_a_bad_file_exits_1(bad_models_toml: Path) -> None:
    """`gateway models` on a bad file prints no table and exits 1 with the problems."""
    done = gateway_cli("models", cwd=bad_models_toml)
    assert done.returncode == 1
    assert done.stdout == ""
    assert "models.toml:13: " in done.stderr


# ---------------------------------------------------------------- serve


def test_serve_refuses_an_invalid_file(bad_models_toml: Path) -> None:
    """`gateway serve` with an invalid file exits 1 at once with every rendered problem, serving nothing."""
    port = free_port()
    done = gateway_cli("serve", "--config", "models.toml", "--port", str(port), cwd=bad_models_toml)
    assert done.returncode == 1
    expected = (BAD_DIR / "many_problems.expected").read_text(encoding="utf-8").splitlines()
    for line in expected:
        assert line.replace("models.toml:", f"{bad_models_toml / 'models.toml'}:", 1) in done.stderr
    assert "not serving" in done.stderr
    assert "Traceback" not in done.stderr


def test_serve_refuses_a_missing_file(tmp_path: Path) -> None:
    """`gateway serve` with no config at the default path exits 1 naming it."""
    done = gateway_cli("serve", "--port", str(free_port()), cwd=tmp_path, env={"GATEWAY_CONFIG": ""})
    assert done.returncode == 1
    assert "models.toml: cannot read the file" in done.stderr


def test_serve_options_are_ones_granian_takes() -> None:
    """The options `gateway serve` builds are accepted by the installed granian as given.

    The HTTP/1 buffer is raised from granian's default so a large body reaches the
    app in fewer pieces (measured in ``gateway.cli``); the command-line address,
    port and worker count pass through unchanged.
    """
    from granian.constants import Interfaces
    from granian.http import HTTP1Settings

    from gateway.cli import HTTP1_BUFFER_BYTES, build_parser, server_options
    from gateway.supervisor import GatewayGranian

    args = build_parser().parse_args(["serve", "--host", "127.0.0.1", "--port", "18080", "--workers", "2"])
    options = server_options(args)
    server = GatewayGranian("gateway.app:create_app", **options)
    assert server.http1_settings == HTTP1Settings(max_buffer_size=HTTP1_BUFFER_BYTES)
    assert HTTP1_BUFFER_BYTES > HTTP1Settings().max_buffer_size
    assert (server.bind_addr, server.bind_port, server.workers) == ("127.0.0.1", 18080, 2)
    assert server.interface == Interfaces.ASGI
    assert server.respawn_failed_workers is True


def test_a_second_stop_signal_ends_the_gateway_within_its_shutdown_timeout(standin: StandIn, tmp_path: Path) -> None:
    """Ctrl-C twice while a stream runs: granian's worker blocks in its signal handler and never exits,
    and the main process waited for it forever. It now waits `--shutdown-timeout` seconds, then stops it."""
    standin.script("double-signal-up", [{"kind": "ok", "chunks": 120, "interval_ms": 250}])
    config = tmp_path / "models.toml"
    config.write_text(backend_toml(standin) + '\n[models."double-signal"]\nbackend = "local"\nmodel = "double-signal-up"\n')
    env = {"GATEWAY_API_KEYS": CLIENT_KEY, "STANDIN_KEY": UPSTREAM_KEY}
    with start_gateway(config, env=env, log_dir=tmp_path, args=["--shutdown-timeout", "2"]) as gateway:
        body = {"model": "double-signal", "messages": [{"role": "user", "content": "go on"}], "stream": True}
        read: list[bytes] = []

        def read_the_stream() -> None:
            headers = {"Authorization": f"Bearer {CLIENT_KEY}"}
            with (
                contextlib.suppress(httpx.HTTPError),  # the gateway stopping cuts it
                local_client(timeout_s=40) as client,
                client.stream("POST", f"{gateway.url}/v1/chat/completions", json=body, headers=headers) as stream,
            ):
                read.extend(stream.iter_bytes())

        reader = threading.Thread(target=read_the_stream, daemon=True)
        reader.start()
        deadline = time.monotonic() + 10
        while not read and time.monotonic() < deadline:
            time.sleep(0.05)
        assert read, gateway.log_tail()
        for _ in range(2):
            os.killpg(gateway.pid, signal.SIGINT)
            time.sleep(1.0)
        deadline = time.monotonic() + 20
        while gateway.process.is_running() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not gateway.process.is_running(), f"still serving 20 s after Ctrl-C twice:\n{gateway.log_tail()}"
        reader.join(timeout=10)


def one_backend_config(alias: str) -> str:
    """A valid models.toml with one alias; its backend is never called (the tests only ask /healthz)."""
    return f'[backends.local]\nbase_url = "http://{LOOPBACK}:9/v1"\n\n[models."{alias}"]\nbackend = "local"\nmodel = "{alias}"\n'


def serve_expecting_refusal(config: Path, port: int, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Run `gateway serve` on `port`; fail the test if it is still serving after REFUSAL_TIMEOUT_S."""
    argv = [sys.executable, "-m", "gateway", "serve", "--config", str(config), "--host", LOOPBACK, "--port", str(port)]
    # Its own session: a gateway that did start is stopped with its granian workers.
    process = subprocess.Popen(
        argv, env=gateway_env(env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        stdout, stderr = process.communicate(timeout=REFUSAL_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail(f"`gateway serve --port {port}` was still running after {REFUSAL_TIMEOUT_S} s:\n{stderr}")
    return subprocess.CompletedProcess(argv, process.returncode, stdout, stderr)


def assert_refused_as_in_use(done: subprocess.CompletedProcess[str], port: int) -> None:
    assert done.returncode == 1, done.stderr
    expected = (
        f"{LOOPBACK}:{port}: address already in use, likely by another gateway or server:"
        " stop it or pick another --port; not serving."
    )
    assert done.stderr.splitlines() == [expected]


def test_workers_stop_when_the_main_process_is_killed(tmp_path: Path) -> None:
    """granian's main process killed outright (SIGKILL, the OOM killer) left its workers serving as orphans:
    nothing respawned them or passed SIGHUP on, and they held the port, so `gateway serve` could not start again."""
    config = tmp_path / "models.toml"
    config.write_text(one_backend_config("orphans"))
    with start_gateway(config, env={"GATEWAY_API_KEYS": CLIENT_KEY}, workers=2, log_dir=tmp_path) as gateway:
        workers: set[int] = set()
        deadline = time.monotonic() + 20
        while len(workers) < 2 and time.monotonic() < deadline:
            with local_client() as fresh:  # a new connection each time, so both workers answer
                workers.add(int(fresh.get(f"{gateway.url}/readyz").json()["pid"]))
        assert len(workers) == 2
        os.kill(gateway.pid, signal.SIGKILL)
        deadline = time.monotonic() + 15
        while not all(process_gone(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert all(process_gone(pid) for pid in workers), gateway.log_tail()
        assert "main process" in gateway.log_tail() and "is gone: this worker stops" in gateway.log_tail()
        with pytest.raises(httpx.ConnectError), local_client() as fresh:
            fresh.get(f"{gateway.url}/healthz")


def test_an_app_run_in_process_outlives_whatever_started_it(tmp_path: Path) -> None:
    """Stopping when the parent is gone is for `gateway serve`'s workers: an app run in-process (one
    process serving it, a test client) stopped itself within a second of the shell that started it exiting."""
    config, alive = tmp_path / "models.toml", tmp_path / "alive"
    config.write_text(one_backend_config("solo"))
    script = tmp_path / "solo.py"
    script.write_text(
        "import time\n"
        "from litestar.testing import TestClient\n"
        "from gateway.app import create_app\n"
        f"with TestClient(create_app({str(config)!r})) as client:\n"
        "    time.sleep(4)\n"
        "    assert client.get('/healthz').status_code == 200\n"
        f"open({str(alive)!r}, 'w').write('alive')\n"
    )
    env = {name: value for name, value in gateway_env(None).items() if name != "GATEWAY_LAST_GOOD_DIR"}
    subprocess.run(["bash", "-c", f"{sys.executable} {script} >/dev/null 2>&1 & sleep 2"], env=env, check=True, timeout=10)
    deadline = time.monotonic() + 15
    while not alive.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert alive.exists()


def test_serve_sh_serves_the_config_gateway_config_names(tmp_path: Path) -> None:
    """The README's first command takes GATEWAY_CONFIG as `gateway serve` does (it passed models.toml
    always); set up once, it installs nothing again, so a restart needs no package index."""
    config = tmp_path / "models.toml"
    config.write_text(one_backend_config("from-env"))
    port = free_port()
    env = {**gateway_env({"GATEWAY_API_KEYS": CLIENT_KEY}), "GATEWAY_CONFIG": str(config), "PIP_NO_INDEX": "1"}
    log = tmp_path / "serve.log"
    with log.open("w") as output:
        process = subprocess.Popen(
            ["bash", str(REPO / "scripts" / "serve.sh"), "--host", LOOPBACK, "--port", str(port)],
            env=env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 60
        listed = None
        while listed is None and time.monotonic() < deadline and process.poll() is None:
            try:
                with local_client() as client:
                    listed = client.get(f"http://{LOOPBACK}:{port}/v1/models", headers={"Authorization": f"Bearer {CLIENT_KEY}"}).json()
            except httpx.HTTPError:
                time.sleep(0.1)
        assert listed is not None, log.read_text()
        assert [m["id"] for m in listed["data"]] == ["from-env"]
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=15)


def test_serve_refuses_the_port_of_a_running_gateway(tmp_path: Path) -> None:
    """A second `gateway serve` on a running gateway's port exits 1 saying so; the first one serves on."""
    (tmp_path / "first").mkdir()
    (tmp_path / "second").mkdir()
    second_config = tmp_path / "second" / "models.toml"
    second_config.write_text(one_backend_config("second-alias"))
    with serving(one_backend_config("first-alias"), tmp_path / "first") as first:
        # Another config and other keys: without the check, granian's SO_REUSEPORT would share the port.
        done = serve_expecting_refusal(second_config, first.port, {"GATEWAY_API_KEYS": "sk-other"})
        assert_refused_as_in_use(done, first.port)
        for _ in range(5):
            with local_client() as fresh:  # a new connection each time
                assert fresh.get(f"{first.url}/healthz").status_code == 200
        assert first.process.is_running()


def test_serve_refuses_a_port_a_plain_socket_listens_on(tmp_path: Path) -> None:
    """`gateway serve` on a port held by a plain listening socket (no SO_REUSEPORT) exits 1 saying so."""
    config = tmp_path / "models.toml"
    config.write_text(one_backend_config("only-alias"))
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind((LOOPBACK, 0))
        listener.listen()
        port = int(listener.getsockname()[1])
        done = serve_expecting_refusal(config, port, {"GATEWAY_API_KEYS": "sk-other"})
    assert_refused_as_in_use(done, port)
