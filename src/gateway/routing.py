"""Pure routing: a compiled alias and a request's facts → the ordered targets to try.

The order is fixed at load time (own target, fallbacks recursively, or a
composite's members); here only the members whose rules cannot serve this
request (an image to a text-only fallback, say) are left out, and, for a key
limited to some aliases, the fallbacks it may not use.
"""

from __future__ import annotations

from collections.abc import Callable

from gateway.facts import RequestFacts
from gateway.snapshot import CompiledAlias, Target


def plan_attempts(alias: CompiledAlias, facts: RequestFacts, may_use: Callable[[str], bool] | None = None) -> tuple[Target, ...]:
    """The targets to try, in order: each alias once, at its first occurrence that accepts the request.

    ``may_use``: the aliases a key limited to some may use. A composite's members serve it, but a
    fallback is another alias: one the key may not use is left out (a key for local models only
    was served by the cloud model a local alias falls back to).
    """
    chosen: dict[str, Target] = {}
    for target in alias.targets:
        if target.alias in chosen or not target.accepts(facts):
            continue
        if may_use is not None and not all(may_use(fallback) for fallback in target.fallbacks):
            continue
        chosen[target.alias] = target
    return tuple(chosen.values())
