"""Tests for gateway.images: data-URI validation and image type sniffing."""

from __future__ import annotations

import base64
from unittest import mock

import msgspec
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from conftest import in_pieces, peak_allocation
from gateway import images
from gateway.chunks import RawString
from gateway.errors import GatewayError, Location
from gateway.images import (
    ACCEPTED_IMAGE_TYPES,
    ImageFacts,
    inspect_image_url,
    sniff_base64_image_type,
    sniff_image_type,
)

AT: Location = ("messages", 0, "content", 1, "image_url", "url")

MAGIC: dict[str, bytes] = {
    "jpeg": b"\xff\xd8\xff\xe0",
    "png": b"\x89PNG\r\n\x1a\n",
    "gif": b"GIF89a",
    "webp": b"RIFF\x24\x00\x00\x00WEBPVP8 ",
}
MIMES: dict[str, list[str]] = {
    "jpeg": ["image/jpeg", "image/jpg"],
    "png": ["image/png"],
    "gif": ["image/gif"],
    "webp": ["image/webp"],
}
B64_ALPHABET = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=")


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{b64(data)}"


PNG = MAGIC["png"] + b"\x00" * 40
JPEG = MAGIC["jpeg"] + b"\x00" * 40


def refuse(url: object, max_image_bytes: int | None = None) -> GatewayError:
    with pytest.raises(GatewayError) as info:
        inspect_image_url(url, max_image_bytes=max_image_bytes, at=AT)
    assert info.value.at == AT
    return info.value


def assert_refused(url: object, code: str, status: int, *fragments: str, max_image_bytes: int | None = None) -> None:
    err = refuse(url, max_image_bytes)
    assert err.code == code, err
    assert err.status == status
    for fragment in fragments:
        assert fragment in err.message, err.message


# --- sniffing -----------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(MAGIC))
def test_sniff_image_type_recognises_each_magic(kind: str) -> None:
    """Each accepted type's magic bytes sniff as that type."""
    assert sniff_image_type(MAGIC[kind] + b"rest") == kind


def test_sniff_image_type_gif87a() -> None:
    """The older GIF87a signature also sniffs as gif."""
    assert sniff_image_type(b"GIF87a....") == "gif"


@pytest.mark.parametrize(
    "head",
    [b"", b"\xff\xd8", b"\x89PNG", b"GIF88a", b"RIFF\0\0\0\0WAVE", b"RIFF\0\0\0\0WEB", b"BM\0\0", b"%PDF-1.7"],
)
def test_sniff_image_type_unknown(head: bytes) -> None:
    """Truncated signatures and other formats sniff as None."""
    assert sniff_image_type(head) is None


def test_sniff_base64_image_type_reads_prefix() -> None:
    """The base64 sniffer decodes only a prefix and finds the type."""
    assert sniff_base64_image_type(b64(JPEG + b"x" * 1000)) == "jpeg"


@pytest.mark.parametrize("text", ["", "!!!!", "iVBORw0", "ï" * 80, "AAAA===="])
def test_sniff_base64_image_type_garbage(text: str) -> None:
    """Invalid, empty or non-image base64 sniffs as None instead of raising."""
    assert sniff_base64_image_type(text) is None


def test_accepted_image_types() -> None:
    """The accepted types are exactly JPEG, PNG, WebP and GIF."""
    assert ACCEPTED_IMAGE_TYPES == frozenset({"jpeg", "png", "webp", "gif"})


# --- acceptance ---------------------------------------------------------------


def test_accepts_png_with_exact_size() -> None:
    """A valid PNG data URI yields its declared type, sniffed type and decoded size."""
    facts = inspect_image_url(uri(PNG), max_image_bytes=None, at=AT)
    assert facts == ImageFacts(declared_mime="image/png", image_type="png", decoded_bytes=len(PNG))


def test_image_jpg_normalised_to_jpeg() -> None:
    """image/jpg (and upper case) is normalised to image/jpeg."""
    facts = inspect_image_url(uri(JPEG, "IMAGE/JPG"), max_image_bytes=None, at=AT)
    assert facts.declared_mime == "image/jpeg"
    assert facts.image_type == "jpeg"


def test_scheme_and_base64_marker_case_insensitive() -> None:
    """DATA: and ;BASE64 are accepted in any case."""
    url = "DaTa:image/png;BASE64," + b64(PNG)
    assert inspect_image_url(url, max_image_bytes=None, at=AT).decoded_bytes == len(PNG)


