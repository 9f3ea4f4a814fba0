"""An alias's request rules, compiled from its models.toml entry once per load.

``compile_rules`` turns an alias entry (with ``[defaults]`` applied) into an
``AliasRules``; ``AliasRules.check(facts)`` raises the first violation as a
``GatewayError`` pointing into the request, or returns None. Nothing here knows
an alias by name: every rule comes from a key of the entry.

Which key makes which rule:
- ``input`` → a content part whose modality is not listed: ``modality_not_supported``
  (text is always accepted); ``output`` → ``modalities`` / ``audio`` asking for an
  output the alias does not produce: ``modality_not_supported``.
- ``max_images``, ``max_image_bytes`` (alias, else ``[defaults]``) → ``too_many_images``,
  ``image_too_large`` (413).
- ``min_max_tokens``, ``max_output_tokens`` → ``max_tokens`` and ``max_completion_tokens``
  outside the bounds: ``max_tokens_too_small`` / ``max_tokens_too_large``.
- ``context_window`` → a prompt whose lower-bound size (``facts.MAX_CHARS_PER_TOKEN``)
  exceeds it: ``context_length_exceeded`` at ``messages``. Only the prompt counts: a
  provider may clamp a large ``max_tokens``, so prompt + ``max_tokens`` over the window
  is not certain to fail; ``max_output_tokens`` bounds ``max_tokens`` instead.
- ``streaming``, ``tools``, ``structured_output``, ``thinking`` set to ``false`` →
  ``stream_not_supported`` / ``capability_not_supported``; absent or ``true`` allows.

Composite and fallback aliases (issue rule 6):
- A composite (``route``) accepts a request when a member can serve it: its own
  declared keys are checked first (they can only narrow), then its members' rules,
  and the request is valid if any member accepts. Routing then tries the members
  in order and skips, without calling them and without counting a failure, those
  whose rules refuse it -- so the first member able to serve it answers. When no
  member accepts, the refusal of the first member that takes the request's
  modalities is reported (its code and location; the first member's when none
  does), named as the composite's. Undeclared limits of a composite come from its
  members, never from ``[defaults]``, so a composite never refuses what a member
  would take; its image limits come from the members that take images.
- ``fallback`` aliases never widen what an alias accepts: a request is judged by
  the alias's own rules, and fallbacks that cannot serve it are skipped at routing.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import attrs

from gateway.config.load import effective_modalities
from gateway.config.model import AliasSpec, Defaults
from gateway.errors import GatewayError
from gateway.facts import MAX_CHARS_PER_TOKEN, RequestFacts

MODALITY_WORDS = {"text": "text", "image": "images", "audio": "audio", "video": "video", "file": "files"}
CAPABILITY_WORDS = {
    "streaming": "streaming",
    "tools": "tools",
    "structured_output": "structured output",
    "thinking": "thinking",
}
CAPABILITIES = tuple(CAPABILITY_WORDS)
LIMIT_KEYS = ("context_window", "max_output_tokens", "min_max_tokens", "max_images", "max_image_bytes")
IMAGE_LIMIT_KEYS = ("max_images", "max_image_bytes")
IMAGE_TYPES_WORDS = "JPEG, PNG, WebP or GIF as base64 data: URIs"


def _words(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _size(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.3g} {unit} ({n:,} bytes)"
    return f"{n:,} bytes"


@attrs.frozen
class AliasRules:
    """What one alias accepts; every field comes from its entry or ``[defaults]``."""

    alias: str
    input: frozenset[str]
    output: frozenset[str]
    context_window: int | None = None
    min_max_tokens: int | None = None
    max_output_tokens: int | None = None
    max_images: int | None = None
    max_image_bytes: int | None = None
    streaming: bool | None = None
    tools: bool | None = None
    structured_output: bool | None = None
    thinking: bool | None = None
    members: tuple[AliasRules, ...] = ()

    @property
    def is_composite(self) -> bool:
        return bool(self.members)

    def allows(self, capability: str) -> bool:
        """Whether a request using ``capability`` (streaming, tools, ...) can pass: own and, for a composite, a member's."""
        if getattr(self, capability) is False:
            return False
        return not self.members or any(member.allows(capability) for member in self.members)

    def limit(self, key: str) -> int | None:
        """The widest ``key`` (``max_images``, ``min_max_tokens``, ...) a request can meet; None: no limit."""
        own: int | None = getattr(self, key)
        # A member that takes no images has no say in how many or how large: it takes none.
        members = [m for m in self.members if key not in IMAGE_LIMIT_KEYS or "image" in m.input]
        if not members:
            return own
        limits = [member.limit(key) for member in members]
        if None in limits:
            widest = None
        else:
            widest = (min if key == "min_max_tokens" else max)(x for x in limits if x is not None)
        if own is None or widest is None:
            return own if own is not None else widest
        return max(own, widest) if key == "min_max_tokens" else min(own, widest)

    def check(self, facts: RequestFacts) -> None:
        """Raise the first rule this request breaks, or return None."""
        self._check_modalities(facts)
        self._check_images(facts)
        self._check_tokens(facts)
        self._check_capabilities(facts)
        if self.members:
            self._check_members(facts)

    def accepts(self, facts: RequestFacts) -> bool:
        try:
            self.check(facts)
        except GatewayError:
            return False
        return True

    def _check_members(self, facts: RequestFacts) -> None:
        refusals: list[tuple[AliasRules, GatewayError]] = []
        for member in self.members:
            try:
                member.check(facts)
            except GatewayError as error:
                refusals.append((member, error))
            else:
                return
        # The first member that takes what the request sends says why: a text-only member's
        # "no images" would send the client away from an alias that does take images.
        speaker, said = next(((m, r) for m, r in refusals if m._takes_modalities(facts)), refusals[0])
        names = ", ".join(member.alias for member in self.members)
        raise GatewayError(
            said.code,
            f"No member of '{self.alias}' ({names}) can serve this request; '{speaker.alias}' says: {said.message}",
            at=said.at,
        )

    def _takes_modalities(self, facts: RequestFacts) -> bool:
        try:
            self._check_modalities(facts)
        except GatewayError:
            return False
        return True

    def _check_modalities(self, facts: RequestFacts) -> None:
        for part in facts.parts:
            if part.modality not in self.input:
                raise GatewayError(
                    "modality_not_supported",
                    f"Model '{self.alias}' does not accept {MODALITY_WORDS.get(part.modality, part.modality)} "
                    f"(its input is: {', '.join(sorted(self.input))}). Remove the part or pick an alias whose "
                    f"input lists {part.modality!r} (GET /v1/models).",
                    at=part.at,
                )
        for asked in facts.outputs:
            if asked.modality not in self.output:
                raise GatewayError(
                    "modality_not_supported",
                    f"Model '{self.alias}' does not answer with {MODALITY_WORDS.get(asked.modality, repr(asked.modality))} "
                    f"(its output is: {', '.join(sorted(self.output))}). Drop `{asked.at[0]}` or pick an alias whose "
                    f"output lists it (GET /v1/models).",
                    at=asked.at,
                )

    def _check_images(self, facts: RequestFacts) -> None:
        if self.max_images is not None and len(facts.images) > self.max_images:
            raise GatewayError(
                "too_many_images",
                f"The request holds {len(facts.images)} images; model '{self.alias}' takes at most {self.max_images}. "
                "Send fewer images.",
                at=facts.images[self.max_images].at,
            )
        if self.max_image_bytes is not None:
            for image in facts.images:
                if image.decoded_bytes > self.max_image_bytes:
                    raise GatewayError(
                        "image_too_large",
                        f"The image is {_size(image.decoded_bytes)} decoded; model '{self.alias}' takes at most "
                        f"{_size(self.max_image_bytes)} per image. Downscale or compress it.",
                        at=image.at,
                    )

    def _check_tokens(self, facts: RequestFacts) -> None:
        for field, value in facts.token_limits:
            if self.min_max_tokens is not None and value < self.min_max_tokens:
                raise GatewayError(
                    "max_tokens_too_small",
                    f"Model '{self.alias}' needs {field} >= {self.min_max_tokens} (got {value}): "
                    "a smaller budget ends in an empty reply.",
                    at=(field,),
                )
            if self.max_output_tokens is not None and value > self.max_output_tokens:
                raise GatewayError(
                    "max_tokens_too_large",
                    f"Model '{self.alias}' writes at most {self.max_output_tokens} tokens; {field} is {value}.",
                    at=(field,),
                )
        if self.context_window is not None and facts.prompt_tokens_lower_bound > self.context_window:
            raise GatewayError(
                "context_length_exceeded",
                f"The messages are at least {facts.prompt_tokens_lower_bound:,} tokens: more than the "
                f"{self.context_window:,}-token context window of model '{self.alias}'. "
                "Shorten the conversation or pick an alias with a larger context_window.",
                at=("messages",),
            )

    def _check_capabilities(self, facts: RequestFacts) -> None:
        if facts.stream and self.streaming is False:
            raise GatewayError(
                "stream_not_supported", f"Model '{self.alias}' does not stream; send \"stream\": false.", at=("stream",)
            )
        if facts.tools_at is not None and self.tools is False:
            raise GatewayError(
                "capability_not_supported",
                f"Model '{self.alias}' does not call tools; remove `{facts.tools_at[0]}`.",
                at=facts.tools_at,
            )
        if facts.structured_output_at is not None and self.structured_output is False:
            raise GatewayError(
                "capability_not_supported",
                f"Model '{self.alias}' has no structured output; use response_format {{\"type\": \"text\"}}.",
                at=facts.structured_output_at,
            )
        if facts.thinking_at is not None and self.thinking is False:
            raise GatewayError(
                "capability_not_supported",
                f"Model '{self.alias}' has no thinking mode; remove `{facts.thinking_at[0]}`.",
                at=facts.thinking_at,
            )

    # ------------------------------------------------------------ in words

    def explain(self) -> tuple[tuple[str, str], ...]:
        """What this alias accepts, topic by topic, in words an operator reads (CLI and /v1/models)."""
        topics = [
            ("input", self._input_words()),
            ("output", _words(sorted(MODALITY_WORDS[m] for m in self.output))),
            ("images", self._derived(AliasRules._image_words, self.max_images, self.max_image_bytes)),
            ("max_tokens", self._derived(AliasRules._token_words, self.min_max_tokens, self.max_output_tokens)),
            ("context", self._derived(AliasRules._context_words, self.context_window)),
            ("features", self._derived(AliasRules._feature_words, *(getattr(self, c) for c in CAPABILITIES))),
        ]
        if self.members:
            members = " → ".join(m.alias for m in self.members)
            topics.append(("route", f"any member that accepts the request, tried in order: {members}"))
        return tuple(topics)

    def _derived(self, describe: Callable[[AliasRules], str], *own: object) -> str:
        """A topic in words: the alias's own; for a composite that declares nothing, its members' (alike, or each)."""
        if not self.members:
            return describe(self)
        if any(value is not None for value in own) or "image" not in self.input:
            # Own keys narrow the members': describe the widest a request can get through.
            widest: dict[str, Any] = {key: self.limit(key) for key in LIMIT_KEYS}
            widest.update({c: getattr(self, c) if self.allows(c) else False for c in CAPABILITIES})
            return describe(attrs.evolve(self, members=(), **widest))
        said = [(member.alias, describe(member)) for member in self.members]
        if len({text for _, text in said}) == 1:
            return said[0][1]
        return "per member: " + "; ".join(f"{alias}: {text}" for alias, text in said)

    def _input_words(self) -> str:
        others = ("image", "audio", "video", "file")
        accepted = ["text", *(MODALITY_WORDS[m] for m in others if m in self.input)]
        refused = [m for m in others if m not in self.input]
        text = ", ".join(accepted)
        return text + ("; refuses " + ", ".join(refused) + " parts" if refused else "")

    def _image_words(self) -> str:
        if "image" not in self.input:
            return "none (no image input)"
        count = f"up to {self.max_images} per request" if self.max_images is not None else "any number"
        size = f"each up to {_size(self.max_image_bytes)} decoded" if self.max_image_bytes is not None else "of any size"
        return f"{count}, {size}; {IMAGE_TYPES_WORDS}"

    def _token_words(self) -> str:
        low, high = self.min_max_tokens, self.max_output_tokens
        if low is None and high is None:
            return "any"
        if low is not None and high is not None:
            bound = f"from {low:,} to {high:,}"
        else:
            bound = f"at least {low:,}" if low is not None else f"at most {high:,}"
        return f"{bound} (max_tokens and max_completion_tokens)"

    def _context_words(self) -> str:
        if self.context_window is None:
            return "not checked"
        limit = self.context_window * MAX_CHARS_PER_TOKEN
        return (
            f"{self.context_window:,} tokens: refuses a prompt that certainly cannot fit "
            f"(over {limit:,} characters of text)"
        )

    def _feature_words(self) -> str:
        refused = [CAPABILITY_WORDS[c] for c in CAPABILITIES if getattr(self, c) is False]
        declared = [CAPABILITY_WORDS[c] for c in CAPABILITIES if getattr(self, c) is True]
        allowed = [CAPABILITY_WORDS[c] for c in CAPABILITIES if getattr(self, c) is not False]
        if not refused:
            text = "all allowed"
        else:
            text = ("allows " + ", ".join(allowed) + "; " if allowed else "") + "refuses " + ", ".join(refused)
        return text + (" (declares " + ", ".join(declared) + ")" if declared else "")


def _pick(spec_value: int | None, default: int | None) -> int | None:
    return spec_value if spec_value is not None else default


def compile_rules(name: str, models: Mapping[str, AliasSpec], defaults: Defaults) -> AliasRules:
    """The rules of alias ``name``; a composite's are built from its members'."""
    spec = models[name]
    members: tuple[AliasRules, ...] = ()
    image_defaults = defaults
    if spec.route is not None:
        members = tuple(compile_rules(member, models, defaults) for member in spec.route)
        image_defaults = Defaults()  # a composite's undeclared limits are its members'
    return AliasRules(
        alias=name,
        input=frozenset(effective_modalities(models, name, "input")),
        output=frozenset(effective_modalities(models, name, "output")),
        context_window=spec.context_window,
        min_max_tokens=spec.min_max_tokens,
        max_output_tokens=spec.max_output_tokens,
        max_images=_pick(spec.max_images, image_defaults.max_images),
        max_image_bytes=_pick(spec.max_image_bytes, image_defaults.max_image_bytes),
        streaming=spec.streaming,
        tools=spec.tools,
        structured_output=spec.structured_output,
        thinking=spec.thinking,
        members=members,
    )

