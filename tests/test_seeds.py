r"""The seed pages' curl recipes, run as written with real curl, jq and base64 against a real gateway.

The recipes below are copied verbatim from the seed pages (``../shared/seeds/``;
``test_recipes_are_verbatim_copies_of_the_seed_pages`` checks the copy when the
pages are present). Only three things are substituted, as a reader of the pages
would: the host (the test gateway's URL), ``$BEARER`` (the test's key, from the
environment) and the photo (a small real JPEG written as ``photo.jpg`` /
``source.jpg`` in the recipe's working directory).

The gateway serves a models.toml built from the shipped one with only the
backends' ``base_url`` pointed at the upstream stand-in, so the seed aliases'
real entries are what is tested. The ``/c1/chat`` recipe is tested with the
``/c1/chat`` endpoint, not here.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import CLIENT_KEY
from harness import GatewayProcess, StandIn, local_client, serving_shipped, tiny_jpeg

REPO = Path(__file__).resolve().parent.parent
SEEDS_DIR = REPO.parent / "shared" / "seeds"
SEED_HOST = "https://dgx-spark-4236.spass.fun"
RECIPE_TIMEOUT_S = 60

# Upstream model ids of the shipped file's seed aliases (shared with other tests: each test scripts what it needs).
NANO_BANANA_UPSTREAM = "google/gemini-3.1-flash-image-preview"
GPT_IMAGE_UPSTREAM = "openai/gpt-5.4-image-2"

# ---------------------------------------------------------------- the recipes, verbatim

VISION_ENCODE_AND_SEND = r"""B64=$(base64 -w 0 photo.jpg)

curl -s https://dgx-spark-4236.spass.fun/v1/chat/completions \
  -H "Authorization: Bearer $BEARER" \
  -H "Content-Type: application/json" \
  -d "{
    \"model\": \"qwen3-vl-30b-instruct\",
    \"messages\": [{
      \"role\": \"user\",
      \"content\": [
        {\"type\": \"text\", \"text\": \"Describe this image in one sentence.\"},
        {\"type\": \"image_url\", \"image_url\": {\"url\": \"data:image/jpeg;base64,$B64\"}}
      ]
    }],
    \"max_tokens\": 200
  }"
"""

VISION_URL_REJECTED = r"""curl -s https://dgx-spark-4236.spass.fun/v1/chat/completions \
  -H "Authorization: Bearer $BEARER" \
  -H "Content-Type: application/json" \
  -d '{
    "model": "claude-opus-4.7",
    "messages": [{
      "role": "user",
      "content": [
        {"type": "text", "text": "What logo?"},
        {"type": "image_url", "image_url": {"url": "https://example.com/logo.png"}}
      ]
    }]
  }'
"""

# The answer the seed prints for VISION_URL_REJECTED (its message is elided there with "...").
VISION_URL_REJECTED_ANSWER = """{
  "error": {
    "type": "invalid_request_error",
    "code": "image_url_not_supported",
    "message": "Cloud providers don't fetch URLs server-side. Encode the image as a base64 data URI ...",
    "param": "messages[0].content[1].image_url.url"
  }
}"""

IMAGE_GENERATE_ONE = r"""curl -s --max-time 240 https://dgx-spark-4236.spass.fun/v1/chat/completions \
  -H "Authorization: Bearer $BEARER" \
  -H "Content-Type: application/json" \
  -d '{
    "model": "nano-banana",
    "messages": [{
      "role": "user",
      "content": "Generate a photo of a small green frog wearing a tiny crown, photorealistic"
    }],
    "stream": false
  }' \
  | jq -r '.choices[0].message.images[0].image_url.url' \
  | sed 's/^data:image\/[a-z]*;base64,//' \
  | base64 -d > frog.jpg
"""

IMAGE_COMPARE_ALIASES = r"""PROMPT="A vintage scientific illustration of a hummingbird"