def test_media_type_parameters_allowed() -> None:
    """Parameters between the media type and ;base64 are allowed."""
    url = "data:image/png;name=a.png;charset=binary;base64," + b64(PNG)
    assert inspect_image_url(url, max_image_bytes=None, at=AT).image_type == "png"


def test_media_type_may_be_written_with_spaces_around_it() -> None:
    """`data: image/png ;base64,` is read as image/png, as browsers and Python's own parsers read it."""
    url = "data: image/png ;base64," + b64(PNG)
    assert inspect_image_url(url, max_image_bytes=None, at=AT).image_type == "png"


@pytest.mark.parametrize("extra", [0, 1, 2])
def test_decoded_size_accounts_for_padding(extra: int) -> None:
    """Zero, one and two '=' characters give the exact decoded size."""
    data = PNG + b"z" * extra
    assert inspect_image_url(uri(data), max_image_bytes=None, at=AT).decoded_bytes == len(data)


def test_size_exactly_at_limit_accepted() -> None:
    """An image exactly max_image_bytes long is accepted."""
    assert inspect_image_url(uri(PNG), max_image_bytes=len(PNG), at=AT).decoded_bytes == len(PNG)


# --- rule 1: type -------------------------------------------------------------


@pytest.mark.parametrize(("value", "name"), [(None, "null"), (3, "integer"), ({}, "object"), ([], "array"), (True, "boolean")])
def test_non_string_is_invalid_request(value: object, name: str) -> None:
    """A non-string url is invalid_request naming the JSON type it got."""
    assert_refused(value, "invalid_request", 400, "image_url.url must be a string", name)


# --- rule 2: scheme -----------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    ["https://example.com/a.png", "http://x/y.jpg", "file:///tmp/a.png", "ftp://h/a.gif", "a.png", "", "dat:image/png"],
)
def test_non_data_url_not_supported(url: str) -> None:
    """Any non-data: URL is image_url_not_supported with the data-URI fix."""
    assert_refused(
        url,
        "image_url_not_supported",
        400,
        "Cloud providers don't fetch URLs server-side. Encode the image as a base64 data URI "
        "(data:image/jpeg;base64,...)",
    )


def test_non_data_url_names_scheme() -> None:
    """The refusal names the URL scheme that was sent."""
    assert_refused("HTTPS://example.com/a.png", "image_url_not_supported", 400, "'https:'")


def test_leading_whitespace_explained() -> None:
    """A data URI with leading whitespace is refused with a hint to remove it."""
    assert_refused(" " + uri(PNG), "image_url_not_supported", 400, "whitespace")


# --- rule 3: data URI shape ---------------------------------------------------


def test_no_comma_is_invalid_image() -> None:
    """A data URI without a comma is invalid_image."""
    assert_refused("data:image/png;base64" + "A" * 10, "invalid_image", 400, "no ','", "data:image/jpeg;base64,...")


def test_overlong_header_is_invalid_image() -> None:
    """A header longer than the bound is invalid_image rather than sliced out."""
    url = "data:image/png;name=" + "n" * 2000 + ";base64," + b64(PNG)
    assert_refused(url, "invalid_image", 400, "header")


@pytest.mark.parametrize("url", ["data:image/png,%89PNG%0D%0A", "data:,hello", "data:text/plain,hi"])
def test_percent_encoded_refused(url: str) -> None:
    """A data URI without ;base64 is invalid_image saying base64 is required."""
    assert_refused(url, "invalid_image", 400, "base64", "data:image/jpeg;base64,...")


def test_base64_marker_must_be_last() -> None:
    """;base64 followed by another parameter is invalid_image saying where it goes."""
    url = "data:image/png;base64;name=a.png," + b64(PNG)
    assert_refused(url, "invalid_image", 400, "must come last")


# --- rule 4: declared media type ----------------------------------------------


@pytest.mark.parametrize("mime", ["image/bmp", "image/tiff", "image/heic", "image/svg+xml", "image/avif"])
def test_other_image_types_unsupported(mime: str) -> None:
    """Image types other than the accepted four are unsupported_image_type naming the accepted types."""
    assert_refused(uri(PNG, mime), "unsupported_image_type", 400, mime, "image/jpeg, image/png, image/webp or image/gif")


@pytest.mark.parametrize("mime", ["text/plain", "application/pdf", "application/octet-stream"])
def test_non_image_types_unsupported(mime: str) -> None:
    """A non-image media type is unsupported_image_type saying an image type is needed."""
    assert_refused(uri(PNG, mime), "unsupported_image_type", 400, mime, "an image type is needed")


