"""Pure routing: a compiled alias and a request's facts → the ordered targets to try.

The order is fixed at load time (own target, fallbacks recursively, or a
composite's members); here only the members whose rules cannot serve this
request (an image to a text-only fallback, say) are left out.
"""

from __future__ import annotations

from gateway.facts import RequestFacts
from gateway.snapshot import CompiledAlias, Target


def plan_attempts(alias: CompiledAlias, facts: RequestFacts) -> tuple[Target, ...]:
    """The targets to try, in order: each alias once, at its first occurrence that accepts the request."""
    chosen: dict[str, Target] = {}
    for target in alias.targets:
        if target.alias not in chosen and target.accepts(facts):
            chosen[target.alias] = target
    return tuple(chosen.values())
