"""Everything derived from one configuration load, in one immutable object.

A ``Snapshot`` holds the config, each alias compiled (its rules and its ordered
targets, fallbacks and composite members resolved), the backends' keys read
from the environment, and the content hash and load time the status page
shows. The gateway swaps snapshots whole; a request reads one and keeps it.

Derived at load time, per alias:
1. Timeouts of each target, resolved alias → backend → ``[defaults]`` → built-in:
   connect, first byte (for a stream: until its first real chunk; default the
   total), idle gap between stream chunks, and total (one attempt's whole time).
2. The plan: own target then ``fallback`` aliases recursively, or a composite's
   ``route`` members in order (then its fallbacks); each alias at most once.
3. The plan's deadline, which bounds a request's total time over all attempts:
   a composite's own ``timeout_s`` when it sets one, else the sum of its
   targets' totals (a target's own ``timeout_s`` is that one attempt's bound,
   not the plan's, so its fallbacks still get their time).
4. Each target's health key (``Target.key``): backend, model and a fingerprint
   of its connection, so a reload that changes where calls go starts afresh.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import re
import time
import urllib.parse
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

import attrs

from gateway.config.model import BUILTIN_RETRIES, AliasSpec, Backend, Config
from gateway.errors import GatewayError
from gateway.facts import RequestFacts
from gateway.rules import AliasRules, compile_rules
from gateway.upstream_errors import scrub

BUILTIN_TOTAL_S = 120.0
BUILTIN_CONNECT_S = 10.0
BUILTIN_IDLE_S = 60.0
# A model id shorter than this is not looked for in an upstream's words: it reads as a word.
MIN_MODEL_MENTION_CHARS = 3


@attrs.frozen
class ResolvedTimeouts:
    """The four timeouts of one target, resolved alias → backend → [defaults] → built-in."""

    total_s: float
    connect_s: float
    first_byte_s: float
    idle_s: float


def connection_fingerprint(base_url: str, api_key: str | None, headers: Mapping[str, str]) -> str:
    """A short hash of what decides where a target's calls go and whether they are let in.

    Health keys carry it, never the key itself; it is not shown either (a hash of a
    short header value could be guessed). 64 bits: a collision would only merge two
    configurations' health, and the shared table's entries stay small.
    """
    material = json.dumps([base_url, api_key, sorted(headers.items())]).encode()
    return hashlib.blake2b(material, digest_size=8, person=b"gateway-target").hexdigest()


@attrs.frozen
class Target:
    """One place a request can be sent: an alias entry's backend and upstream model."""

    alias: str
    backend_name: str
    base_url: str
    model: str
    api_key_env: str | None
    api_key: str | None
    headers: Mapping[str, str]
    params: Mapping[str, Any]
    rename: Mapping[str, str]
    timeouts: ResolvedTimeouts
    retries: int
    image_output: bool
    rules: AliasRules
    cost_per_mtok_usd: float | None = None
    # The own declared keys of every composite this target was reached through: an
    # inner composite that narrows (say input = ["text"]) narrows its members too.
    gates: tuple[AliasRules, ...] = ()
    # The aliases this target was reached through as a fallback (each fallback hop's alias): a key
    # limited to some aliases is served by it only if it may use every one of them.
    fallbacks: tuple[str, ...] = ()
    # Computed once per snapshot, not per request; not shown: it is derived from the key.
    key: tuple[str, str, str] = attrs.field(init=False, repr=False)
    # Computed once too: every stream's relay is given them.
    secrets: tuple[str, ...] = attrs.field(init=False, repr=False)
    # The upstream's id for the model where an upstream's error reason may name it.
    model_mention: re.Pattern[str] | None = attrs.field(init=False, repr=False, eq=False)

    @key.default
    def _health_key(self) -> tuple[str, str, str]:
        """Whose health this target's calls report: its backend and model, and where the calls go.

        Cooldowns are per backend *and* model: one failing model must not cool its
        backend. The connection fingerprint makes a reload that changes the base URL,
        the key or the headers start the target afresh (a wrong URL or key, fixed, is
        a new upstream that must not wait out the broken one's cooldown), while a
        reload that leaves them alone keeps the target's failures and cooldown.
        """
        return (self.backend_name, self.model, connection_fingerprint(self.base_url, self.api_key, self.headers))

    def accepts(self, facts: RequestFacts) -> bool:
        return self.rules.accepts(facts) and all(gate.accepts(facts) for gate in self.gates)

    @property
    def configured(self) -> bool:
        return self.api_key_env is None or self.api_key is not None

    @model_mention.default
    def _model_mention(self) -> re.Pattern[str] | None:
        if self.model == self.alias or len(self.model) < MIN_MODEL_MENTION_CHARS:
            return None  # nothing to hide, or too short to tell from an ordinary word
        # Not inside a longer id: "org/model-7b" is not "org/model-7b-instruct" nor "org/model-7b.1".
        return re.compile(r"(?<![\w./:-])" + re.escape(self.model) + r"(?![\w/:-]|\.\w)")

    def in_client_words(self, text: str) -> str:
        """An upstream's words (an error's reason) as a client may read them: without the target's
        secrets, and naming the alias where they name the upstream's model (SPEC §2: which upstream
        model served goes to the logs and metrics, not to clients)."""
        text = scrub(text, self.secrets)
        return self.model_mention.sub(self.alias, text) if self.model_mention is not None else text

    @secrets.default
    def _secrets(self) -> tuple[str, ...]:
        """What must never reach a client nor a log: the key, the backend's URL and its host."""
        parts = urllib.parse.urlsplit(self.base_url)
        # The host alone too: upstreams name it without the port their URL has. Only a dotted name or an
        # address, though: a one-word host ("spark") would be cut out of every word that holds it.
        hostname = parts.hostname if parts.hostname and ("." in parts.hostname or ":" in parts.hostname) else None
        # Backend headers may carry keys too; short values ("1", "true") cannot be secrets.
        header_values = [value for value in self.headers.values() if len(value) >= 8]
        return tuple(s for s in (self.api_key, self.base_url, parts.netloc, hostname, *header_values) if s)


