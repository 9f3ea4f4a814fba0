"""The alias tables ``gateway models`` prints: plain text, or the seed pages' markdown.

``gateway models --rules`` prints what each alias accepts, in words, from the
same compiled rules that judge requests (``AliasRules.explain``): one block per
alias in plain text, one table in markdown.
"""

from __future__ import annotations

import json

from gateway.config.model import Config
from gateway.rules import AliasRules, compile_rules

LOCAL_HOSTS = ("127.0.0.1", "localhost", "[::1]")


def is_local(config: Config, alias: str) -> bool:
    spec = config.models[alias]
    if spec.backend is None:
        return False
    url = config.backends[spec.backend].base_url
    return any(f"//{host}" in url for host in LOCAL_HOSTS)


def _limits(config: Config, alias: str) -> str:
    rules = compile_rules(alias, config.models, config.defaults)
    parts = []
    if rules.context_window:
        parts.append(f"context {rules.context_window:,}")
    if rules.min_max_tokens:
        parts.append(f"max_tokens >= {rules.min_max_tokens}")
    if rules.max_output_tokens:
        parts.append(f"max_tokens <= {rules.max_output_tokens}")
    images = _image_limits(rules)
    if images[0] and "image" in rules.input:
        parts.append(f"{images[0]} images of {images[1] or 0:,} B")
    return ", ".join(parts) or "-"


def _image_limits(rules: AliasRules) -> tuple[int | None, int | None]:
    """An alias's image limits; a composite that declares none shows its members' when they agree."""
    own = (rules.max_images, rules.max_image_bytes)
    if own != (None, None) or not rules.members:
        return own
    members = {_image_limits(member) for member in rules.members}
    return members.pop() if len(members) == 1 else own


def _target(config: Config, alias: str) -> str:
    spec = config.models[alias]
    if spec.route is not None:
        return "composite (" + " → ".join(spec.route) + ")"
    return f"{spec.backend}/{spec.model}"


def alias_rows(config: Config) -> list[list[str]]:
    rows = [["alias", "backend/model", "input", "output", "limits", "notes"]]
    for alias in config.models:
        rules = compile_rules(alias, config.models, config.defaults)
        rows.append([
            alias,
            _target(config, alias),
            ", ".join(sorted(rules.input)),
            ", ".join(sorted(rules.output)),
            _limits(config, alias),
            _one_line(config.models[alias].notes),
        ])
    return rows


def _one_line(text: str) -> str:
    # Notes may span lines (a TOML multi-line string); a table row may not.
    return " ".join(text.split())


def render_text(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows)


def render_markdown(rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    out += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows[1:]]
    return "\n".join(out)


def _latency(config: Config, alias: str) -> str:
    spec = config.models[alias]
    if spec.cold_latency_s:
        low, high = spec.cold_latency_s[0], spec.cold_latency_s[-1]
        return f"{low:g}-{high:g} s" if low != high else f"{low:g} s"
    if spec.route:
        bounds = [b for m in spec.route for b in (config.models[m].cold_latency_s or ())]
        if bounds:
            return f"{min(bounds):g}-{max(bounds):g} s"
    return "-"


def _cost(config: Config, alias: str) -> str:
    spec = config.models[alias]
    if spec.cost_per_mtok_usd is not None:
        return f"~${spec.cost_per_mtok_usd:g}/M tokens"
    if spec.route:
        return "mixed"
    return "-"


def seed_markdown(config: Config) -> str:
    """The seed pages' two tables: vision-capable models, and image generation."""
    vision: list[list[str]] = [["Alias", "Notes"]]
    image_out: list[str] = []
    for alias in config.models:
        rules = compile_rules(alias, config.models, config.defaults)
        if "image" not in rules.input:
            continue
        if "image" in rules.output:
            image_out.append(alias)
            continue
        name = f"{alias} (local)" if is_local(config, alias) else alias
        vision.append([name, _one_line(config.models[alias].notes)])
    # The seed gives image-output aliases one row when they share their notes.
    by_notes: dict[str, list[str]] = {}
    for alias in image_out:
        by_notes.setdefault(_one_line(config.models[alias].notes), []).append(alias)
    vision += [[", ".join(aliases), notes] for notes, aliases in by_notes.items()]

    images: list[list[str]] = [["Alias", "Underlying model", "Cold latency", "Cost (rough)"]]
    for alias in image_out:
        spec = config.models[alias]
        underlying = spec.model if spec.route is None else "composite (" + " → ".join(spec.route) + ")"
        images.append([alias, underlying or "-", _latency(config, alias), _cost(config, alias)])
    return "\n".join(
        ["### Vision-capable models", "", render_markdown(vision), "", "### Image generation", "", render_markdown(images)]
    ) + "\n"


RULE_TOPICS = ("input", "output", "images", "max_tokens", "context", "features", "route", "upstream")


def _upstream_words(config: Config, alias: str) -> str:
    """How the request is shaped for the upstream (operator-only: /v1/models does not show it)."""
    spec = config.models[alias]
    words = [f"{old} is sent as {new}" for old, new in spec.rename.items()]
    words += [f"{key} = {json.dumps(value, default=str)} unless the client sets it" for key, value in spec.params.items()]
    return "; ".join(words) or "-"


def _route_words(config: Config, alias: str, rules: AliasRules) -> str:
    words = dict(rules.explain()).get("route", "")
    fallback = config.models[alias].fallback
    if fallback:
        skip = "tried when every own target fails, skipped when it cannot serve the request"
        words = (words + "; " if words else "") + f"fallback {' → '.join(fallback)} ({skip})"
    return words or "-"


def rules_rows(config: Config) -> list[list[str]]:
    """One row per alias: what it accepts, topic by topic, in words."""
    rows = [["alias", *RULE_TOPICS]]
    for alias in config.models:
        rules = compile_rules(alias, config.models, config.defaults)
        words = dict(rules.explain())
        words["route"] = _route_words(config, alias, rules)
        words["upstream"] = _upstream_words(config, alias)
        rows.append([alias, *(words[topic] for topic in RULE_TOPICS)])
    return rows


def render_rules_text(rows: list[list[str]]) -> str:
    """Plain text: a block per alias (the words are too long for one terminal row)."""
    width = max(len(topic) for topic in rows[0][1:])
    blocks = []
    for row in rows[1:]:
        lines = [row[0]]
        lines += [f"  {topic.ljust(width)}  {words}" for topic, words in zip(rows[0][1:], row[1:], strict=True)]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)

