"""Test bodies compressed the way upstream servers send them.

``encoded(coding, plain)`` compresses a whole body; ``encoded_stream(coding,
pieces)`` compresses a stream piece by piece, flushing after each one as a
server does after every SSE event, so each piece decodes as soon as it
arrives; ``raw_deflate`` is deflate without its zlib wrapper, as some
servers send it. The decoders under test are clipal's; the encoders are
the libraries' own.
"""

from __future__ import annotations

import zlib

import brotli
import zstandard

#: The content codings clipal decodes, by their Content-Encoding names.
CODINGS = ("gzip", "deflate", "br", "zstd")


def encoded(coding: str, plain: bytes) -> bytes:
    """``plain`` compressed whole with one coding."""
    return b"".join(encoded_stream(coding, [plain]))


def raw_deflate(data: bytes) -> bytes:
    """Deflate without the zlib wrapper, as some servers send ``Content-Encoding: deflate``."""
    deflater = zlib.compressobj(wbits=-15)
    return deflater.compress(data) + deflater.flush()


def encoded_stream(coding: str, pieces: list[bytes]) -> list[bytes]:
    """Each piece compressed and flushed on its own; the last one also ends the stream."""
    if coding in ("gzip", "deflate"):
        deflater = zlib.compressobj(wbits=31 if coding == "gzip" else 15)
        chunks = [deflater.compress(piece) + deflater.flush(zlib.Z_SYNC_FLUSH) for piece in pieces]
        chunks[-1] += deflater.flush()
    elif coding == "br":
        # Quality 5, as servers use for dynamic content; 11 is meant for static files and is slow.
        compressor = brotli.Compressor(quality=5)
        chunks = [compressor.process(piece) + compressor.flush() for piece in pieces]
        chunks[-1] += compressor.finish()
    elif coding == "zstd":
        frame = zstandard.ZstdCompressor().compressobj()
        chunks = [frame.compress(piece) + frame.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK) for piece in pieces]
        chunks[-1] += frame.flush()
    else:
        raise ValueError(f"no encoder for {coding!r}")
    return chunks
