"""clipal.decode: encoded bytes made plain for inspection, bounded."""

from __future__ import annotations

import functools
import gzip
import time
import tracemalloc
import zlib

import brotli
import pytest
import zstandard

from clipal.decode import LIMIT, Decoder, decoded
from encoders import CODINGS, encoded, encoded_stream, raw_deflate

PLAIN = b'{"error":{"message":"You exceeded your current quota","type":"insufficient_quota"}}'
EVENTS = [b'event: message_start\ndata: {"type":"message_start"}\n\n',
          b'event: content_block_delta\ndata: {"delta":{"text":"hello"}}\n\n',
          b'event: message_stop\ndata: {"type":"message_stop"}\n\n']
# Codings that announce themselves by their first bytes (deflate only in its zlib wrapper).
SNIFFABLE = ("gzip", "deflate", "zstd")


def fed_byte_by_byte(decoder: Decoder, data: bytes) -> bytes:
    parts = [decoder.feed(data[i:i + 1]) for i in range(len(data))] + [decoder.end()]
    assert None not in parts
    return b"".join(parts)


# --------------------------------------------------------------------------- by header, by magic


@pytest.mark.parametrize("coding", CODINGS)
def test_each_coding_is_undone_by_its_header(coding):
    assert decoded(encoded(coding, PLAIN), coding) == PLAIN


@pytest.mark.parametrize("header,data", [
    ("x-gzip", gzip.compress(PLAIN)),
    ("GZIP", gzip.compress(PLAIN)),
    (" br ", brotli.compress(PLAIN)),
    ("deflate", raw_deflate(PLAIN)),  # deflate as some servers send it: without the zlib wrapper
    ("identity", PLAIN),
    ("identity, gzip", gzip.compress(PLAIN)),
], ids=["x-gzip", "upper case", "spaces", "raw deflate", "identity", "identity in a list"])
def test_header_spellings(header, data):
    assert decoded(data, header) == PLAIN


@pytest.mark.parametrize("coding", SNIFFABLE)
@pytest.mark.parametrize("header", ["", "identity", "compress"], ids=["no header", "identity", "unknown coding"])
def test_gzip_zstd_and_zlib_are_recognised_by_their_first_bytes(coding, header):
    assert decoded(encoded(coding, PLAIN), header) == PLAIN


def test_brotli_has_no_magic_so_without_its_header_the_bytes_stay_as_they_are():
    data = brotli.compress(PLAIN)
    assert decoded(data) == data


@pytest.mark.parametrize("data", [PLAIN, b"", b"x", b"\x1f", b"\x28\xb5\x2f", b"event: ping\n\n"],
                         ids=["json", "empty", "x", "gzip magic half", "zstd magic part", "sse"])
def test_plain_bytes_without_a_header_come_back_unchanged(data):
    assert decoded(data) == data


# --------------------------------------------------------------------------- stacked codings


def test_stacked_codings_are_undone_last_applied_first():
    data = brotli.compress(gzip.compress(PLAIN))  # "gzip, br": gzip was applied first
    assert decoded(data, "gzip, br") == PLAIN
    assert decoded(data, "br, gzip") is None


def test_three_stacked_codings():
    data = zstandard.ZstdCompressor().compress(brotli.compress(zlib.compress(PLAIN)))
    assert decoded(data, "deflate, br, zstd") == PLAIN


def test_more_stacked_codings_than_any_server_uses_are_refused():
    data = PLAIN
    for _ in range(4):
        data = gzip.compress(data)
    assert decoded(data, ", ".join(["gzip"] * 4)) == PLAIN
    assert decoded(gzip.compress(data), ", ".join(["gzip"] * 5)) is None


# --------------------------------------------------------------------------- what does not decode


@pytest.mark.parametrize("coding", CODINGS)
@pytest.mark.parametrize("data", [b"\x00\xff\xfe garbage \x80" * 4, bytes(range(256))], ids=["garbage", "all bytes"])
def test_garbage_is_none(coding, data):
    assert decoded(data, coding) is None


@pytest.mark.parametrize("data", [b"\x1f\x8b" + bytes(30), b"\x28\xb5\x2f\xfd" + b"\xff" * 30],
                         ids=["gzip", "zstd"])
def test_a_magic_number_followed_by_garbage_is_none(data):
    assert decoded(data) is None


@pytest.mark.parametrize("coding", CODINGS)
def test_bytes_after_the_end_of_the_stream_are_none(coding):
    assert decoded(encoded(coding, PLAIN) + b"trailing junk", coding) is None


def test_gzip_members_may_follow_one_another():
    assert decoded(gzip.compress(PLAIN) + gzip.compress(PLAIN), "gzip") == PLAIN + PLAIN


@pytest.mark.parametrize("coding", CODINGS)
def test_a_stream_cut_short_decodes_to_what_it_holds(coding):
    chunks = encoded_stream(coding, EVENTS)
    assert decoded(chunks[0] + chunks[1], coding) == EVENTS[0] + EVENTS[1]


def test_a_header_naming_the_wrong_coding_is_none():
    assert decoded(gzip.compress(PLAIN), "zstd") is None
    assert decoded(PLAIN, "gzip") is None


