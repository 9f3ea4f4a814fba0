"""The alias tables ``gateway models`` prints: plain text, or the seed pages' markdown."""

from __future__ import annotations

from gateway.config.model import Config
from gateway.rules import compile_rules

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
    if rules.max_images and "image" in rules.input:
        parts.append(f"{rules.max_images} images of {rules.max_image_bytes or 0:,} B")
    return ", ".join(parts) or "-"


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
            config.models[alias].notes,
        ])
    return rows


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
    vision: list[str] = ["### Vision-capable models", "", "| Alias | Notes |", "|---|---|"]
    image_out: list[str] = []
    for alias in config.models:
        rules = compile_rules(alias, config.models, config.defaults)
        if "image" not in rules.input:
            continue
        if "image" in rules.output:
            image_out.append(alias)
            continue
        name = f"{alias} (local)" if is_local(config, alias) else alias
        vision.append(f"| {name} | {config.models[alias].notes} |")
    if image_out:
        vision.append(f"| {', '.join(image_out)} | Vision input + image output |")

    images = ["### Image generation", "", "| Alias | Underlying model | Cold latency | Cost (rough) |", "|---|---|---|---|"]
    for alias in image_out:
        spec = config.models[alias]
        underlying = spec.model if spec.route is None else "composite (" + " → ".join(spec.route) + ")"
        images.append(f"| {alias} | {underlying} | {_latency(config, alias)} | {_cost(config, alias)} |")
    return "\n".join(vision + ["", *images]) + "\n"