for ALIAS in nano-banana gpt-image image-gen; do
  echo "=== $ALIAS ==="
  T0=$(date +%s)
  curl -s --max-time 240 https://dgx-spark-4236.spass.fun/v1/chat/completions \
    -H "Authorization: Bearer $BEARER" \
    -H "Content-Type: application/json" \
    -d "{\"model\": \"$ALIAS\", \"messages\": [{\"role\": \"user\", \"content\": \"$PROMPT\"}], \"stream\": false}" \
    | jq -r '.choices[0].message.images[0].image_url.url' \
    | tee >(wc -c) \
    | sed 's/^data:image\/[a-z]*;base64,//' \
    | base64 -d > "${ALIAS}.jpg"
  echo "  time: $(($(date +%s) - T0)) s"
done
"""

IMAGE_EDIT = r"""B64=$(base64 -w 0 source.jpg)

curl -s --max-time 240 https://dgx-spark-4236.spass.fun/v1/chat/completions \
  -H "Authorization: Bearer $BEARER" \
  -H "Content-Type: application/json" \
  -d "{
    \"model\": \"nano-banana\",
    \"messages\": [{
      \"role\": \"user\",
      \"content\": [
        {\"type\": \"text\", \"text\": \"Make this look like an oil painting\"},
        {\"type\": \"image_url\", \"image_url\": {\"url\": \"data:image/jpeg;base64,$B64\"}}
      ]
    }],
    \"stream\": false
  }"
"""

RECIPES = {
    "vision encode-and-send": VISION_ENCODE_AND_SEND,
    "vision url rejected": VISION_URL_REJECTED,
    "vision url rejected answer": VISION_URL_REJECTED_ANSWER,
    "image generate one": IMAGE_GENERATE_ONE,
    "image compare aliases": IMAGE_COMPARE_ALIASES,
    "image edit": IMAGE_EDIT,
}

# ---------------------------------------------------------------- a real photo


PHOTO = tiny_jpeg()

# ---------------------------------------------------------------- running a recipe


@pytest.fixture(scope="module")
def tools() -> None:
    missing = [tool for tool in ("bash", "curl", "jq", "base64", "sed", "tee", "wc") if shutil.which(tool) is None]
    if missing:
        pytest.fail(f"the seed recipes need {', '.join(missing)} on PATH (CI installs jq with apt-get)")


@pytest.fixture(scope="module")
def seed_gateway(standin: StandIn, tools: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    with serving_shipped(standin, tmp_path_factory.mktemp("seeds")) as running:
        yield running


@pytest.fixture
def workdir(tmp_path: Path) -> Iterator[Path]:
    directory = tmp_path / "recipe"
    directory.mkdir()
    (directory / "photo.jpg").write_bytes(PHOTO)
    (directory / "source.jpg").write_bytes(PHOTO)
    yield directory


def recipe_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}  # loopback only, never a proxy
    env["BEARER"] = CLIENT_KEY
    return env


def run_recipe(recipe: str, gateway: GatewayProcess, workdir: Path) -> subprocess.CompletedProcess[str]:
    """Run the recipe text with bash in `workdir`, the host substituted; it must exit 0."""
    assert SEED_HOST in recipe
    script = recipe.replace(SEED_HOST, gateway.url)
    done = subprocess.run(
        ["bash", "-c", script],
        cwd=workdir,
        env=recipe_env(),
        capture_output=True,
        text=True,
        timeout=RECIPE_TIMEOUT_S,
        check=False,
    )
    assert done.returncode == 0, f"exit {done.returncode}\nstdout: {done.stdout}\nstderr: {done.stderr}"
    return done


def run_clean(recipe: str, gateway: GatewayProcess, workdir: Path) -> str:
    """Run a recipe that must print nothing on stderr; returns its stdout."""
    done = run_recipe(recipe, gateway, workdir)
    assert done.stderr == "", done.stderr
    return done.stdout


def upstream_bodies(standin: StandIn, model: str, since: int) -> list[dict[str, Any]]:
    return [r["body"] for r in standin.requests()[since:] if r["model"] == model]


def image_kind(data: bytes) -> str | None:
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    return None


def generated_image(gateway: GatewayProcess, alias: str) -> bytes:
    """The bytes of the image `alias` answers with, fetched directly (no shell in between)."""
    body = {"model": alias, "messages": [{"role": "user", "content": "an image"}], "stream": False}
    with local_client(timeout_s=RECIPE_TIMEOUT_S) as client:
        response = client.post(
            f"{gateway.url}/v1/chat/completions", json=body, headers={"authorization": f"Bearer {CLIENT_KEY}"}
        )
    assert response.status_code == 200, response.text
    url = response.json()["choices"][0]["message"]["images"][0]["image_url"]["url"]
    return base64.b64decode(url.split(",", 1)[1])


# ---------------------------------------------------------------- the tests


def test_recipes_are_verbatim_copies_of_the_seed_pages() -> None:
    """Each recipe in this file appears character for character in a seed page."""
    pages = sorted(SEEDS_DIR.glob("*.txt")) if SEEDS_DIR.is_dir() else []
    if not pages:
        pytest.skip(f"the seed pages are not next to this checkout ({SEEDS_DIR.name} of ../shared)")
    text = "\n".join(page.read_text(encoding="utf-8") for page in pages)
    for name, recipe in RECIPES.items():
        assert recipe.strip("\n") in text, name


def test_vision_encode_and_send(seed_gateway: GatewayProcess, standin: StandIn, workdir: Path) -> None:
    """The seed's base64 recipe gets an answer from qwen3-vl-30b-instruct; the photo reaches upstream intact."""
    since = len(standin.requests())
    answer = json.loads(run_clean(VISION_ENCODE_AND_SEND, seed_gateway, workdir))
    assert answer["model"] == "qwen3-vl-30b-instruct"
    assert answer["choices"][0]["message"]["content"] == "echo: Describe this image in one sentence."
    (sent,) = upstream_bodies(standin, "qwen/qwen3-vl-30b-a3b-instruct", since)
    image = sent["messages"][0]["content"][1]["image_url"]["url"]
    assert image == "data:image/jpeg;base64," + base64.b64encode(PHOTO).decode()
    assert sent["max_tokens"] == 200