# --------------------------------------------------------------------------- the limit


@pytest.mark.parametrize("coding", ["identity", *CODINGS])
def test_the_limit_is_exact(coding):
    plain = b"a" * 1000
    data = plain if coding == "identity" else encoded(coding, plain)
    assert decoded(data, coding, limit=1000) == plain
    assert decoded(data, coding, limit=999) is None


def test_the_limit_holds_for_each_stacked_coding():
    plain = b"a" * 1000
    assert decoded(gzip.compress(gzip.compress(plain)), "gzip, gzip", limit=1000) == plain
    assert decoded(gzip.compress(gzip.compress(plain)), "gzip, gzip", limit=999) is None


ZEROS = bytes(1 << 20)
BOMBS = [*CODINGS, "zstd-sized"]


@functools.cache
def bomb(coding: str, mib: int = 50) -> bytes:
    """``mib`` MiB of zeros in a few kilobytes; "zstd-sized" states its size in the frame header."""
    if coding == "zstd-sized":
        frame = zstandard.ZstdCompressor().compressobj(size=mib * len(ZEROS))
        return b"".join(frame.compress(ZEROS) for _ in range(mib)) + frame.flush()
    return b"".join(encoded_stream(coding, [ZEROS] * mib))


def header_of(coding: str) -> str:
    return coding.removesuffix("-sized")


@pytest.mark.parametrize("coding", BOMBS)
def test_a_bomb_is_none_quickly_and_in_little_memory(coding):
    data = bomb(coding)
    assert len(data) < 64 * 1024
    tracemalloc.start()
    started = time.perf_counter()
    try:
        assert decoded(data, header_of(coding)) is None
        elapsed = time.perf_counter() - started
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert elapsed < 1.0
    assert peak < 8 * LIMIT


@pytest.mark.parametrize("coding", BOMBS)
def test_a_bomb_is_stopped_by_the_limit_not_by_an_error(coding):
    data = bomb(coding, mib=3)
    assert decoded(data, header_of(coding), limit=3 * len(ZEROS)) == ZEROS * 3
    assert decoded(data, header_of(coding)) is None


# --------------------------------------------------------------------------- the incremental decoder


@pytest.mark.parametrize("coding", CODINGS)
def test_fed_byte_by_byte_the_decoder_gives_the_whole_stream(coding):
    data = b"".join(encoded_stream(coding, EVENTS))
    assert fed_byte_by_byte(Decoder(coding), data) == b"".join(EVENTS)


@pytest.mark.parametrize("coding", SNIFFABLE)
def test_fed_byte_by_byte_the_magic_number_is_still_recognised(coding):
    data = b"".join(encoded_stream(coding, EVENTS))
    assert fed_byte_by_byte(Decoder(""), data) == b"".join(EVENTS)


def test_fed_byte_by_byte_stacked_codings():
    data = brotli.compress(gzip.compress(b"".join(EVENTS)))
    assert fed_byte_by_byte(Decoder("gzip, br"), data) == b"".join(EVENTS)


@pytest.mark.parametrize("coding", CODINGS)
def test_each_flushed_event_decodes_as_soon_as_its_bytes_arrive(coding):
    decoder = Decoder(coding)
    for chunk, event in zip(encoded_stream(coding, EVENTS), EVENTS):
        assert decoder.feed(chunk) == event
    assert decoder.end() == b""


def test_plain_bytes_are_handed_back_as_they_come():
    decoder = Decoder("")
    assert decoder.feed(EVENTS[0]) == EVENTS[0]
    assert decoder.feed(EVENTS[1]) == EVENTS[1]


def test_bytes_held_while_sniffing_come_back_at_the_end():
    decoder = Decoder("")
    assert decoder.feed(b"\x1f") == b""
    assert decoder.end() == b"\x1f"


def test_once_undecodable_the_decoder_stays_so():
    decoder = Decoder("gzip")
    assert decoder.feed(b"not gzip at all") is None
    assert decoder.feed(gzip.compress(PLAIN)) is None
    assert decoder.end() is None


def test_the_decoder_limit_counts_everything_it_produced():
    chunks = encoded_stream("zstd", [b"a" * 600, b"b" * 600])
    decoder = Decoder("zstd", limit=1000)
    assert decoder.feed(chunks[0]) == b"a" * 600
    assert decoder.feed(chunks[1]) is None


@pytest.mark.parametrize("data", [b"", b"{}", b'{"error": {"type": "overloaded"}}', b"data: {}\n\n", b"\x1f", b"\x28\xb5",
                                  b"x" * 10, b"<html>", b"\x1f\x8bnot really", b"\x78\x9c", bytes(range(256))])
@pytest.mark.parametrize("limit", [4, LIMIT])
def test_the_unencoded_shortcut_answers_as_the_sniffing_decoder_does(data, limit):
    decoder = Decoder("", limit)
    body, rest = decoder.feed(data), decoder.end()
    expected = None if body is None or rest is None else body + rest
    assert decoded(data, "", limit) == expected
