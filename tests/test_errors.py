"""The error catalog: every code the source can emit is in it, it is served, and the README shows it."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import GatewayFactory, backend_toml
from gateway.errors import CATALOG, GatewayError, catalog_markdown, catalog_rows, render_param, render_pointer
from harness import StandIn, local_client

REPO = Path(__file__).resolve().parent.parent
SRC = REPO / "src" / "gateway"
README = REPO / "README.md"
CATALOG_START = "<!-- error-catalog:start -->"
CATALOG_END = "<!-- error-catalog:end -->"
OPENAI_ERROR_TYPES = {
    "invalid_request_error",
    "authentication_error",
    "permission_error",
    "rate_limit_error",
    "api_error",
}


def _is_gateway_error_call(node: ast.AST) -> bool:
    if not isinstance(node, ast.Call):
        return False
    func = node.func
    name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else None
    return name == "GatewayError"


def _strings_in(node: ast.AST) -> list[str] | None:
    """The string literals an expression can evaluate to, or None when it can be anything else."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, ast.IfExp):
        body, orelse = _strings_in(node.body), _strings_in(node.orelse)
        return None if body is None or orelse is None else body + orelse
    return None


def _enclosing_functions(tree: ast.Module) -> dict[ast.AST, ast.AST]:
    owner: dict[ast.AST, ast.AST] = {}
    for func in ast.walk(tree):
        if isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(func):
                owner[node] = func  # inner functions come later in the walk and win
    return owner


def _name_values(scope: ast.AST, name: str) -> list[str] | None:
    """Every string a local variable is assigned in its function, or None if one is not a literal."""
    found: list[str] = []
    for node in ast.walk(scope):
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
            values = _strings_in(node.value)
            if values is None:
                return None
            found += values
    return found or None


