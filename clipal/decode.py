"""Encoded upstream bytes made plain for inspection; the client still gets them as sent.

clipal looks at two things before it commits to an upstream answer: the body
of an error status (a quota is not a rate limit) and the first event of an
SSE stream (an error event there still fails over). Claude Code and Codex
send ``Accept-Encoding: br, zstd``, so either may arrive compressed with
gzip, deflate, br or zstd. This module is the one place that turns such
bytes into plain ones for reading; forwarding never uses its output.

Which codings: the Content-Encoding list names them in the order they were
applied, so they are undone last one first. A header that is absent, says
only ``identity`` or names a coding this module does not know is not
trusted; then the first bytes decide: gzip and zstd start with magic
numbers and zlib with a two-byte header that carries a checksum. Brotli has
no magic number and is recognised only by name.

Bounds: every stage stops once it would produce more than ``limit`` plain
bytes (1 MiB by default), and the bytes then count as undecodable: a few
kilobytes that inflate to gigabytes cost a millisecond and about one limit of
memory. The decompressors are the maintained libraries (zlib, brotli,
zstandard), each asked for output in bounded steps.

A stream cut short decodes to what it holds so far: error bodies are read up
to a size and a first event ends long before its stream does. Bytes that
are not what their coding says, or that follow the end of a stream without
starting a new gzip member, make the whole input undecodable.
"""

from __future__ import annotations

import zlib
from abc import ABC, abstractmethod
from typing import Callable

import brotli
import zstandard

__all__ = ["LIMIT", "Decoder", "decoded"]

#: The most plain bytes any decoding produces; past it the input counts as undecodable.
LIMIT = 1 << 20

_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
# A zlib header whose first byte is 0x78 (deflate with the usual 32 KiB
# window) is the only one sniffed: other first bytes such as "H" or "(" also
# form valid headers and would mistake plain text for zlib.
_ZLIB_FIRST_BYTE = 0x78
_SNIFFED_PREFIXES = (_GZIP_MAGIC, _ZSTD_MAGIC, bytes([_ZLIB_FIRST_BYTE]))
#: A body starting with none of these cannot be sniffed as encoded, however it goes on.
_SNIFFED_FIRST_BYTES = tuple(prefix[:1] for prefix in _SNIFFED_PREFIXES)

_GZIP_WBITS = 31  # zlib's wbits for a gzip wrapper
_ZLIB_WBITS = 15
_RAW_DEFLATE_WBITS = -15
# HTTP's zstd coding allows windows up to 8 MiB (RFC 9659); refusing larger
# ones also keeps a hostile frame from making the decoder allocate 128 MiB.
_ZSTD_MAX_WINDOW = 8 << 20
# Brotli grows its output buffer past the requested size, by up to about as
# much again, so it is asked for small steps to keep the overshoot small.
_BROTLI_STEP = 64 * 1024
# More stacked codings than this is no real server, only work for a hostile one.
_MAX_CODINGS = 4


class _Undecodable(Exception):
    """The bytes are not what their coding says, or they decode to more than the limit."""


class _Output:
    """The plain bytes a stage produced and has not handed on yet, counted against the limit."""

    def __init__(self, limit: int) -> None:
        self.room = limit
        self._parts: list[bytes] = []

    def write(self, chunk: bytes) -> int:
        """Keep ``chunk``; raises once the stage's output passes the limit (zstd's writer calls this too)."""
        self.room -= len(chunk)
        if self.room < 0:
            raise _Undecodable("decodes to more than the limit")
        self._parts.append(chunk)
        return len(chunk)

    def take(self) -> bytes:
        parts, self._parts = self._parts, []
        return b"".join(parts)


class _Stage(ABC):
    """One coding undone incrementally: encoded bytes in, plain bytes out."""

    @abstractmethod
    def feed(self, data: bytes) -> bytes:
        """The plain bytes that ``data`` completes; raises :class:`_Undecodable`."""

    def end(self) -> bytes:
        """The input is over: whatever was held back."""
        return b""


class _Identity(_Stage):
    def __init__(self, limit: int) -> None:
        self._output = _Output(limit)

    def feed(self, data: bytes) -> bytes:
        self._output.write(data)
        return self._output.take()


class _Zlib(_Stage):
    """gzip, zlib-wrapped or raw deflate, by ``wbits``; gzip members may follow one another."""

    def __init__(self, limit: int, wbits: int) -> None:
        self._output = _Output(limit)
        self._wbits = wbits
        self._inflater = zlib.decompressobj(wbits)

    def feed(self, data: bytes) -> bytes:
        while data:
            if self._inflater.eof:  # only another gzip member may follow the end
                if self._wbits != _GZIP_WBITS:
                    raise _Undecodable("bytes after the end of the stream")
                self._inflater = zlib.decompressobj(self._wbits)
            try:
                # One byte more than there is room for: getting it means the limit is passed.
                self._output.write(self._inflater.decompress(data, self._output.room + 1))
            except zlib.error as exc:
                raise _Undecodable(str(exc)) from None
            data = self._inflater.unused_data
        return self._output.take()


class _Brotli(_Stage):
    def __init__(self, limit: int) -> None:
        self._output = _Output(limit)
        self._decompressor = brotli.Decompressor()

    def feed(self, data: bytes) -> bytes:
        try:
            chunk = self._decompressor.process(data, output_buffer_limit=_BROTLI_STEP)
            while chunk:  # a full step may leave more output waiting, drawn with empty input
                self._output.write(chunk)
                chunk = self._decompressor.process(b"", output_buffer_limit=_BROTLI_STEP)
        except brotli.error as exc:
            raise _Undecodable(str(exc)) from None
        return self._output.take()