def test_empty_media_type_unsupported() -> None:
    """A data URI with no media type is unsupported_image_type saying an image type is needed."""
    assert_refused("data:;base64," + b64(PNG), "unsupported_image_type", 400, "no media type", "image type is needed")


def test_bare_subtype_gets_hint() -> None:
    """A bare 'png' media type suggests image/png."""
    assert_refused(uri(PNG, "png"), "unsupported_image_type", 400, "did you mean image/png?")


def test_media_type_checked_before_payload() -> None:
    """An unsupported type is reported even when the payload is also broken."""
    assert_refused("data:image/bmp;base64,@@", "unsupported_image_type", 400)


# --- rule 5: base64 payload ---------------------------------------------------


def test_empty_payload_invalid() -> None:
    """An empty payload is invalid_image."""
    assert_refused("data:image/png;base64,", "invalid_image", 400, "no data")


@pytest.mark.parametrize(("sep", "name"), [("\n", "a newline"), (" ", "a space"), ("\r\n", "a carriage return"), ("\t", "a tab")])
def test_whitespace_payload_invalid(sep: str, name: str) -> None:
    """Whitespace or line breaks in the payload are invalid_image suggesting base64 -w 0."""
    text = b64(PNG * 3)
    url = "data:image/png;base64," + text[:20] + sep + text[20:]
    assert_refused(url, "invalid_image", 400, name, "offset 20", "base64 -w 0")


@pytest.mark.parametrize("char", ["-", "_"])
def test_url_safe_alphabet_invalid(char: str) -> None:
    """URL-safe base64 characters are invalid_image saying standard base64 is required."""
    text = b64(PNG)
    url = "data:image/png;base64," + text[:8] + char + text[9:]
    assert_refused(url, "invalid_image", 400, "URL-safe", "standard base64 is required")


@pytest.mark.parametrize("char", ["!", "é", "\x00", ",", "\ud800"])
def test_foreign_character_invalid(char: str) -> None:
    """Any other non-alphabet character is invalid_image naming it."""
    text = b64(PNG)
    url = "data:image/png;base64," + text[:8] + char + text[9:]
    assert_refused(url, "invalid_image", 400, "not a base64 character", repr(char))


@pytest.mark.parametrize("cut", [1, 2, 3])
def test_length_not_multiple_of_four_invalid(cut: int) -> None:
    """A payload whose length is not a multiple of 4 is invalid_image mentioning padding."""
    text = b64(PNG + b"abc")
    assert_refused("data:image/png;base64," + text[:-cut], "invalid_image", 400, "multiple of 4", "padding")


@pytest.mark.parametrize("payload", ["AAAA====", "AA==AAAA", "=AAA", "AAA=AAA=", "A=AA"])
def test_misplaced_padding_invalid(payload: str) -> None:
    """'=' anywhere but the last one or two positions is invalid_image."""
    assert_refused("data:image/png;base64," + payload, "invalid_image", 400, "'='")


# --- rule 6: size -------------------------------------------------------------


def test_too_large_is_413_with_sizes() -> None:
    """Over max_image_bytes is image_too_large (413) with the size and limit in bytes and MB."""
    data = PNG + b"\x00" * 2_000_000
    assert_refused(
        uri(data),
        "image_too_large",
        413,
        f"{len(data)} bytes",
        "2.00 MB",
        "1000000 bytes (1.00 MB)",
        max_image_bytes=1_000_000,
    )


def test_size_checked_before_sniffing() -> None:
    """An oversize payload that is not even an image is refused for its size first."""
    assert_refused(uri(b"not an image at all" * 10), "image_too_large", 413, max_image_bytes=10)


def test_no_limit_when_none() -> None:
    """max_image_bytes=None imposes no size limit."""
    data = PNG + b"\x00" * 100_000
    assert inspect_image_url(uri(data), max_image_bytes=None, at=AT).decoded_bytes == len(data)


# --- rule 7: sniffed type -----------------------------------------------------


def test_unknown_bytes_invalid() -> None:
    """Bytes of no known image type are invalid_image saying the data is not the declared image."""
    assert_refused(uri(b"%PDF-1.7 hello world", "image/png"), "invalid_image", 400, "not a PNG image", "image/png")


