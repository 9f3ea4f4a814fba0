"""Server-sent events: split an upstream byte stream into events, and write ours.

Upstream chunk boundaries fall anywhere, so bytes are buffered until an event's
blank line. Line ends may be LF, CRLF or CR (the SSE grammar allows all three);
they are made LF on the way in, a CR at a chunk's end waiting for the next chunk
in case it is half of a CRLF. Only ``data:`` lines matter for chat completions;
an event without one (a ``: keep-alive`` comment) is reported as ``None``.

The buffer is a bytearray scanned only from where the last scan stopped, so an
event of many megabytes (a streamed image) costs linear time, not quadratic.
"""

from __future__ import annotations

from gateway.upstream import MAX_ANSWER_BYTES, UpstreamFault

DONE = b"[DONE]"
_BOM = b"\xef\xbb\xbf"
_SEPARATOR = b"\n\n"
# How an event stream's body begins: a data line, a field line, a comment.
_OPENINGS = (b"data:", b"event:", b"id:", b":")


def looks_like_event_stream(body: bytes) -> bool:
    """Whether ``body`` begins as an event stream does (after any whitespace and a byte-order mark)."""
    return body.lstrip().removeprefix(_BOM).startswith(_OPENINGS)


class SSEDecoder:
    def __init__(self) -> None:
        self._buffer = bytearray()
        self._scan_from = 0
        self._carried_cr = False
        self._started = False
        self._head = b""  # the first bytes, while they may be a byte-order mark's beginning

    def feed(self, chunk: bytes) -> list[bytes | None]:
        """Each complete event's data (``None`` for an event with no data line).

        Raises ``UpstreamFault`` ("too_large") when one event passes ``MAX_ANSWER_BYTES``.
        """
        if not self._started:
            # The SSE grammar allows a byte-order mark first; left in, it hides the first event's data line.
            # The first read may hold only part of it.
            chunk = self._head + chunk
            if len(chunk) < len(_BOM) and _BOM.startswith(chunk):
                self._head = chunk
                return []
            self._started = True
            chunk = chunk.removeprefix(_BOM)
        if self._carried_cr:
            chunk = b"\r" + chunk
            self._carried_cr = False
        if chunk.endswith(b"\r"):
            chunk = chunk[:-1]
            self._carried_cr = True
        if b"\r" in chunk:
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        self._buffer += chunk
        events: list[bytes | None] = []
        start = 0
        search = max(self._scan_from - 1, 0)
        while (end := self._buffer.find(_SEPARATOR, search)) >= 0:
            events.append(_event_data(bytes(self._buffer[start:end])))
            start = search = end + 2
        if start:
            del self._buffer[:start]
        self._scan_from = len(self._buffer)
        if self._scan_from > MAX_ANSWER_BYTES:
            raise UpstreamFault("too_large", f"one event of the stream is larger than {MAX_ANSWER_BYTES >> 20} MiB")
        return events

    def finish(self) -> list[bytes | None]:
        """The last event of a stream that ended without its blank line."""
        if self._carried_cr:
            self._carried_cr = False
        rest = bytes(self._buffer).strip(b"\n")
        self._buffer.clear()
        self._scan_from = 0
        return [_event_data(rest)] if rest else []

    @property
    def pending(self) -> bytes:
        return bytes(self._buffer)


def _event_data(event: bytes) -> bytes | None:
    data: list[bytes] = []
    for line in event.split(b"\n"):
        if line.startswith(b"data:"):
            data.append(line[6:] if line[5:6] == b" " else line[5:])
    return b"\n".join(data) if data else None


def data_event(payload: bytes) -> bytes:
    return b"data: " + payload + b"\n\n"


DONE_EVENT = data_event(DONE)
