"""The keys file (SPEC §3): parsing, the key ring, the `gateway keys` CLI and a running gateway.

Unit tests drive ``gateway.keys`` and ``gateway.auth`` directly; the life-cycle
tests run the CLI as a subprocess against the same files a real gateway serves,
and rely on the gateway's live reload to pick up added and revoked keys.
"""

from __future__ import annotations

import hashlib
import logging
import re
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from conftest import GatewayFactory, backend_toml
from gateway.auth import KeyRing
from gateway.config import ConfigError, parse_config
from gateway.config.model import KeyEntry
from gateway.errors import GatewayError
from gateway.keys import build_keyring, hash_key, keys_file_path, new_key, parse_keys, read_keys_file, write_keys_file
from harness import StandIn, gateway_env, local_client, scraped

RELOAD_WAIT_S = 8.0
POLL_S = 0.1


def models_toml(standin: StandIn, *, keys_file: str | None = "keys.toml", extra: str = "") -> str:
    auth = f'[auth]\nkeys_file = "{keys_file}"\n' if keys_file else ""
    aliases = "".join(f'\n[models."{name}"]\nbackend = "local"\nmodel = "{name}-up"\n' for name in ("alpha", "beta"))
    return auth + extra + backend_toml(standin) + aliases


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """`python -m gateway keys ...` as an operator runs it, in the config's directory."""
    return subprocess.run(
        [sys.executable, "-m", "gateway", "keys", *args],
        cwd=cwd, env=gateway_env(None), capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL, check=False,
    )


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def chat(client: httpx.Client, url: str, key: str, model: str) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "hello there"}]}
    return client.post(f"{url}/v1/chat/completions", json=body, headers=bearer(key))


def wait_for_status(client: httpx.Client, url: str, key: str, model: str, status: int) -> httpx.Response:
    """Poll a chat until it answers `status` (the reload's time), or give up after RELOAD_WAIT_S."""
    deadline = time.monotonic() + RELOAD_WAIT_S
    response = chat(client, url, key, model)
    while response.status_code != status and time.monotonic() < deadline:
        time.sleep(POLL_S)
        response = chat(client, url, key, model)
    return response


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    with local_client(timeout_s=10.0) as http:
        yield http


# ---------------------------------------------------------------- the file


def test_keys_file_round_trips_and_holds_only_hashes(tmp_path: Path) -> None:
    """What `write_keys_file` writes reads back the same, owner-only, with no key in it."""
    key = new_key()
    path = tmp_path / "keys.toml"
    entries = {
        "alice": KeyEntry(hash=hash_key(key), models=("alpha",), rpm=5, tpm=900, created_at="2026-01-01T00:00:00Z"),
        "ci.bot@lab": KeyEntry(hash=hash_key(new_key()), enabled=False, revoked_at="2026-01-02T00:00:00Z"),
    }
    write_keys_file(path, entries)
    assert read_keys_file(path) == entries
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    text = path.read_text()
    assert key not in text and key.removeprefix("sk-gw-") not in text
    assert hash_key(key) in text


def test_missing_keys_file_holds_no_keys(tmp_path: Path) -> None:
    """A keys file that does not exist yet is empty, not an error."""
    assert read_keys_file(tmp_path / "absent.toml") == {}