def test_bmp_bytes_declared_jpeg_invalid() -> None:
    """BMP bytes declared as JPEG are refused as not a JPEG image."""
    assert_refused(uri(b"BM" + b"\x00" * 60, "image/jpeg"), "invalid_image", 400, "not a JPEG image")


def test_mismatched_type_invalid() -> None:
    """Bytes of an accepted type other than the declared one are invalid_image saying to fix the media type."""
    assert_refused(
        uri(JPEG, "image/png"),
        "invalid_image",
        400,
        "declared image/png but the bytes are a JPEG image; fix the media type",
        "image/jpeg",
    )


# --- properties ---------------------------------------------------------------

_token = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-.", min_size=1, max_size=8)
_param = st.builds(lambda k, v: f"{k}={v}", _token, _token)


@st.composite
def image_uris(draw: st.DrawFn) -> tuple[str, str, bytes]:
    """(data URI, image type, decoded bytes) for a valid image with random parameters."""
    kind = draw(st.sampled_from(sorted(MAGIC)))
    data = MAGIC[kind] + draw(st.binary(max_size=300))
    mime = draw(st.sampled_from(MIMES[kind]))
    mime = "".join(c.upper() if draw(st.booleans()) else c for c in mime)
    params = draw(st.lists(_param, max_size=3))
    scheme = draw(st.sampled_from(["data:", "DATA:", "Data:"]))
    header = ";".join([mime, *params, draw(st.sampled_from(["base64", "BASE64", "Base64"]))])
    return f"{scheme}{header},{b64(data)}", kind, data


@given(image_uris())
def test_property_valid_images_accepted(case: tuple[str, str, bytes]) -> None:
    """Every generated valid image is accepted with the exact decoded size."""
    url, kind, data = case
    facts = inspect_image_url(url, max_image_bytes=None, at=AT)
    payload = url[url.index(",") + 1 :]
    assert facts.image_type == kind
    assert facts.declared_mime == MIMES[kind][0]
    assert facts.decoded_bytes == len(base64.b64decode(payload)) == len(data)


@given(image_uris(), st.integers(min_value=0, max_value=400))
def test_property_limit_is_exact(case: tuple[str, str, bytes], limit: int) -> None:
    """An image is refused as too large exactly when its decoded size exceeds the limit."""
    url, _, data = case
    if len(data) > limit:
        assert refuse(url, limit).code == "image_too_large"
    else:
        assert inspect_image_url(url, max_image_bytes=limit, at=AT).decoded_bytes == len(data)


_foreign_char = st.characters().filter(lambda c: c not in B64_ALPHABET)


@given(image_uris(), _foreign_char, st.data())
def test_property_foreign_character_inserted(case: tuple[str, str, bytes], char: str, data: st.DataObject) -> None:
    """Inserting a non-alphabet character anywhere in the payload gives invalid_image."""
    url, _, _ = case
    start = url.index(",") + 1
    pos = data.draw(st.integers(min_value=start, max_value=len(url)))
    err = refuse(url[:pos] + char + url[pos:])
    assert err.code == "invalid_image"


@given(image_uris(), _foreign_char, st.data())
def test_property_foreign_character_replaced(case: tuple[str, str, bytes], char: str, data: st.DataObject) -> None:
    """Replacing a payload character with a non-alphabet one (same length) gives invalid_image."""
    url, _, _ = case
    start = url.index(",") + 1
    pos = data.draw(st.integers(min_value=start, max_value=len(url) - 1))
    err = refuse(url[:pos] + char + url[pos + 1 :])
    assert err.code == "invalid_image"


@given(image_uris(), st.integers(min_value=1, max_value=3), st.booleans(), st.data())
def test_property_length_broken(case: tuple[str, str, bytes], k: int, append: bool, data: st.DataObject) -> None:
    """Deleting or appending 1-3 payload characters gives invalid_image."""
    url, _, _ = case
    start = url.index(",") + 1
    if append:
        extra = data.draw(st.text(alphabet="ABCxyz019+/=", min_size=k, max_size=k))
        mutated = url + extra
    else:
        assume(len(url) - start > k)
        pos = data.draw(st.integers(min_value=start, max_value=len(url) - k))
        mutated = url[:pos] + url[pos + k :]
    assert refuse(mutated).code == "invalid_image"