@attrs.frozen
class CompiledAlias:
    name: str
    spec: AliasSpec
    rules: AliasRules
    targets: tuple[Target, ...]
    deadline_s: float


SHOWN_NAME_CHARS = 100


def _anyone(alias: str) -> bool:
    return True


@attrs.frozen
class Snapshot:
    config: Config
    source: str
    content_hash: str
    loaded_at: float
    aliases: Mapping[str, CompiledAlias]
    unconfigured_backends: Mapping[str, str]
    # The health keys of every target this configuration calls: the status shows these.
    target_keys: frozenset[tuple[str, str, str]] = attrs.field(init=False, repr=False)

    @target_keys.default
    def _target_keys(self) -> frozenset[tuple[str, str, str]]:
        return frozenset(target.key for alias in self.aliases.values() for target in alias.targets)

    def lookup(self, name: str, may_use: Callable[[str], bool] = _anyone) -> CompiledAlias:
        """The alias ``name``, for a caller who may use the aliases ``may_use`` allows.

        A name not found is answered with close names among those only: a key limited to
        some aliases is never told of the others, as GET /v1/models does not list them.
        """
        compiled = self.aliases.get(name)
        if compiled is None:
            offered = [alias for alias in self.aliases if may_use(alias)]
            # A name is shown and compared only so far: no alias is this long, and an error
            # message must not echo megabytes back.
            close = difflib.get_close_matches(name[:SHOWN_NAME_CHARS], offered, n=3, cutoff=0.5)
            hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            shown = name if len(name) <= SHOWN_NAME_CHARS else f"{name[:SHOWN_NAME_CHARS]}… ({len(name):,} characters)"
            raise GatewayError(
                "model_not_found",
                f"The model '{shown}' does not exist.{hint} GET /v1/models lists the models you may use.",
                at=("model",),
            )
        if not may_use(name):
            raise GatewayError("model_not_allowed", f"Your key may not use model '{name}'.", at=("model",))
        return compiled


def _first(*values: float | None) -> float | None:
    return next((v for v in values if v is not None), None)


def _resolve_timeouts(spec: AliasSpec, backend: Backend, config: Config) -> ResolvedTimeouts:
    defaults = config.defaults

    def pick(key: str) -> float | None:
        return _first(getattr(spec, key), getattr(backend, key), getattr(defaults, key))

    total = pick("timeout_s") or BUILTIN_TOTAL_S
    return ResolvedTimeouts(
        total_s=total,
        connect_s=min(pick("connect_timeout_s") or BUILTIN_CONNECT_S, total),
        first_byte_s=min(pick("first_byte_timeout_s") or total, total),
        idle_s=min(pick("idle_timeout_s") or BUILTIN_IDLE_S, total),
    )


