"""Server-sent events: split an upstream byte stream into events, and write ours.

Upstream chunk boundaries fall anywhere, so bytes are buffered until an event's
blank line. Only ``data:`` lines matter for chat completions; comment lines
(OpenRouter's ``: OPENROUTER PROCESSING`` keep-alives) are reported separately
so the relay can decide what to do with them.
"""

from __future__ import annotations

DONE = b"[DONE]"


class SSEDecoder:
    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, chunk: bytes) -> list[bytes | None]:
        """Each complete event's data (``None`` for an event with no data line)."""
        buffer = self._buffer + chunk if self._buffer else chunk
        if b"\r" in buffer:
            buffer = buffer.replace(b"\r\n", b"\n")
        events: list[bytes | None] = []
        start = 0
        while True:
            end = buffer.find(b"\n\n", start)
            if end < 0:
                break
            events.append(_event_data(buffer[start:end]))
            start = end + 2
        self._buffer = buffer[start:]
        return events

    @property
    def pending(self) -> bytes:
        return self._buffer


def _event_data(event: bytes) -> bytes | None:
    data: list[bytes] = []
    for line in event.split(b"\n"):
        if line.startswith(b"data:"):
            data.append(line[6:] if line[5:6] == b" " else line[5:])
    return b"\n".join(data) if data else None


def data_event(payload: bytes) -> bytes:
    return b"data: " + payload + b"\n\n"


DONE_EVENT = data_event(DONE)