def test_bad_keys_file_reports_every_problem_with_its_line(tmp_path: Path) -> None:
    """Unknown keys, wrong types, malformed hashes, reserved names and duplicates are all reported at once."""
    same = hash_key("sk-same")
    pasted_key = "sk-this-is-a-pasted-key"
    text = (
        f'[keys.alice]\nhash = "{same}"\nmodel = ["alpha"]\n'          # 1-3: typo of `models`
        f'[keys.bob]\nhash = "{pasted_key}"\n'                         # 4-5: a key, not a hash
        f'[keys.carol]\nhash = "{same}"\nrpm = "10"\n'                  # 6-8: wrong type
        f'[keys."env-key-1"]\nhash = "{hash_key("x")}"\n'               # 9-10: reserved name
        f'[keys.dave]\nhash = "{hash_key("y")}"\ntpm = 0\n'             # 11-13: not positive
        f'[keys.erin]\nhash = "{same}"\n'                               # 14-15: same key as alice
        '[keys.frank]\nhash = "sha256:short"\nenabled = "yes"\nrpm = -1\n'  # 16-19: three at once
        "[extra]\n"                                                     # 20
    )
    with pytest.raises(ConfigError) as caught:
        parse_keys(text.encode(), "keys.toml")
    rendered = caught.value.render()
    expected = [
        r"keys\.toml:3: keys\.alice\.model: unknown key 'model' \(did you mean 'models'\?\)",
        r"keys\.toml:5: keys\.bob\.hash: expected \"sha256:\" and 64 lowercase hex digits",
        r"keys\.toml:8: keys\.carol\.rpm: expected an integer",
        r"keys\.toml:9: keys\.\"env-key-1\": names starting with 'env-key-' are kept for GATEWAY_API_KEYS",
        r"keys\.toml:13: keys\.dave\.tpm: must be a positive number",
        r"keys\.toml:15: keys\.erin\.hash: the same key as keys\.alice",
        # A wrong type in one field hides no other problem of its entry.
        r"keys\.toml:17: keys\.frank\.hash: expected \"sha256:\"",
        r"keys\.toml:18: keys\.frank\.enabled: expected true or false",
        r"keys\.toml:19: keys\.frank\.rpm: must be a positive number",
        r"keys\.toml:20: extra: unknown table",
    ]
    for pattern in expected:
        assert re.search(pattern, rendered), (pattern, rendered)
    assert pasted_key not in rendered


def test_keys_file_syntax_error_names_the_line(tmp_path: Path) -> None:
    """A half-written keys file is a ConfigError with its line, so the last good keys keep serving."""
    with pytest.raises(ConfigError, match=r"keys\.toml:2: TOML syntax error"):
        parse_keys(b'[keys.alice]\nhash = "sha256:ab', "keys.toml")


# ---------------------------------------------------------------- the key ring


def test_keyring_combines_env_keys_and_the_file(tmp_path: Path) -> None:
    """Env keys are unrestricted; file keys carry their allow-list and rates; revoked keys are refused."""
    alice, bob = new_key(), new_key()
    write_keys_file(tmp_path / "keys.toml", {
        "alice": KeyEntry(hash=hash_key(alice), models=("alpha",), rpm=3),
        "bob": KeyEntry(hash=hash_key(bob), enabled=False),
    })
    config = parse_config(b'[auth]\nkeys_file = "keys.toml"\n[backends.b]\nbase_url = "http://127.0.0.1:9"\n[models.alpha]\nbackend = "b"\nmodel = "m"\n')
    ring = build_keyring(config, keys_file_path(config, tmp_path / "models.toml"), {"GATEWAY_API_KEYS": "sk-env-1, sk-env-2"})

    env = ring.authenticate("Bearer sk-env-2")
    assert env.name == "env-key-" + hashlib.sha256(b"sk-env-2").hexdigest()[:12] and env.may_use("anything")
    identity = ring.authenticate(f"Bearer {alice}")
    assert (identity.name, identity.rpm) == ("alice", 3)
    assert identity.may_use("alpha") and not identity.may_use("beta")
    with pytest.raises(GatewayError) as revoked:
        ring.authenticate(f"Bearer {bob}")
    assert revoked.value.code == "invalid_api_key"


@pytest.mark.parametrize("required", ["true", "false"])
def test_revoking_the_last_key_refuses_it_and_opens_nothing(tmp_path: Path, required: str) -> None:
    """A keys file whose every key is revoked still means keys are in use: with `required = false` too,
    the revoked key and no key at all are refused. Before, an empty ring with auth optional let anyone in."""
    bob = new_key()
    write_keys_file(tmp_path / "keys.toml", {"bob": KeyEntry(hash=hash_key(bob), enabled=False)})
    config = parse_config(
        f'[auth]\nkeys_file = "keys.toml"\nrequired = {required}\n'
        '[backends.b]\nbase_url = "http://127.0.0.1:9"\n[models.alpha]\nbackend = "b"\nmodel = "m"\n'.encode()
    )
    ring = build_keyring(config, keys_file_path(config, tmp_path / "models.toml"), {})
    for authorization, code in ((f"Bearer {bob}", "invalid_api_key"), (None, "missing_api_key")):
        with pytest.raises(GatewayError) as refused:
            ring.authenticate(authorization)
        assert refused.value.code == code