class _Zstd(_Stage):
    """zstd through zstandard's stream writer, which hands each decoded block to the output.

    zstandard's decompressobj returns all that a call decodes at once (a
    64 KiB read of a bomb can be gigabytes) and its stream reader cannot be
    fed as bytes arrive; the writer passes on every block (at most 128 KiB)
    as it goes, so the limit stops a bomb after one block, whether or not
    its frame states a content size. Frames may follow one another.
    """

    def __init__(self, limit: int) -> None:
        self._output = _Output(limit)
        decompressor = zstandard.ZstdDecompressor(max_window_size=_ZSTD_MAX_WINDOW)
        self._writer = decompressor.stream_writer(self._output, write_return_read=True, closefd=False)

    def feed(self, data: bytes) -> bytes:
        try:
            self._writer.write(data)
        except zstandard.ZstdError as exc:
            raise _Undecodable(str(exc)) from None
        return self._output.take()


class _ChosenByFirstBytes(_Stage):
    """A stage picked by the first bytes of its input, which it holds until they decide."""

    def __init__(self, limit: int, choose: Callable[[bytes, bool, int], _Stage | None]) -> None:
        self._limit = limit
        self._choose = choose
        self._head = b""
        self._stage: _Stage | None = None

    def feed(self, data: bytes) -> bytes:
        if self._stage is not None:
            return self._stage.feed(data)
        self._head += data
        self._stage = self._choose(self._head, False, self._limit)
        if self._stage is None:
            return b""
        head, self._head = self._head, b""
        return self._stage.feed(head)

    def end(self) -> bytes:
        if self._stage is not None:
            return self._stage.end()
        self._stage = self._choose(self._head, True, self._limit)
        head, self._head = self._head, b""
        return self._stage.feed(head) + self._stage.end()


def _is_zlib_header(head: bytes) -> bool:
    """A zlib header: deflate, a window of at most 32 KiB, and the header checksum."""
    return len(head) >= 2 and head[0] & 0x0F == 8 and head[0] >> 4 <= 7 and (head[0] << 8 | head[1]) % 31 == 0


def _sniffed(head: bytes, final: bool, limit: int) -> _Stage | None:
    """The coding the first bytes show, identity when they show none; None while too few to tell."""
    if head.startswith(_GZIP_MAGIC):
        return _Zlib(limit, _GZIP_WBITS)
    if head.startswith(_ZSTD_MAGIC):
        return _Zstd(limit)
    if head[:1] == bytes([_ZLIB_FIRST_BYTE]) and _is_zlib_header(head):
        return _Zlib(limit, _ZLIB_WBITS)
    if not final and any(prefix.startswith(head) for prefix in _SNIFFED_PREFIXES):
        return None
    return _Identity(limit)


def _deflate(head: bytes, final: bool, limit: int) -> _Stage | None:
    """HTTP's deflate is meant to be zlib-wrapped, but some servers send it raw."""
    if len(head) < 2 and not final:
        return None
    return _Zlib(limit, _ZLIB_WBITS if _is_zlib_header(head) else _RAW_DEFLATE_WBITS)


_BY_NAME: dict[str, Callable[[int], _Stage]] = {
    "gzip": lambda limit: _Zlib(limit, _GZIP_WBITS),
    "x-gzip": lambda limit: _Zlib(limit, _GZIP_WBITS),
    "deflate": lambda limit: _ChosenByFirstBytes(limit, _deflate),
    "br": _Brotli,
    "zstd": _Zstd,
}


def _stages(content_encoding: str, limit: int) -> list[_Stage] | None:
    """The stages that undo a Content-Encoding, first stage first; None for too many codings."""
    codings = [name for name in (part.strip().lower() for part in content_encoding.split(","))
               if name and name != "identity"]
    if len(codings) > _MAX_CODINGS:
        return None
    if not codings or any(name not in _BY_NAME for name in codings):
        return [_ChosenByFirstBytes(limit, _sniffed)]
    return [_BY_NAME[name](limit) for name in reversed(codings)]


class Decoder:
    """Undoes a response's content coding chunk by chunk, as its bytes arrive.

    The caller keeps the raw chunks for the client and reads the plain bytes
    this returns: forward looks for the end of an SSE stream's first event in
    them. Once the stream turns out undecodable (corrupt, or more than
    ``limit`` plain bytes) every call returns None.
    """

    def __init__(self, content_encoding: str = "", limit: int = LIMIT) -> None:
        self._stages = _stages(content_encoding, limit)

    def feed(self, chunk: bytes) -> bytes | None:
        """The plain bytes ``chunk`` adds (often b"" while a decoder waits for more), or None."""
        return self._run(chunk, final=False)

    def end(self) -> bytes | None:
        """The input is over: the plain bytes held back until now, or None."""
        return self._run(b"", final=True)

    def _run(self, data: bytes, *, final: bool) -> bytes | None:
        if self._stages is None:
            return None
        try:
            for stage in self._stages:
                data = stage.feed(data) + stage.end() if final else stage.feed(data)
        except _Undecodable:
            self._stages = None
            return None
        return data


def decoded(data: bytes, content_encoding: str = "", limit: int = LIMIT) -> bytes | None:
    """``data`` without its content coding, or None when it cannot be decoded within ``limit`` bytes.

    ``content_encoding`` is the response's Content-Encoding header ("" when
    it has none); see the module docstring for how the coding is chosen.
    """
    if not content_encoding and len(data) <= limit and not data.startswith(_SNIFFED_FIRST_BYTES):
        return data  # what the sniffing decoder would answer, without building one: most bodies are plain
    decoder = Decoder(content_encoding, limit)
    body = decoder.feed(data)
    rest = decoder.end()
    if body is None or rest is None:
        return None
    return body + rest