def emitted_codes() -> Iterator[tuple[str, str]]:
    """(code, where) for every GatewayError the source constructs; unresolvable codes are reported as such."""
    for path in sorted(SRC.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        owner = _enclosing_functions(tree)
        for node in ast.walk(tree):
            if not _is_gateway_error_call(node):
                continue
            assert isinstance(node, ast.Call)
            where = f"{path.relative_to(REPO)}:{node.lineno}"
            keyword = next((k.value for k in node.keywords if k.arg == "code"), None)
            argument = node.args[0] if node.args else keyword
            if argument is None:
                yield "<no code>", where
                continue
            # `self.code` re-raises an error that was already built (GatewayError.relocated).
            if isinstance(argument, ast.Attribute) and argument.attr == "code":
                continue
            values = _strings_in(argument)
            if values is None and isinstance(argument, ast.Name) and node in owner:
                values = _name_values(owner[node], argument.id)
            if values is None:
                yield f"<not a literal: {ast.unparse(argument)}>", where
                continue
            for value in values:
                yield value, where


def test_the_scan_finds_the_codes_of_every_layer() -> None:
    """The source scan sees the edge's, the rules', the images' and the dispatcher's codes (it is not blind)."""
    codes = {code for code, _ in emitted_codes()}
    expected = {
        "invalid_json",
        "request_too_large",
        "image_url_not_supported",
        "modality_not_supported",
        "max_tokens_too_small",
        "model_not_found",
        "missing_api_key",
        "no_api_keys_configured",
        "upstream_error",
        "upstream_timeout",
        "not_found",
        "method_not_allowed",
        "internal_error",
    }
    assert expected <= codes, sorted(expected - codes)


def test_every_emitted_code_is_in_the_catalog() -> None:
    """Every code passed to GatewayError anywhere in src/gateway is a literal the catalog holds."""
    unknown = sorted(f"{where}: {code}" for code, where in emitted_codes() if code not in CATALOG)
    assert unknown == []


def test_no_error_body_is_built_by_hand() -> None:
    """Outside errors.py no dict literal has an error's "code" and "message": every envelope is GatewayError's."""
    by_hand = []
    for path in sorted(SRC.rglob("*.py")):
        if path.name == "errors.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Dict):
                keys = {k.value for k in node.keys if isinstance(k, ast.Constant)}
                if {"code", "message"} <= keys:
                    by_hand.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert by_hand == []


def test_an_unknown_code_cannot_be_raised() -> None:
    """GatewayError refuses a code that is not in the catalog, so no uncatalogued code reaches a client."""
    with pytest.raises(KeyError):
        GatewayError("no_such_code", "message")


def test_catalog_rows_are_well_formed() -> None:
    """Each row has an HTTP error status, an OpenAI error type, and non-empty meaning and fix."""
    for code, kind in CATALOG.items():
        assert kind.code == code
        assert 400 <= kind.status <= 599, code
        assert kind.type in OPENAI_ERROR_TYPES, code
        assert kind.meaning.strip() and kind.fix.strip(), code
        assert (kind.type == "authentication_error") == (kind.status == 401), code


def test_spec_minimum_codes_are_catalogued_with_their_status() -> None:
    """The codes SPEC §4 lists at least are all in the catalog, each with the status SPEC gives it."""
    spec = {
        "invalid_json": 400, "invalid_request": 400, "image_url_not_supported": 400, "invalid_image": 400,
        "unsupported_image_type": 400, "image_too_large": 413, "too_many_images": 400,
        "modality_not_supported": 400, "max_tokens_too_small": 400, "max_tokens_too_large": 400,
        "context_length_exceeded": 400, "stream_not_supported": 400, "missing_api_key": 401,
        "invalid_api_key": 401, "model_not_allowed": 403, "model_not_found": 404, "not_found": 404,
        "method_not_allowed": 405, "request_too_large": 413, "rate_limit_exceeded": 429,
        "concurrency_limit_exceeded": 429, "no_api_keys_configured": 401, "upstream_error": 502,
        "no_image_generated": 502, "upstream_timeout": 504, "no_healthy_backend": 503,
        "backend_not_configured": 503, "internal_error": 500,
    }  # fmt: skip
    assert {code: CATALOG[code].status for code in spec if code in CATALOG} == spec


def test_envelope_carries_param_and_pointer() -> None:
    """An error renders as the OpenAI envelope with the seed's param and the same place as a JSON Pointer."""
    at = ("messages", 0, "content", 1, "image_url", "url")
    envelope = GatewayError("image_url_not_supported", "use a data URI", at=at).envelope()
    assert envelope == {
        "error": {
            "type": "invalid_request_error",
            "code": "image_url_not_supported",
            "message": "use a data URI",
            "param": "messages[0].content[1].image_url.url",
            "pointer": "/messages/0/content/1/image_url/url",
        }
    }


def test_pointer_escapes_per_rfc_6901() -> None:
    """'~' and '/' in a key are escaped as ~0 and ~1 in the pointer; no location renders as null."""
    assert render_pointer(("metadata", "a/b~c")) == "/metadata/a~1b~0c"
    assert render_param(None) is None and render_pointer(None) is None


def test_readme_catalog_block_is_the_rendered_catalog() -> None:
    """The README's error-catalog block is exactly catalog_markdown() (regenerate with `python -m gateway.errors`)."""
    text = README.read_text(encoding="utf-8")
    assert text.count(CATALOG_START) == 1 and text.count(CATALOG_END) == 1
    block = text.split(CATALOG_START, 1)[1].split(CATALOG_END, 1)[0]
    assert block.strip("\n") == catalog_markdown()


def test_catalog_is_served(gateway_factory: GatewayFactory, standin: StandIn) -> None:
    """GET /v1/gateway/errors on a running gateway answers the whole catalog, in table order."""
    gateway = gateway_factory(
        backend_toml(standin) + '[models."errors-alias"]\nbackend = "local"\nmodel = "errors-m"\n'
    )
    with local_client() as client:
        response = client.get(f"{gateway.url}/v1/gateway/errors")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert body["object"] == "list"
    assert body["data"] == [dict(row) for row in catalog_rows()]
    assert [row["code"] for row in body["data"]] == list(CATALOG)
