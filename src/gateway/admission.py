"""Seams where limits plug into the request path (SPEC §3, issue: limits and keys).

Two hooks, both no-ops by default:
- ``Admission.admit(identity, alias, facts)`` runs once per request before any
  upstream call (rates per key and per alias); it raises ``GatewayError`` 429 or
  returns a ``Ticket`` whose ``headers`` go on the answer and whose
  ``settle(usage)`` is called with the serving attempt's usage at the end.
- ``BackendSlots.acquire(target)`` runs before each upstream attempt (the
  concurrency of a backend); the returned ``Slot`` is released when the attempt
  ends, or for a stream when the stream ends or its client leaves.
"""

from __future__ import annotations

from typing import Any, Protocol

from gateway.auth import Identity
from gateway.facts import RequestFacts
from gateway.snapshot import CompiledAlias, Target


class Ticket(Protocol):
    headers: list[tuple[bytes, bytes]]

    def settle(self, usage: dict[str, Any] | None) -> None: ...


class Admission(Protocol):
    async def admit(self, identity: Identity, alias: CompiledAlias, facts: RequestFacts) -> Ticket: ...


class Slot(Protocol):
    def release(self) -> None: ...


class BackendSlots(Protocol):
    async def acquire(self, target: Target) -> Slot: ...


class _NoTicket:
    headers: list[tuple[bytes, bytes]] = []

    def settle(self, usage: dict[str, Any] | None) -> None:
        return None


class AdmitAll:
    async def admit(self, identity: Identity, alias: CompiledAlias, facts: RequestFacts) -> Ticket:
        return _NoTicket()


class _NoSlot:
    def release(self) -> None:
        return None


NO_SLOT = _NoSlot()


class Unlimited:
    async def acquire(self, target: Target) -> Slot:
        return NO_SLOT
