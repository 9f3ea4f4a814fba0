"""Tests for gateway.config.load: every problem of a models.toml, with its table path and line.

Each ``configs/bad/NAME.toml`` is a broken models.toml; ``NAME.expected`` holds the
exact lines the loader must render for it (source name "models.toml").
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import tomli_w
from hypothesis import given
from hypothesis import strategies as st

from gateway.config import Config, ConfigError, load_config, parse_config
from gateway.config.load import locate_lines, render_path

TESTS_DIR = Path(__file__).resolve().parent
BAD_DIR = TESTS_DIR / "configs" / "bad"
BAD_FILES = sorted(BAD_DIR.glob("*.toml"))
SHIPPED = TESTS_DIR.parent / "models.toml"

GOOD_MINIMAL = b"""
[backends.local]
base_url = "http://127.0.0.1:8000/v1"

[models."qwen3-8b"]
backend = "local"
model = "qwen3-8b"
"""


def rendered_issues(data: bytes, source: str = "models.toml") -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(data, source)
    return info.value.render().splitlines()


# ---------------------------------------------------------------- the folder of bad files


def test_bad_folder_has_every_case_with_its_expected_lines() -> None:
    """Every bad config file has a sibling .expected file, and no .expected file is orphaned."""
    assert len(BAD_FILES) >= 15
    expected = {p.stem for p in BAD_DIR.glob("*.expected")}
    assert expected == {p.stem for p in BAD_FILES}


@pytest.mark.parametrize("bad", BAD_FILES, ids=[p.stem for p in BAD_FILES])
def test_bad_config_renders_its_expected_lines(bad: Path) -> None:
    """A broken models.toml is refused with exactly the issue lines its .expected file lists, in file order."""
    expected = bad.with_suffix(".expected").read_text(encoding="utf-8").splitlines()
    assert rendered_issues(bad.read_bytes()) == expected


@pytest.mark.parametrize("bad", BAD_FILES, ids=[p.stem for p in BAD_FILES])
def test_bad_config_issues_name_a_path_or_a_line(bad: Path) -> None:
    """Every issue says where it is: a table path, a line, or both; issues come sorted by line."""
    with pytest.raises(ConfigError) as info:
        parse_config(bad.read_bytes())
    issues = info.value.issues
    assert issues
    for issue in issues:
        assert issue.path or issue.line, issue
    lines = [issue.line or 0 for issue in issues]
    assert lines == sorted(lines)


def test_many_problems_are_all_reported_in_one_pass() -> None:
    """Problems in different sections and aliases of one file are reported together, not one per run."""
    lines = rendered_issues((BAD_DIR / "many_problems.toml").read_bytes())
    paths = [line.split(": ")[1] for line in lines]
    assert paths == [
        "defaults.timeout_s",
        'models."gpt-5.5-pro".min_max_tokens',
        'models."gemma-4-31b".context_windw',
        'models."llama-4-scout".backend',
        'models."llama-4-scout".fallback[0]',
        'models."image-gen".route[0]',
        'models."image-gen".input[1]',
    ]


def test_type_error_does_not_hide_a_value_error_in_the_same_alias() -> None:
    """A wrong type and a non-positive number in one alias are both reported."""
    data = GOOD_MINIMAL + b'tools = "false"\ncontext_window = 0\nfallback = ["nope"]\n'
    lines = rendered_issues(data)
    assert lines == [
        'models.toml:8: models."qwen3-8b".tools: expected true or false, got "false"',
        'models.toml:9: models."qwen3-8b".context_window: must be a positive number, got 0',
        "models.toml:10: models.\"qwen3-8b\".fallback[0]: unknown alias 'nope'; known: qwen3-8b",
    ]


def test_refusals_of_backend_settings_repeat_no_value() -> None:
    """A URL may hold credentials, a header a key, api_key_env a pasted key: no message shows them."""
    text = "\n".join(rendered_issues((BAD_DIR / "bad_backends.toml").read_bytes()))
    for secret in ("sk-or-FAKE-123", "secret-in-url", "X-Injected", "模"):
        assert secret not in text


def test_urls_with_credentials_ipv6_or_a_query_are_good_base_urls() -> None:
    for url in ("http://user:pw@127.0.0.1:8000/v1", "https://[::1]:8443/v1/", "http://localhost/v1?api-version=1", "HTTP://127.0.0.1:1/v1"):
        parse_config(GOOD_MINIMAL.replace(b"http://127.0.0.1:8000/v1", url.encode()))


def test_a_byte_order_mark_is_no_part_of_the_file() -> None:
    """Windows editors write one; the lines after it keep their numbers."""
    assert parse_config(b"\xef\xbb\xbf" + GOOD_MINIMAL).models["qwen3-8b"].model == "qwen3-8b"
    assert rendered_issues(b"\xef\xbb\xbf" + GOOD_MINIMAL.replace(b'model = "qwen3-8b"', b"model = 1")) == [
        'models.toml:7: models."qwen3-8b".model: expected a string, got 1'
    ]


def test_nothing_is_coerced() -> None:
    """cattrs' lenient defaults are off: "false" is not False, 1 is not True, "5" is not 5."""
    for line, expected in (
        (b'streaming = "false"', 'expected true or false, got "false"'),
        (b"streaming = 1", "expected true or false, got 1"),
        (b'max_images = "5"', 'expected an integer, got "5"'),
        (b"max_images = true", "expected an integer, got true"),
        (b"timeout_s = false", "expected a number, got false"),
        (b'input = "image"', 'expected an array, got "image"'),
        (b"notes = 3", "expected a string, got 3"),
    ):
        (issue,) = rendered_issues(GOOD_MINIMAL + line + b"\n")
        assert issue.endswith(expected), issue


