"""Plans: which targets a request may be sent to, in order (no server needed)."""

from __future__ import annotations

import base64

from gateway.config import parse_config
from gateway.facts import inspect_request
from gateway.routing import plan_attempts
from gateway.snapshot import build_snapshot

PNG = "data:image/png;base64," + base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\x00" * 32).decode()

NESTED = b"""
[backends.b]
base_url = "http://127.0.0.1:9/v1"
[models.a]
backend = "b"
model = "a"
input = ["text", "image"]
[models.x]
backend = "b"
model = "x"
input = ["text", "image"]
[models.f]
backend = "b"
model = "f"
input = ["text", "image"]
[models.inner]
route = ["a"]
input = ["text"]
fallback = ["f"]
[models.outer]
route = ["inner", "x"]
"""


def _plan(alias: str, content: object) -> list[str]:
    snapshot = build_snapshot(parse_config(NESTED), environ={})
    facts = inspect_request({"model": alias, "messages": [{"role": "user", "content": content}]})
    return [target.alias for target in plan_attempts(snapshot.lookup(alias), facts)]


def test_a_member_that_refuses_is_skipped_with_all_it_would_fall_back_to() -> None:
    """An image through outer skips `inner` as a unit (`a` and its fallback `f`): inner takes text only."""
    image = [{"type": "image_url", "image_url": {"url": PNG}}]
    assert _plan("outer", image) == ["x"]


def test_text_goes_everywhere_in_plan_order() -> None:
    """Text passes every gate: members in order, the inner composite's fallback after its route."""
    assert _plan("outer", "hello") == ["a", "f", "x"]


def test_the_named_alias_plan_is_its_route_then_its_fallbacks() -> None:
    """Asked for directly, inner's plan is its route, then its fallback."""
    assert _plan("inner", "hello") == ["a", "f"]


def test_a_fallback_that_cannot_serve_the_request_is_skipped() -> None:
    """llama-4-scout style: a text-only fallback is left out for an image request."""
    config = NESTED.replace(b'[models.f]\nbackend = "b"\nmodel = "f"\ninput = ["text", "image"]', b'[models.f]\nbackend = "b"\nmodel = "f"')
    snapshot = build_snapshot(parse_config(config + b'[models.solo]\nbackend = "b"\nmodel = "s"\ninput = ["text", "image"]\nfallback = ["f"]\n'), environ={})
    facts = inspect_request({"model": "solo", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": PNG}}]}]})
    assert [t.alias for t in plan_attempts(snapshot.lookup("solo"), facts)] == ["solo"]


def test_an_alias_gated_out_on_one_path_is_still_tried_on_another() -> None:
    """`v` is both a text-only member's fallback and a member itself: an image goes to `v` as a member."""
    config = NESTED + b"""
[models.t]
backend = "b"
model = "t"
fallback = ["v"]
[models.v]
backend = "b"
model = "v"
input = ["text", "image"]
[models.both]
route = ["t", "v"]
"""
    snapshot = build_snapshot(parse_config(config), environ={})
    image = [{"type": "image_url", "image_url": {"url": PNG}}]
    facts = inspect_request({"model": "both", "messages": [{"role": "user", "content": image}]})
    assert [t.alias for t in plan_attempts(snapshot.lookup("both"), facts)] == ["v"]
    text = inspect_request({"model": "both", "messages": [{"role": "user", "content": "hi"}]})
    assert [t.alias for t in plan_attempts(snapshot.lookup("both"), text)] == ["t", "v"]


def test_a_key_limited_to_some_aliases_is_served_by_no_fallback_it_may_not_use() -> None:
    """A key for `outer` only is served by its members (`a`, `x`: how outer serves), not by `f`, which
    `inner` falls back to: a key for local models only was served by the cloud alias a local one falls
    back to. Given `f` too, it is served by `f` where the plan reaches it."""
    snapshot = build_snapshot(parse_config(NESTED), environ={})
    facts = inspect_request({"model": "outer", "messages": [{"role": "user", "content": "hello"}]})
    plan = lambda allowed: [t.alias for t in plan_attempts(snapshot.lookup("outer"), facts, allowed.__contains__)]
    assert plan({"outer"}) == ["a", "x"]
    assert plan({"outer", "f"}) == ["a", "f", "x"]
    assert [t.alias for t in plan_attempts(snapshot.lookup("outer"), facts)] == ["a", "f", "x"]  # no allow-list
