"""A large body kept as the server's pieces (gateway.chunks) reads as the bytes it stands for."""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.chunks import Chunks, RawString
from gateway.shaping import encode


@st.composite
def cut_bodies(draw: st.DrawFn) -> tuple[bytes, Chunks]:
    """Bytes over a small alphabet (so that searches hit), cut anywhere, empty pieces included."""
    raw = draw(st.binary(max_size=60).map(lambda b: bytes(c % 4 + 0x61 for c in b)))
    cuts = sorted(draw(st.lists(st.integers(0, len(raw)), max_size=12)))
    return raw, Chunks(raw[a:b] for a, b in zip([0, *cuts], [*cuts, len(raw)], strict=True))


needles = st.binary(min_size=1, max_size=5).map(lambda b: bytes(c % 4 + 0x61 for c in b))


@given(cut_bodies(), needles, st.integers(0, 70))
def test_find_and_rfind_are_those_of_the_bytes(case: tuple[bytes, Chunks], sub: bytes, start: int) -> None:
    raw, chunks = case
    assert chunks.find(sub, start) == raw.find(sub, start)
    assert chunks.rfind(sub) == raw.rfind(sub)


@given(cut_bodies(), st.integers(-70, 70), st.integers(-70, 70))
def test_bytes_slices_and_views_are_those_of_the_bytes(case: tuple[bytes, Chunks], start: int, stop: int) -> None:
    raw, chunks = case
    assert len(chunks) == len(raw)
    assert chunks.tobytes() == raw
    assert chunks.slice(start, stop) == raw[start:stop]
    views = chunks.views(start, stop)
    assert b"".join(views) == raw[start:stop]
    assert all(len(view) for view in views)
    assert len(views) <= len(chunks.pieces)
    if 0 <= start < len(raw):
        assert chunks.byte(start) == raw[start]
        assert chunks.byte(start - len(raw)) == raw[start - len(raw)]
    else:
        with pytest.raises(IndexError):
            chunks.byte(len(raw) + abs(start))


def test_views_are_of_the_pieces_themselves() -> None:
    pieces = [b"a" * 10, b"b" * 10, b"c" * 10]
    chunks = Chunks(pieces)
    views = chunks.views(5, 25)
    assert [view.obj for view in views] == pieces
    assert [bytes(view) for view in views] == [b"a" * 5, b"b" * 10, b"c" * 5]
    assert chunks.tobytes() == b"".join(pieces)
    assert Chunks([pieces[0]]).tobytes() is pieces[0]  # one piece: nothing joined


def test_a_raw_string_encodes_as_its_own_bytes() -> None:
    token = RawString(Chunks([b'{"u":"da', b"ta:x", b'yz"}']), 5, 15)
    assert [bytes(view) for view in token.views] == [b'"da', b"ta:x", b'yz"']
    assert bytes(token) == b'"data:xyz"' and len(token) == 10
    assert encode({"url": token, "n": [token]}) == b'{"url":"data:xyz","n":["data:xyz"]}'
    assert msgspec.json.decode(encode({"url": token})) == {"url": "data:xyz"}
