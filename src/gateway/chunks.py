"""A large request body kept as the pieces the server delivered, never joined.

granian hands a 4 MB image body over in pieces of up to 1 MiB. Copying them
into one buffer was a pass over every byte on the event loop's thread, and a
second buffer per request in flight. Without it, in A/B runs of 4 MB images at
4 concurrent: about 0.25 ms (9%) less CPU on the loop's thread per request,
and a peak RSS of 88 against 97 MiB. (The later passes over the image, which
the copy had brought into the cache, cost a little more.) The large-body path
reads a body only through what ``Chunks`` offers: ``find`` and ``rfind`` (a
match may straddle two pieces), single bytes, short slices as ``bytes``, and
``views``, a span as memoryviews of the pieces, never copied. A body that must
be decoded whole is joined once (``tobytes``).

``RawString`` is a JSON string left undecoded in such a body (``gateway.bulk``):
where its bytes lie, quotes included. ``shaping.encode`` writes it back
verbatim.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable

import msgspec

__all__ = ["Chunks", "RawString"]


class Chunks:
    """A body as its pieces, in order; empty pieces are dropped."""

    __slots__ = ("_pieces", "_size", "_starts")

    def __init__(self, pieces: Iterable[bytes | bytearray]) -> None:
        self._pieces = [piece for piece in pieces if piece]
        self._starts: list[int] = []
        size = 0
        for piece in self._pieces:
            self._starts.append(size)
            size += len(piece)
        self._size = size

    def __len__(self) -> int:
        return self._size

    @property
    def pieces(self) -> tuple[bytes | bytearray, ...]:
        return tuple(self._pieces)

    def _piece_at(self, at: int) -> int:
        """The index of the piece holding byte ``at`` (0 <= at < len)."""
        return bisect.bisect_right(self._starts, at) - 1

    def byte(self, at: int) -> int:
        """The byte at ``at``; like ``bytes[at]``, a negative ``at`` counts from the end."""
        if at < 0:
            at += self._size
        if not 0 <= at < self._size:
            raise IndexError("Chunks index out of range")
        index = self._piece_at(at)
        return self._pieces[index][at - self._starts[index]]

    def slice(self, start: int, stop: int) -> bytes:
        """``bytes[start:stop]`` (a copy: for short spans), bounds clamped as a slice clamps them."""
        start, stop, _ = slice(start, stop).indices(self._size)
        if stop <= start:
            return b""
        index = self._piece_at(start)
        piece, base = self._pieces[index], self._starts[index]
        if stop <= base + len(piece):
            return bytes(piece[start - base : stop - base])
        return b"".join(self.views(start, stop))

    def views(self, start: int, stop: int) -> list[memoryview]:
        """``[start, stop)`` as memoryviews of the pieces, in order (one per piece it touches)."""
        start, stop, _ = slice(start, stop).indices(self._size)
        out: list[memoryview] = []
        if stop <= start:
            return out
        index = self._piece_at(start)
        while start < stop:
            piece, base = self._pieces[index], self._starts[index]
            end = min(stop, base + len(piece))
            out.append(memoryview(piece)[start - base : end - base])
            start = end
            index += 1
        return out

    def find(self, sub: bytes, start: int = 0) -> int:
        """Like ``bytes.find(sub, start)`` for a non-empty ``sub`` and ``start`` >= 0."""
        if start >= self._size:
            return -1
        reach = len(sub) - 1
        last = len(self._pieces) - 1
        for index in range(self._piece_at(start), last + 1):
            piece, base = self._pieces[index], self._starts[index]
            found = piece.find(sub, max(start - base, 0))
            if found >= 0:
                return base + found
            if reach and index < last:
                # A match starting in this piece's last bytes ends in the next ones.
                end = base + len(piece)
                low = max(start, end - reach)
                found = self.slice(low, end + reach).find(sub)
                if found >= 0:
                    return low + found
        return -1

    def rfind(self, sub: bytes) -> int:
        """Like ``bytes.rfind(sub)`` for a non-empty ``sub``."""
        reach = len(sub) - 1
        for index in range(len(self._pieces) - 1, -1, -1):
            piece, base = self._pieces[index], self._starts[index]
            if reach and index < len(self._pieces) - 1:
                # A match straddling this piece's end starts after any match inside it.
                end = base + len(piece)
                low = max(base, end - reach)
                found = self.slice(low, end + reach).rfind(sub)
                if found >= 0:  # it starts in this piece: fewer than len(sub) bytes follow its end here
                    return low + found
            found = piece.rfind(sub)
            if found >= 0:
                return base + found
        return -1

    def tobytes(self) -> bytes | bytearray:
        """The whole body in one buffer: the piece itself when there is one, else one join."""
        if len(self._pieces) == 1:
            return self._pieces[0]
        return b"".join(self._pieces)


class RawString:
    """A JSON string token left undecoded: bytes ``[start, stop)`` of a ``Chunks`` body, quotes included."""

    __slots__ = ("body", "start", "stop")

    def __init__(self, body: Chunks, start: int, stop: int) -> None:
        self.body = body
        self.start = start
        self.stop = stop

    def __len__(self) -> int:
        return self.stop - self.start

    @property
    def views(self) -> list[memoryview]:
        return self.body.views(self.start, self.stop)

    def __bytes__(self) -> bytes:
        return self.body.slice(self.start, self.stop)

    def __repr__(self) -> str:
        return f"RawString({len(self)} bytes at {self.start})"

    def as_raw(self) -> msgspec.Raw:
        """The token as a ``msgspec.Raw``, to be encoded verbatim (one join when it spans pieces)."""
        views = self.views
        return msgspec.Raw(views[0] if len(views) == 1 else bytes(self))
