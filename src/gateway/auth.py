"""Who is calling: bearer keys from ``GATEWAY_API_KEYS`` (and later a keys file).

Keys are held only as SHA-256 digests and compared with ``hmac.compare_digest``;
neither keys nor digests are ever logged or answered. With no key configured
at all, every call is refused (``no_api_keys_configured``) unless the config
says ``[auth] required = false`` explicitly.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Mapping

import attrs

from gateway.errors import GatewayError


@attrs.frozen
class Identity:
    """The caller a key belongs to; ``allowed_models`` None means every alias."""

    name: str
    allowed_models: frozenset[str] | None = None

    def may_use(self, alias: str) -> bool:
        return self.allowed_models is None or alias in self.allowed_models


ANONYMOUS = Identity("anonymous")


def digest_key(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


@attrs.frozen
class KeyRing:
    """Digest → identity, built once per configuration load."""

    identities: Mapping[bytes, Identity]
    required: bool = True

    @classmethod
    def from_env_keys(cls, keys: Iterable[str], required: bool = True, extra: Mapping[bytes, Identity] | None = None) -> KeyRing:
        identities: dict[bytes, Identity] = dict(extra or {})
        for i, key in enumerate(k.strip() for k in keys):
            if key:
                identities[digest_key(key)] = Identity(f"env-key-{i + 1}")
        return cls(identities, required)

    def authenticate(self, authorization: str | None) -> Identity:
        if not self.identities:
            if not self.required:
                return ANONYMOUS
            raise GatewayError(
                "no_api_keys_configured",
                "The gateway has no API keys configured. The operator sets GATEWAY_API_KEYS or [auth] keys_file, "
                "or [auth] required = false for a loopback-only setup.",
            )
        if not authorization:
            raise GatewayError("missing_api_key", "Send your key as `Authorization: Bearer <key>`.")
        scheme, _, key = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise GatewayError("missing_api_key", "The Authorization header must be `Bearer <key>`.")
        digest = digest_key(key.strip())
        for known, identity in self.identities.items():
            if hmac.compare_digest(known, digest):
                return identity
        raise GatewayError("invalid_api_key", "The API key is not valid.")
