"""Who is calling: a bearer key looked up among the digests of the configured keys.

Keys come from ``GATEWAY_API_KEYS`` and the keys file (see ``keys``). They are
held only as SHA-256 digests; a presented key is digested and compared with
``hmac.compare_digest`` against every known digest, without stopping at a match,
so the time taken does not depend on which key matched or how much of it did.
Neither keys nor digests are ever logged or answered. With no key configured
at all, every call is refused (``no_api_keys_configured``) unless the config
says ``[auth] required = false`` explicitly. Keys are configured when
``GATEWAY_API_KEYS`` holds one or a keys file is named, whether or not any of
its keys is enabled: revoking the last key must refuse that key, not open the
gateway to everyone.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Mapping

import attrs

from gateway.errors import GatewayError


@attrs.frozen
class Identity:
    """The caller a key belongs to.

    ``allowed_models`` None means every alias; ``rpm`` / ``tpm`` None means the
    ``[limits]`` defaults for keys (if any) apply.
    """

    name: str
    allowed_models: frozenset[str] | None = None
    rpm: int | None = None
    tpm: int | None = None

    def may_use(self, alias: str) -> bool:
        return self.allowed_models is None or alias in self.allowed_models


ANONYMOUS = Identity("anonymous")


def digest_key(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


def env_identity(digest: bytes) -> Identity:
    """The identity of a key of ``GATEWAY_API_KEYS``, named by its digest's first 12 hex digits.

    Named by the key, not its place in the list: its rate counters are stored under
    this name, and by place, two different keys on gateways sharing one Redis (or one
    key after the list's order changed) shared one budget. A prefix, not the digest:
    the name is stored and may be logged, and 48 bits tell keys apart without being
    a whole hash of one.
    """
    return Identity(f"env-key-{digest.hex()[:12]}")


@attrs.frozen
class KeyRing:
    """Digest → identity, built once per configuration load."""

    identities: Mapping[bytes, Identity]
    required: bool = True
    keys_file: bool = False  # one is named: keys are in use even while none of its keys is enabled

    @classmethod
    def from_env_keys(
        cls,
        keys: Iterable[str],
        required: bool = True,
        extra: Mapping[bytes, Identity] | None = None,
        *,
        keys_file: bool = False,
    ) -> KeyRing:
        """Env keys plus ``extra`` (the keys file's digests); ``extra`` wins where both hold a key."""
        identities: dict[bytes, Identity] = {}
        for key in (k.strip() for k in keys):
            if key:
                digest = digest_key(key)
                identities[digest] = env_identity(digest)
        identities.update(extra or {})
        return cls(identities, required, keys_file)

    def authenticate(self, authorization: str | None) -> Identity:
        if not self.identities and not self.keys_file:
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
        found: Identity | None = None
        for known, identity in self.identities.items():
            # No early exit: every digest is compared, whichever one matches.
            if hmac.compare_digest(known, digest):
                found = identity
        if found is None:
            raise GatewayError("invalid_api_key", "The API key is not valid.")
        return found