def test_source_name_is_the_one_given() -> None:
    """Issue lines start with the source name the caller passes (the config's path)."""
    lines = rendered_issues(b"[models.x]\nbackend = 1\n", source="conf/gw.toml")
    assert lines and all(line.startswith("conf/gw.toml:") for line in lines)


def test_missing_file_is_a_config_error() -> None:
    """A path that does not exist is one ConfigError naming the path, not an OSError."""
    missing = TESTS_DIR / "configs" / "no-such-models.toml"
    with pytest.raises(ConfigError) as info:
        load_config(missing)
    assert info.value.render() == f"{missing}: cannot read the file: No such file or directory"


def test_unreadable_file_is_a_config_error(tmp_path: Path) -> None:
    """A path that cannot be read as a file (here a directory) is one ConfigError naming the path."""
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path)
    (line,) = info.value.render().splitlines()
    assert line.startswith(f"{tmp_path}: cannot read the file: ")


def test_load_config_reads_a_good_file(tmp_path: Path) -> None:
    """load_config returns the structured config of a valid file."""
    path = tmp_path / "models.toml"
    path.write_bytes(GOOD_MINIMAL)
    config = load_config(path)
    assert isinstance(config, Config)
    assert config.models["qwen3-8b"].model == "qwen3-8b"
    assert config.backends["local"].base_url == "http://127.0.0.1:8000/v1"


def test_composite_capabilities_absent_are_derived_not_refused() -> None:
    """A composite that declares no modalities is valid: they are derived from its members."""
    data = GOOD_MINIMAL + b'input = ["text", "image"]\n[models.both]\nroute = ["qwen3-8b"]\n'
    config = parse_config(data)
    assert config.models["both"].input is None


# ---------------------------------------------------------------- the line locator


def test_render_path_quotes_keys_that_are_not_bare() -> None:
    """Paths render as the operator writes them: dotted aliases quoted, indices in brackets."""
    assert render_path(("models", "image-gen", "route", 1)) == 'models."image-gen".route[1]'
    assert render_path(("backends", "spark", "base_url")) == "backends.spark.base_url"


def test_locate_lines_finds_elements_of_multiline_arrays() -> None:
    """An element of a multi-line array is located on its own line; brackets inside strings do not confuse it."""
    text = (
        '[models."image-gen"]\n'  # 1
        "route = [ # members ]\n"  # 2
        '  "nano-banana", "x]",\n'  # 3
        '  [1, [2]], { k = "]" },\n'  # 4
        '  """multi\n'  # 5
        'line""",\n'  # 6
        "]\n"  # 7
        "notes = 'a'\n"  # 8
        "[backends.b]\n"  # 9
    )
    lines = locate_lines(text)
    at = ("models", "image-gen", "route")
    assert lines[at] == 2
    assert [lines[(*at, i)] for i in range(5)] == [3, 3, 4, 4, 5]
    assert lines[("models", "image-gen", "notes")] == 8
    assert lines[("models",)] == 1
    assert lines[("backends", "b")] == 9


# ---------------------------------------------------------------- nothing crashes the loader

TOML_VALUES = st.recursive(
    st.booleans()
    | st.integers(min_value=-(2**40), max_value=2**40)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6,
)


def _shipped() -> dict[str, Any]:
    import tomllib

    return tomllib.loads(SHIPPED.read_text(encoding="utf-8"))


SHIPPED_KEYS = [
    (table, name, key) for table in ("backends", "models") for name, entry in _shipped()[table].items() for key in entry
] + [(section, None, key) for section in ("defaults", "server") for key in _shipped()[section]]


@given(where=st.sampled_from(SHIPPED_KEYS), value=TOML_VALUES)
def test_any_value_in_any_key_of_the_shipped_file_is_loaded_or_refused_cleanly(
    where: tuple[str, str | None, str], value: Any
) -> None:
    """Replacing any value of the shipped models.toml gives a Config or a ConfigError, never a crash."""
    raw = _shipped()
    table, name, key = where
    entry = raw[table] if name is None else raw[table][name]
    entry[key] = value
    data = tomli_w.dumps(raw).encode()
    try:
        parse_config(data)
    except ConfigError as exc:
        assert exc.issues
        assert all(issue.path and issue.line for issue in exc.issues), exc.render()


@given(data=st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
def test_arbitrary_bytes_are_loaded_or_refused_cleanly(data: bytes) -> None:
    """Any bytes at all give a Config or a ConfigError, never another exception."""
    try:
        parse_config(data)
    except ConfigError as exc:
        assert exc.issues