def test_a_key_allowed_an_alias_the_config_lost_is_logged_not_refused(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Renaming an alias drops it from keys' allow-lists: say so, name the key, and keep the key working."""
    carol = new_key()
    write_keys_file(tmp_path / "keys.toml", {
        "carol": KeyEntry(hash=hash_key(carol), models=("alpha", "renamed")),
        "dave": KeyEntry(hash=hash_key(new_key()), models=("gone",), enabled=False),
    })
    config = parse_config(b'[auth]\nkeys_file = "keys.toml"\n[backends.b]\nbase_url = "http://127.0.0.1:9"\n[models.alpha]\nbackend = "b"\nmodel = "m"\n')
    with caplog.at_level(logging.WARNING, logger="gateway.keys"):
        ring = build_keyring(config, keys_file_path(config, tmp_path / "models.toml"), {})
    assert ring.authenticate(f"Bearer {carol}").may_use("alpha")
    assert [r.getMessage() for r in caplog.records] == ["key 'carol' may use 'renamed', which models.toml no longer has"]
    assert carol not in caplog.text


@pytest.mark.parametrize(
    ("authorization", "code"),
    [(None, "missing_api_key"), ("Basic abc", "missing_api_key"), ("Bearer ", "missing_api_key"), ("Bearer sk-wrong", "invalid_api_key")],
)
def test_keyring_refuses_missing_and_wrong_keys(authorization: str | None, code: str) -> None:
    """No key, a non-bearer scheme or an unknown key is a 401 with its own code."""
    ring = KeyRing.from_env_keys(["sk-right"])
    with pytest.raises(GatewayError) as caught:
        ring.authenticate(authorization)
    assert caught.value.code == code and caught.value.status == 401


def test_no_keys_at_all_refuses_unless_auth_is_off() -> None:
    """An empty ring answers no_api_keys_configured, unless `[auth] required = false`."""
    with pytest.raises(GatewayError) as caught:
        KeyRing.from_env_keys([""]).authenticate("Bearer sk-any")
    assert caught.value.code == "no_api_keys_configured"
    assert KeyRing.from_env_keys([], required=False).authenticate(None).name == "anonymous"


# ---------------------------------------------------------------- the CLI


def test_cli_add_list_revoke(tmp_path: Path, standin: StandIn) -> None:
    """`gateway keys add` prints the key once and stores its hash; list hides hashes; revoke disables."""
    (tmp_path / "models.toml").write_text(models_toml(standin))
    added = run_cli("add", "alice", "--models", "alpha", "--rpm", "7", cwd=tmp_path)
    assert added.returncode == 0, added.stderr
    key = added.stdout.strip()
    assert re.fullmatch(r"sk-gw-[A-Za-z0-9_-]{43}", key)
    assert key not in added.stderr
    entry = read_keys_file(tmp_path / "keys.toml")["alice"]
    assert (entry.hash, entry.models, entry.rpm, entry.enabled) == (hash_key(key), ("alpha",), 7, True)

    listed = run_cli("list", cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    assert re.search(r"alice\s+enabled\s+alpha\s+7", listed.stdout)
    assert "sha256" not in listed.stdout + listed.stderr and key not in listed.stdout

    revoked = run_cli("revoke", "alice", cwd=tmp_path)
    assert revoked.returncode == 0, revoked.stderr
    entry = read_keys_file(tmp_path / "keys.toml")["alice"]
    assert entry.enabled is False and entry.revoked_at
    assert re.search(r"alice\s+revoked", run_cli("list", cwd=tmp_path).stdout)


def test_cli_refuses_mistakes_without_writing(tmp_path: Path, standin: StandIn) -> None:
    """A duplicate name, an unknown alias, an unknown key to revoke or a broken file exit 1 and write nothing."""
    (tmp_path / "models.toml").write_text(models_toml(standin))
    assert run_cli("add", "alice", cwd=tmp_path).returncode == 0
    before = (tmp_path / "keys.toml").read_bytes()

    duplicate = run_cli("add", "alice", cwd=tmp_path)
    assert duplicate.returncode == 1 and "exists already" in duplicate.stderr
    typo = run_cli("add", "bob", "--models", "alpah", cwd=tmp_path)
    assert typo.returncode == 1 and "did you mean 'alpha'" in typo.stderr
    unknown = run_cli("revoke", "nobody", cwd=tmp_path)
    assert unknown.returncode == 1 and "no key named 'nobody'" in unknown.stderr
    assert (tmp_path / "keys.toml").read_bytes() == before
    assert not typo.stdout and not duplicate.stdout  # no key was printed for a key not stored

    (tmp_path / "keys.toml").write_text(before.decode() + "surprise = 1\n")
    broken = run_cli("add", "carol", cwd=tmp_path)
    assert broken.returncode == 1 and "nothing was written" in broken.stderr
    assert "carol" not in (tmp_path / "keys.toml").read_text()


def test_cli_without_keys_file_says_how_to_name_one(tmp_path: Path, standin: StandIn) -> None:
    """With no `[auth] keys_file`, `gateway keys add` explains what to add, and `--file` works instead."""
    (tmp_path / "models.toml").write_text(models_toml(standin, keys_file=None))
    refused = run_cli("add", "alice", cwd=tmp_path)
    assert refused.returncode == 1 and "keys_file" in refused.stderr
    direct = run_cli("add", "alice", "--file", "elsewhere.toml", cwd=tmp_path)
    assert direct.returncode == 0, direct.stderr
    assert "alice" in read_keys_file(tmp_path / "elsewhere.toml")


# ---------------------------------------------------------------- a running gateway


def test_keys_file_life_cycle_through_a_running_gateway(
    tmp_path: Path, standin: StandIn, gateway_factory: GatewayFactory, client: httpx.Client
) -> None:
    """Add → the key works within its allow-list; a second add works without restart; revoke → 401 after the reload."""
    (tmp_path / "models.toml").write_text(models_toml(standin))
    alice = run_cli("add", "alice", "--models", "alpha", cwd=tmp_path).stdout.strip()
    gateway = gateway_factory(models_toml(standin), env={"GATEWAY_API_KEYS": ""})

    assert chat(client, gateway.url, alice, "alpha").status_code == 200
    refused = chat(client, gateway.url, alice, "beta")
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "model_not_allowed"
    assert scraped(client, gateway.url, 'gateway_requests_total{alias="beta",status="403"}') == 1
    listed = client.get(f"{gateway.url}/v1/models", headers=bearer(alice)).json()
    assert [m["id"] for m in listed["data"]] == ["alpha"]
    # Asked by name, an alias outside the list is refused as a chat names it, not "not found" here and 403 there;
    # and a name not found is never answered with the close names of aliases the key may not use.
    retrieved = client.get(f"{gateway.url}/v1/models/beta", headers=bearer(alice))
    assert retrieved.status_code == 403 and retrieved.json()["error"]["code"] == "model_not_allowed"
    for typo, hint in (("bet", None), ("alpah", "'alpha'")):
        for answer in (chat(client, gateway.url, alice, typo), client.get(f"{gateway.url}/v1/models/{typo}", headers=bearer(alice))):
            message = answer.json()["error"]["message"]
            assert answer.status_code == 404 and "beta" not in message, message
            assert hint is None or f"Did you mean {hint}?" in message, message

    # The status names every backend and upstream model id: not for a key limited to some aliases (SPEC §1).
    hidden = client.get(f"{gateway.url}/v1/gateway/status", headers=bearer(alice))
    assert hidden.status_code == 403 and hidden.json()["error"]["code"] == "status_not_allowed"
    assert "alpha-up" not in hidden.text and "beta-up" not in hidden.text

    bob = run_cli("add", "bob", cwd=tmp_path).stdout.strip()
    assert wait_for_status(client, gateway.url, bob, "beta", 200).status_code == 200
    assert client.get(f"{gateway.url}/v1/gateway/status", headers=bearer(bob)).status_code == 200
    assert "Did you mean 'beta'?" in chat(client, gateway.url, bob, "bet").json()["error"]["message"]

    assert run_cli("revoke", "alice", cwd=tmp_path).returncode == 0
    revoked = wait_for_status(client, gateway.url, alice, "alpha", 401)
    assert revoked.status_code == 401 and revoked.json()["error"]["code"] == "invalid_api_key"
    assert chat(client, gateway.url, bob, "alpha").status_code == 200

    log = gateway.process.log_text()
    for secret in (alice, bob, hash_key(alice).removeprefix("sha256:"), hash_key(bob).removeprefix("sha256:")):
        assert secret not in log
        assert secret not in revoked.text

def wait_for_last_error(client: httpx.Client, url: str, key: str, present: bool) -> dict[str, object]:
    deadline = time.monotonic() + RELOAD_WAIT_S
    status: dict[str, object] = {}
    while time.monotonic() < deadline:
        status = client.get(f"{url}/v1/gateway/status", headers=bearer(key)).json()
        if bool(status.get("last_error")) == present:
            break
        time.sleep(POLL_S)
    return status


@pytest.mark.parametrize("broken", ["typo", "empty"])
def test_broken_keys_file_keeps_the_last_good_keys(
    tmp_path: Path, standin: StandIn, gateway_factory: GatewayFactory, client: httpx.Client, broken: str
) -> None:
    """A keys file edit that does not parse changes nothing: the keys that served go on serving. An empty
    file (a save half done) is such an edit: read as "no keys", it locked every key out."""
    (tmp_path / "models.toml").write_text(models_toml(standin))
    alice = run_cli("add", "alice", cwd=tmp_path).stdout.strip()
    gateway = gateway_factory(models_toml(standin), env={"GATEWAY_API_KEYS": ""})
    assert chat(client, gateway.url, alice, "alpha").status_code == 200

    keys = tmp_path / "keys.toml"
    keys.write_text(keys.read_text().replace("enabled = true", "enabled = flase") if broken == "typo" else "\n")
    status = wait_for_last_error(client, gateway.url, alice, present=True)
    assert "keys.toml" in str(status.get("last_error"))
    assert chat(client, gateway.url, alice, "alpha").status_code == 200



def test_a_keys_file_that_vanishes_keeps_its_keys_and_says_so(
    tmp_path: Path, standin: StandIn, gateway_factory: GatewayFactory, client: httpx.Client
) -> None:
    """rm keys.toml (a slip, or an editor saving by delete-and-write) locks no one out, and is shown where
    a bad edit is; the file back as it was clears that."""
    (tmp_path / "models.toml").write_text(models_toml(standin))
    alice = run_cli("add", "alice", cwd=tmp_path).stdout.strip()
    gateway = gateway_factory(models_toml(standin), env={"GATEWAY_API_KEYS": ""})
    assert chat(client, gateway.url, alice, "alpha").status_code == 200

    keys = tmp_path / "keys.toml"
    kept = keys.read_bytes()
    keys.unlink()
    status = wait_for_last_error(client, gateway.url, alice, present=True)
    assert "keys file is gone" in str(status.get("last_error")), status
    assert client.get(f"{gateway.url}/readyz").json()["reload_error"] is True
    assert chat(client, gateway.url, alice, "alpha").status_code == 200

    keys.write_bytes(kept)
    assert wait_for_last_error(client, gateway.url, alice, present=False).get("last_error") is None
    assert chat(client, gateway.url, alice, "alpha").status_code == 200


def test_env_keys_are_named_by_the_key_not_its_place() -> None:
    """Their rate counters are stored under this name: named by place (env-key-1), the first key of two
    gateways sharing one Redis shared one budget, and a key took another's when the list's order changed."""
    first, other = KeyRing.from_env_keys(["sk-one", "sk-two"]), KeyRing.from_env_keys(["sk-team-b"])
    reordered = KeyRing.from_env_keys(["sk-two", "sk-one"])
    assert first.authenticate("Bearer sk-one").name != other.authenticate("Bearer sk-team-b").name
    assert first.authenticate("Bearer sk-two").name == reordered.authenticate("Bearer sk-two").name
    name = first.authenticate("Bearer sk-one").name
    assert name.startswith("env-key-") and hashlib.sha256(b"sk-one").hexdigest() not in name


def test_a_key_limited_to_some_aliases_is_not_served_by_a_fallback_it_may_not_use(
    tmp_path: Path, standin: StandIn, gateway_factory: GatewayFactory, client: httpx.Client
) -> None:
    """alice may use `alpha`, which falls back to `beta`: when alpha fails she gets the failure, not an
    answer from beta (a key for local models only was served by the cloud model a local one falls back to)."""
    alice = new_key()
    write_keys_file(tmp_path / "keys.toml", {"alice": KeyEntry(hash=hash_key(alice), models=("alpha",))})
    config = models_toml(standin).replace('model = "alpha-up"\n', 'model = "alpha-up"\nfallback = ["beta"]\nretries = 0\n')
    gateway = gateway_factory(config, env={"GATEWAY_API_KEYS": "sk-everything"})
    standin.script("alpha-up", [{"kind": "status", "status": 503}])
    refused = chat(client, gateway.url, alice, "alpha")
    assert refused.status_code == 502 and refused.headers["x-gateway-attempts"] == "1", refused.text
    assert "beta" not in refused.text
    served = chat(client, gateway.url, "sk-everything", "alpha")
    assert served.status_code == 200 and served.headers["x-gateway-served-by"] == "beta"