_data_uri_ish = st.builds(
    lambda scheme, header, sep, body: scheme + header + sep + body,
    st.sampled_from(["data:", "DATA:", "", "https://", "data: "]),
    st.one_of(st.text(max_size=30), st.sampled_from(["image/png;base64", "image/jpeg;base64", "image/bmp;base64", ";base64"])),
    st.sampled_from([",", "", ";base64,"]),
    st.one_of(st.text(max_size=60), st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnop+/=", max_size=60)),
)


@given(st.one_of(st.text(), _data_uri_ish), st.one_of(st.none(), st.integers(min_value=0, max_value=100)))
def test_property_random_strings_only_gateway_error(url: str, limit: int | None) -> None:
    """Any string is either accepted or refused with a GatewayError at the given location."""
    try:
        facts = inspect_image_url(url, max_image_bytes=limit, at=AT)
    except GatewayError as err:
        assert err.at == AT
        assert err.code in {"image_url_not_supported", "invalid_image", "unsupported_image_type", "image_too_large"}
    else:
        assert facts.image_type in ACCEPTED_IMAGE_TYPES


@given(st.one_of(st.none(), st.integers(), st.floats(), st.binary(), st.lists(st.integers()), st.dictionaries(st.text(), st.text())))
def test_property_non_strings_invalid_request(value: object) -> None:
    """Any non-string value is refused as invalid_request."""
    assert refuse(value).code == "invalid_request"


# --- memory -------------------------------------------------------------------

BIG_IMAGE_BYTES = 20 * 1024 * 1024


@pytest.fixture(scope="module")
def big_png_uri() -> str:
    """A 20 MiB PNG as a data URI (about 27 MB of base64 text)."""
    data = MAGIC["png"] + bytes(range(256)) * ((BIG_IMAGE_BYTES - 8) // 256)
    data += b"\x00" * (BIG_IMAGE_BYTES - len(data))
    return uri(data)


def test_big_image_validated_with_small_peak(big_png_uri: str) -> None:
    """A 20 MiB image is validated with under 1 MiB of peak allocation (no copy or full decode)."""
    facts: list[ImageFacts] = []
    peak = peak_allocation(lambda: facts.append(inspect_image_url(big_png_uri, max_image_bytes=None, at=AT)))
    assert facts[0].decoded_bytes == BIG_IMAGE_BYTES
    assert peak < 1024 * 1024, peak


def test_big_image_refused_for_size_with_small_peak(big_png_uri: str) -> None:
    """A 20 MiB image over the limit is refused with under 1 MiB of peak allocation."""
    peak = peak_allocation(lambda: inspect_image_url(big_png_uri, max_image_bytes=BIG_IMAGE_BYTES - 1, at=AT), GatewayError)
    assert peak < 1024 * 1024, peak
    assert refuse(big_png_uri, BIG_IMAGE_BYTES - 1).code == "image_too_large"


def test_big_image_with_bad_tail_refused_with_small_peak(big_png_uri: str) -> None:
    """A 20 MiB payload with a newline near its end is refused without copying it."""
    broken = big_png_uri[:-10] + "\n" + big_png_uri[-9:]
    peak = peak_allocation(lambda: inspect_image_url(broken, max_image_bytes=None, at=AT), GatewayError)
    assert peak < 1024 * 1024, peak
    assert refuse(broken).code == "invalid_image"


# --- the fast check and the checks that word its refusals --------------------------

_PAYLOAD_CHARS = "QUJDAB+/=-_ \né"


@given(st.text(alphabet=_PAYLOAD_CHARS, max_size=40), st.sampled_from([4, 8, 12, 1 << 18, 1 << 20]))
def test_property_fast_check_agrees_with_wording_checks(payload: str, slice_chars: int) -> None:
    """The strict SIMD check accepts exactly what the alphabet and length checks accept, at any slice size,
    over a ``str`` and over the JSON bytes of a value left in the body (a ``memoryview``) alike."""
    wording = images._is_base64_payload(payload, 0) and len(payload) % 4 == 0
    view = memoryview(payload.encode())
    with mock.patch.object(images, "_CHECK_SLICE_CHARS", slice_chars), mock.patch.object(
        images, "_CHECK_SLICE_VIEW_BYTES", slice_chars
    ):
        assert images._is_strict_base64(payload, 0, len(payload)) == wording
        assert images._is_strict_base64_in_pieces([view]) == wording


def test_padding_at_a_slice_end_mid_payload_refused() -> None:
    """'=' that ends a 256 KiB slice is refused when more data follows (each slice alone is valid)."""
    slice_chars = images._CHECK_SLICE_CHARS
    payload = b64(PNG + b"\x00" * 200_000)
    payload = payload[: slice_chars - 4].ljust(slice_chars - 4, "A") + "QQ==" + "QUJD" * 100
    assert_refused(f"data:image/png;base64,{payload}", "invalid_image", 400, "'=' padding before its end")


# --- a URL left in the body's pieces (gateway.bulk): checked in place --------------


def _as_pieces(text: bytes, cuts: list[int]) -> RawString:
    return RawString(in_pieces(text, cuts), 0, len(text))


@given(st.text(alphabet=_PAYLOAD_CHARS, max_size=40), st.lists(st.integers(0, 60), max_size=8))
def test_property_fast_check_in_pieces_agrees_with_wording_checks(payload: str, cuts: list[int]) -> None:
    """However the payload is cut into pieces (a quantum split between two included), the check is the same."""
    wording = images._is_base64_payload(payload, 0) and len(payload) % 4 == 0
    assert images._is_strict_base64_in_pieces(_as_pieces(payload.encode(), cuts).views) == wording


@given(
    st.one_of(
        image_uris().map(lambda case: case[0]),
        image_uris().map(lambda case: case[0][:-2]),  # truncated
        image_uris().map(lambda case: case[0].replace(",", ",QQ==", 1)),  # padding mid-payload
        image_uris().map(lambda case: case[0].replace("image/", "image/x", 1)),  # an unsupported type
        image_uris().map(lambda case: case[0].replace(",", ",iVBORw0KGgo", 1)),  # another type's bytes
    ),
    st.lists(st.integers(0, 1000), max_size=8),
    st.one_of(st.none(), st.integers(0, 400)),
)
def test_property_a_url_in_pieces_is_judged_as_the_string_or_declined(url: str, cuts: list[int], limit: int | None) -> None:
    """The in-place check accepts what the ``str`` path accepts, with the same facts, however the body was cut;
    it refuses only as the ``str`` path refuses (size, type), and otherwise declines to the ordinary path."""
    raw = _as_pieces(msgspec.json.encode(url), cuts)
    try:
        expected: ImageFacts | str = inspect_image_url(url, max_image_bytes=limit, at=AT)
    except GatewayError as error:
        expected = error.code
    try:
        got: ImageFacts | str = inspect_image_url(raw, max_image_bytes=limit, at=AT)
    except GatewayError as error:
        got = error.code
    except images.RawImageDeclined:
        assert not isinstance(expected, ImageFacts)
        return
    assert got == expected


def test_pieces_cut_at_a_quantum_are_checked_as_one_payload() -> None:
    """Each piece alone may be valid base64; padding that ends one while more follows is still refused."""
    assert images._is_strict_base64_in_pieces(_as_pieces(b"QUJDQQ==", [4]).views)
    assert not images._is_strict_base64_in_pieces(_as_pieces(b"QQ==QUJD", [4]).views)
    assert not images._is_strict_base64_in_pieces(_as_pieces(b"QUJDQQ==QUJD", [4, 8]).views)
    # Pieces longer than a check slice are checked slice by slice, every slice whole.
    with mock.patch.object(images, "_CHECK_SLICE_VIEW_BYTES", 8):
        assert images._is_strict_base64_in_pieces(_as_pieces(b"QUJD" * 9 + b"QQ==", [6, 30]).views)
        assert not images._is_strict_base64_in_pieces(_as_pieces(b"QUJD" * 4 + b"QQ==" + b"QUJD" * 4, [6, 30]).views)


def test_padding_split_between_pieces_still_counts() -> None:
    """'==' split across two pieces: the decoded size is that of the whole payload."""
    url = "data:image/png;base64," + b64(PNG + b"\x00")  # 1 byte past a multiple of 3: '==' padding
    assert url.endswith("==")
    encoded = msgspec.json.encode(url)
    for cut in range(len(encoded) - 4, len(encoded)):
        facts = inspect_image_url(_as_pieces(encoded, [cut]), max_image_bytes=None, at=AT)
        assert facts == inspect_image_url(url, max_image_bytes=None, at=AT)


def test_a_raw_value_that_is_not_one_json_string_is_declined() -> None:
    url = "data:image/png;base64," + b64(PNG)
    for text in (b"x" + url.encode() + b"x", b'"' + url.encode() + b"x", b"x" + url.encode() + b'"', b'"', url.encode()):
        with pytest.raises(images.RawImageDeclined):
            inspect_image_url(RawString(in_pieces(text), 0, len(text)), max_image_bytes=None, at=AT)
