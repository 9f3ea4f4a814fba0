"""What models.toml says (``model``) and how it is read and checked (``load``)."""

from gateway.config.load import ConfigError, ConfigIssue, load_config, parse_config
from gateway.config.model import AliasSpec, Backend, Config

__all__ = ["AliasSpec", "Backend", "Config", "ConfigError", "ConfigIssue", "load_config", "parse_config"]