def _target(name: str, config: Config, rules: Mapping[str, AliasRules], environ: Mapping[str, str]) -> Target:
    spec = config.models[name]
    assert spec.backend is not None and spec.model is not None  # the loader checked
    backend = config.backends[spec.backend]
    retries = _first(spec.retries, backend.retries, config.defaults.retries)
    return Target(
        alias=name,
        backend_name=spec.backend,
        base_url=backend.base_url.rstrip("/"),
        model=spec.model,
        api_key_env=backend.api_key_env,
        api_key=environ.get(backend.api_key_env) or None if backend.api_key_env else None,
        headers=MappingProxyType(dict(backend.headers)),
        params=MappingProxyType(dict(spec.params)),
        rename=MappingProxyType(dict(spec.rename)),
        timeouts=_resolve_timeouts(spec, backend, config),
        retries=int(retries) if retries is not None else BUILTIN_RETRIES,
        image_output="image" in rules[name].output,
        rules=rules[name],
        cost_per_mtok_usd=spec.cost_per_mtok_usd,
    )


MAX_PLAN_ENTRIES = 64


def _plan_targets(
    name: str,
    config: Config,
    targets: Mapping[str, Target],
    rules: Mapping[str, AliasRules],
    ancestors: tuple[str, ...] = (),
    through: tuple[AliasRules, ...] = (),
    fallbacks: tuple[str, ...] = (),
) -> list[Target]:
    """Own target (or a composite's members, in order), then fallbacks, recursively.

    Every target in the plan of an alias reached as a route member or a fallback is
    gated by that alias's own keys and those of every alias above it: a member that
    cannot serve the request is skipped with all it would fall back to. (For the
    alias the client named this changes nothing: its rules already passed.) An
    alias reached along two paths appears once per path, each with its own gates;
    ``routing`` keeps the first occurrence that accepts the request.
    """
    if name in ancestors:
        return []  # the loader refuses cycles; this only keeps a bad snapshot finite
    spec = config.models[name]
    below = (*through, attrs.evolve(rules[name], members=()))
    path = (*ancestors, name)
    plan: list[Target] = []
    if spec.route is not None:
        for member in spec.route:
            plan += _plan_targets(member, config, targets, rules, path, below, fallbacks)
    else:
        target = targets[name]
        plan.append(attrs.evolve(target, gates=through, fallbacks=fallbacks) if through or fallbacks else target)
    for fallback in spec.fallback:
        plan += _plan_targets(fallback, config, targets, rules, path, below, (*fallbacks, fallback))
    return plan[:MAX_PLAN_ENTRIES]


def plan_deadline_s(spec: AliasSpec, plan: tuple[Target, ...]) -> float:
    """The bound on a request's total time over every attempt of its plan (each alias counted once)."""
    if spec.route is not None and spec.timeout_s is not None:
        return spec.timeout_s
    totals = {target.alias: target.timeouts.total_s for target in plan}
    return sum(totals.values()) or BUILTIN_TOTAL_S


def build_snapshot(
    config: Config,
    *,
    source: str = "models.toml",
    content_hash: str = "",
    environ: Mapping[str, str] | None = None,
) -> Snapshot:
    """Compile a checked ``Config`` into the snapshot requests are served from."""
    environ = os.environ if environ is None else environ
    rules = {name: compile_rules(name, config.models, config.defaults) for name in config.models}
    targets = {
        name: _target(name, config, rules, environ) for name, spec in config.models.items() if spec.route is None
    }
    aliases: dict[str, CompiledAlias] = {}
    for name, spec in config.models.items():
        plan = tuple(_plan_targets(name, config, targets, rules))
        aliases[name] = CompiledAlias(
            name=name, spec=spec, rules=rules[name], targets=plan, deadline_s=plan_deadline_s(spec, plan)
        )
    unconfigured = {
        name: backend.api_key_env
        for name, backend in config.backends.items()
        if backend.api_key_env and not environ.get(backend.api_key_env)
    }
    return Snapshot(
        config=config,
        source=source,
        content_hash=content_hash,
        loaded_at=time.time(),
        aliases=MappingProxyType(aliases),
        unconfigured_backends=MappingProxyType(unconfigured),
    )