def test_vision_url_is_rejected_as_the_seed_shows(
    seed_gateway: GatewayProcess, standin: StandIn, workdir: Path
) -> None:
    """The seed's https-URL recipe prints the seed's error: same type, code and param, the message it begins."""
    since = len(standin.requests())
    answer = json.loads(run_clean(VISION_URL_REJECTED, seed_gateway, workdir))
    shown = json.loads(VISION_URL_REJECTED_ANSWER)["error"]
    error = answer["error"]
    for key in ("type", "code", "param"):
        assert error[key] == shown[key], key
    assert error["message"].startswith(shown["message"].removesuffix(" ..."))
    assert error["pointer"] == "/messages/0/content/1/image_url/url"
    assert upstream_bodies(standin, "anthropic/claude-opus-4.7", since) == []  # refused before any upstream call


def test_image_generate_one(seed_gateway: GatewayProcess, standin: StandIn, workdir: Path) -> None:
    """The seed's jq | sed | base64 -d pipeline writes frog.jpg, a real JPEG, from nano-banana's answer."""
    standin.script(NANO_BANANA_UPSTREAM, [{"kind": "ok", "image_format": "jpeg"}])
    since = len(standin.requests())
    assert run_clean(IMAGE_GENERATE_ONE, seed_gateway, workdir) == ""
    (sent,) = upstream_bodies(standin, NANO_BANANA_UPSTREAM, since)
    assert sent["modalities"] == ["image", "text"]  # the alias's params ask for image output
    frog = (workdir / "frog.jpg").read_bytes()
    assert image_kind(frog) == "jpeg"
    assert frog == generated_image(seed_gateway, "nano-banana")


