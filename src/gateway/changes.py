"""What a configuration reload changed, in words an operator reads in the log (SPEC §7).

Pure: two ``Config`` values in, a ``ConfigChanges`` out, no I/O. An alias
"changed" when its own entry differs; a backend change (its URL, key variable,
timeouts) is reported as the backend's, since it may touch many aliases.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs

from gateway.config.model import Config

SECTIONS = ("defaults", "server", "routing", "auth", "limits")


@attrs.frozen
class ConfigChanges:
    """Names added, removed and changed between two loads, each sorted."""

    aliases_added: tuple[str, ...] = ()
    aliases_removed: tuple[str, ...] = ()
    aliases_changed: tuple[str, ...] = ()
    backends_added: tuple[str, ...] = ()
    backends_removed: tuple[str, ...] = ()
    backends_changed: tuple[str, ...] = ()
    sections_changed: tuple[str, ...] = ()
    keys_file_changed: bool = False

    @property
    def empty(self) -> bool:
        return self == ConfigChanges()

    def describe(self) -> str:
        """One line: ``aliases added: a, b; backends changed: local`` (or that nothing took effect)."""
        parts = [
            f"{label}: {', '.join(names)}"
            for label, names in (
                ("aliases added", self.aliases_added),
                ("aliases removed", self.aliases_removed),
                ("aliases changed", self.aliases_changed),
                ("backends added", self.backends_added),
                ("backends removed", self.backends_removed),
                ("backends changed", self.backends_changed),
                ("sections changed", tuple(f"[{s}]" for s in self.sections_changed)),
            )
            if names
        ]
        if self.keys_file_changed:
            parts.append("keys file changed")
        return "; ".join(parts) or "nothing in effect changed (comments or formatting only)"


def _diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    added = tuple(sorted(set(new) - set(old)))
    removed = tuple(sorted(set(old) - set(new)))
    changed = tuple(sorted(name for name in set(old) & set(new) if old[name] != new[name]))
    return added, removed, changed


def diff_configs(old: Config, new: Config, *, keys_file_changed: bool = False) -> ConfigChanges:
    """Compare the serving configuration with the one replacing it."""
    aliases = _diff(old.models, new.models)
    backends = _diff(old.backends, new.backends)
    sections = tuple(name for name in SECTIONS if getattr(old, name) != getattr(new, name))
    return ConfigChanges(*aliases, *backends, sections_changed=sections, keys_file_changed=keys_file_changed)
