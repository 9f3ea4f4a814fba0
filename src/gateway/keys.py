"""Build the key ring a configuration load serves with (SPEC §3).

Sources: ``GATEWAY_API_KEYS`` (comma-separated keys, for simple setups) and the
keys file named by ``[auth] keys_file`` (relative to models.toml), which holds
only hashes of keys. The reload path calls ``build_keyring`` on every load and
``keys_file_path`` to know which extra file to watch.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from gateway.auth import KeyRing
from gateway.config.model import Config


def keys_file_path(config: Config, config_path: Path) -> Path | None:
    """The keys file this config names, resolved next to models.toml; None when it names none."""
    if not config.auth.keys_file:
        return None
    path = Path(config.auth.keys_file)
    return path if path.is_absolute() else config_path.parent / path


def build_keyring(config: Config, config_path: Path, environ: Mapping[str, str]) -> KeyRing:
    """The keys this configuration accepts. (The keys file is read by the limits-and-keys work.)"""
    env_keys = environ.get("GATEWAY_API_KEYS", "").split(",")
    return KeyRing.from_env_keys(env_keys, required=config.auth.required)