def test_image_compare_aliases(seed_gateway: GatewayProcess, standin: StandIn, workdir: Path) -> None:
    """The seed's compare loop writes one image per alias; image-gen's comes from its first member.

    The recipe as written feeds `tee >(wc -c)`'s count into the pipe to `base64 -d`
    (the process substitution inherits tee's stdout), so after each image base64
    decodes a byte or two of the count and says "invalid input". That is the
    recipe's own doing; the image itself arrives whole.
    """
    standin.script(NANO_BANANA_UPSTREAM, [{"kind": "ok", "image_format": "jpeg"}])
    standin.script(GPT_IMAGE_UPSTREAM, [{"kind": "ok", "image_format": "jpeg"}])
    since = len(standin.requests())
    done = run_recipe(IMAGE_COMPARE_ALIASES, seed_gateway, workdir)
    lines = done.stdout.splitlines()
    assert lines[0::2] == ["=== nano-banana ===", "=== gpt-image ===", "=== image-gen ==="]
    assert all(re.fullmatch(r"  time: \d+ s", line) for line in lines[1::2]), lines
    assert set(done.stderr.splitlines()) <= {"base64: invalid input"}
    expected = generated_image(seed_gateway, "nano-banana")
    for alias in ("nano-banana", "gpt-image", "image-gen"):
        written = (workdir / f"{alias}.jpg").read_bytes()
        assert written.startswith(expected), alias
        assert len(written) - len(expected) <= 3, alias  # at most the decoded digits of the count
    assert len(upstream_bodies(standin, NANO_BANANA_UPSTREAM, since)) == 3  # nano-banana, image-gen's first, ours
    assert len(upstream_bodies(standin, GPT_IMAGE_UPSTREAM, since)) == 1


def test_image_edit_with_image_input(seed_gateway: GatewayProcess, standin: StandIn, workdir: Path) -> None:
    """The seed's image-input recipe sends source.jpg to nano-banana and gets an image back."""
    standin.script(NANO_BANANA_UPSTREAM, [{"kind": "ok", "image_format": "jpeg"}])
    since = len(standin.requests())
    answer = json.loads(run_clean(IMAGE_EDIT, seed_gateway, workdir))
    assert answer["model"] == "nano-banana"
    url = answer["choices"][0]["message"]["images"][0]["image_url"]["url"]
    assert url.startswith("data:image/jpeg;base64,")
    assert image_kind(base64.b64decode(url.split(",", 1)[1])) == "jpeg"
    (sent,) = upstream_bodies(standin, NANO_BANANA_UPSTREAM, since)
    assert sent["messages"][0]["content"][1]["image_url"]["url"].endswith(base64.b64encode(PHOTO).decode())


README = REPO / "README.md"
README_HOST, README_KEY = "http://127.0.0.1:8080", "sk-mine"


def readme_c1_recipes() -> list[str]:
    """The README's shell blocks that call /c1/chat, as written there."""
    blocks = re.findall(r"```sh\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.DOTALL)
    return [block for block in blocks if "/c1/chat" in block and "curl" in block]


@pytest.mark.parametrize("photo_bytes", [len(PHOTO), 200_000], ids=["small", "200kB"])
def test_the_readmes_c1_recipes_work_as_written(
    photo_bytes: int, seed_gateway: GatewayProcess, standin: StandIn, workdir: Path
) -> None:
    """Each README recipe for /c1/chat, host and key changed, gets its answer; the one for any size (from
    standard input) with a photo past what one argument can hold, where the shell refuses the other."""
    photo = PHOTO + bytes(photo_bytes - len(PHOTO))  # still a JPEG by its head: the gateway sniffs the type
    (workdir / "photo.jpg").write_bytes(photo)
    recipes = readme_c1_recipes()
    assert len(recipes) == 2, recipes
    for recipe in recipes if photo_bytes == len(PHOTO) else [r for r in recipes if "@-" in r]:
        since = len(standin.requests())
        assert README_HOST in recipe and README_KEY in recipe
        script = recipe.replace(README_HOST, seed_gateway.url).replace(README_KEY, CLIENT_KEY)
        done = subprocess.run(["bash", "-c", script], cwd=workdir, env=recipe_env(), capture_output=True, text=True,
                              timeout=RECIPE_TIMEOUT_S, check=False)
        assert done.returncode == 0 and done.stderr == "", done.stderr
        answer = json.loads(done.stdout)
        assert answer["model"] == "qwen3-vl-30b-instruct", answer
        (sent,) = upstream_bodies(standin, "qwen/qwen3-vl-30b-a3b-instruct", since)
        assert sent["messages"][-1]["content"][-1]["image_url"]["url"] == "data:image/jpeg;base64," + base64.b64encode(photo).decode()
