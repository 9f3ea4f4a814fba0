"""An alias's request rules, compiled from its models.toml entry once per load.

``compile_rules`` turns an alias entry (with ``[defaults]`` applied) into an
``AliasRules``; ``AliasRules.check(facts)`` raises the first violation as a
``GatewayError`` pointing into the request, or returns None. Nothing here knows
an alias by name: every rule comes from a key of the entry.

A composite's rules are its members': a request is valid for the composite when
one member's rules accept it (the others are skipped at routing time); when none
does, the first member's refusal is the one reported.
"""

from __future__ import annotations

from collections.abc import Mapping

import attrs

from gateway.config.load import effective_modalities
from gateway.config.model import AliasSpec, Defaults
from gateway.errors import GatewayError
from gateway.facts import RequestFacts

MODALITY_WORDS = {"image": "images", "audio": "audio", "video": "video", "file": "files"}


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

    def check(self, facts: RequestFacts) -> None:
        """Raise the first rule this request breaks, or return None."""
        if self.members:
            return self._check_members(facts)
        self._check_modalities(facts)
        self._check_images(facts)
        self._check_tokens(facts)
        self._check_capabilities(facts)

    def accepts(self, facts: RequestFacts) -> bool:
        try:
            self.check(facts)
        except GatewayError:
            return False
        return True

    def _check_members(self, facts: RequestFacts) -> None:
        first: GatewayError | None = None
        for member in self.members:
            try:
                member.check(facts)
            except GatewayError as refusal:
                first = first or refusal
            else:
                return
        assert first is not None
        raise first

    def _check_modalities(self, facts: RequestFacts) -> None:
        for part in facts.parts:
            if part.modality not in self.input:
                accepted = ", ".join(sorted(self.input))
                raise GatewayError(
                    "modality_not_supported",
                    f"Model '{self.alias}' does not accept {MODALITY_WORDS.get(part.modality, part.modality)} "
                    f"(its input is: {accepted}). Remove the part or pick an alias whose input lists "
                    f"{part.modality!r} (GET /v1/models).",
                    at=part.at,
                )

    def _check_images(self, facts: RequestFacts) -> None:
        if self.max_images is not None and len(facts.images) > self.max_images:
            raise GatewayError(
                "too_many_images",
                f"The request holds {len(facts.images)} images; model '{self.alias}' takes at most {self.max_images}.",
                at=facts.images[self.max_images].at,
            )
        if self.max_image_bytes is not None:
            for image in facts.images:
                if image.decoded_bytes > self.max_image_bytes:
                    raise GatewayError(
                        "image_too_large",
                        f"The image is {image.decoded_bytes} bytes ({image.decoded_bytes / 1048576:.1f} MB) decoded; "
                        f"model '{self.alias}' takes at most {self.max_image_bytes} bytes "
                        f"({self.max_image_bytes / 1048576:.1f} MB). Downscale or compress it.",
                        at=image.at,
                    )

    def _check_tokens(self, facts: RequestFacts) -> None:
        for field, value in facts.token_limits:
            if self.min_max_tokens is not None and value < self.min_max_tokens:
                raise GatewayError(
                    "max_tokens_too_small",
                    f"Model '{self.alias}' needs {field} >= {self.min_max_tokens} (got {value}): "
                    f"it reasons before answering and a smaller budget ends in an empty reply.",
                    at=(field,),
                )
            if self.max_output_tokens is not None and value > self.max_output_tokens:
                raise GatewayError(
                    "max_tokens_too_large",
                    f"Model '{self.alias}' writes at most {self.max_output_tokens} tokens; {field} is {value}.",
                    at=(field,),
                )
        if self.context_window is not None:
            reserved = max((value for _, value in facts.token_limits), default=0)
            needed = facts.prompt_tokens_lower_bound + reserved
            if needed > self.context_window:
                raise GatewayError(
                    "context_length_exceeded",
                    f"The messages are at least {facts.prompt_tokens_lower_bound} tokens"
                    + (f" plus {reserved} reserved for the answer" if reserved else "")
                    + f": more than the {self.context_window}-token context window of model '{self.alias}'. "
                    "Shorten the conversation or pick an alias with a larger context_window.",
                    at=("messages",),
                )

    def _check_capabilities(self, facts: RequestFacts) -> None:
        if facts.stream and self.streaming is False:
            raise GatewayError(
                "stream_not_supported", f"Model '{self.alias}' does not stream; send \"stream\": false.", at=("stream",)
            )
        if facts.uses_tools and self.tools is False:
            raise GatewayError(
                "capability_not_supported", f"Model '{self.alias}' does not call tools; remove `tools`.", at=("tools",)
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


def _pick(spec_value: int | None, default: int | None) -> int | None:
    return spec_value if spec_value is not None else default


def compile_rules(name: str, models: Mapping[str, AliasSpec], defaults: Defaults) -> AliasRules:
    """The rules of alias ``name``; a composite's are built from its members'."""
    spec = models[name]
    members: tuple[AliasRules, ...] = ()
    if spec.route is not None:
        members = tuple(compile_rules(member, models, defaults) for member in spec.route)
    return AliasRules(
        alias=name,
        input=frozenset(effective_modalities(models, name, "input")),
        output=frozenset(effective_modalities(models, name, "output")),
        context_window=spec.context_window,
        min_max_tokens=spec.min_max_tokens,
        max_output_tokens=spec.max_output_tokens,
        max_images=_pick(spec.max_images, defaults.max_images),
        max_image_bytes=_pick(spec.max_image_bytes, defaults.max_image_bytes),
        streaming=spec.streaming,
        tools=spec.tools,
        structured_output=spec.structured_output,
        thinking=spec.thinking,
        members=members,
    )
