"""What clipal takes from a client: the framing and header rules of a request, as pure functions.

A proxy must read a request's length exactly as every server behind it
would, or the bytes after what it took for the body become a request of
their own (request smuggling, RFC 9112 section 11.2). clipal is the only
parser of what a client sends and re-frames what it forwards, so it cannot
be desynchronised from its upstreams; but a request it frames differently
from what the client meant still runs the rest of the body as a second
request, with the owner's keys. So anything ambiguous is refused, never
guessed at, and the connection is closed after the refusal (RFC 9112
section 6.3): nothing later on it can be trusted to start where clipal
thinks.

- Framing (RFC 9112 section 6): Content-Length is plain ASCII digits and
  appears once; Transfer-Encoding appears once, is exactly ``chunked``, and
  never next to a Content-Length. A coding clipal does not know is a 501.
- Header hygiene: a header block is at most 64 KiB (431); an obs-fold line
  (RFC 9112 section 5.2), a bare CR, a NUL or another control character, or a
  line that is not ``name: value`` is a 400.

The two servers clipal runs on call these rules: :class:`clipal.server.FrontDoorHandler`
(gevent's pywsgi, the ``clipal`` command) on the head as read, and
:mod:`clipal.wsgi` on gunicorn's parsed environ for what gunicorn's own,
already strict, parser lets through. A reason returned here is short, fixed
text: it never repeats a header value, which may carry a key.
"""

from __future__ import annotations

import errno
import json
import re
from dataclasses import dataclass
from http import HTTPStatus
from typing import Iterable, Mapping

from .clients import CLIENTS

#: The largest request header block accepted (field lines and the blank line that ends them).
MAX_HEADER_BLOCK = 64 * 1024
#: Lines in a header block, the blank one included: http.client's limit, as it parses the block.
MAX_HEADER_LINES = 100

#: Transfer codings with a registered meaning (RFC 9112 section 7). Any other is not implemented (501);
#: these are refused (400) unless the whole Transfer-Encoding is ``chunked``: clipal decodes nothing else.
KNOWN_CODINGS = frozenset({"chunked", "compress", "deflate", "gzip", "identity", "x-compress", "x-gzip"})

#: errno values of a process, or the whole system, out of file descriptors.
NO_FILE_DESCRIPTORS = frozenset({errno.EMFILE, errno.ENFILE})

# A valid block, in one regular-expression pass: lines of token ":" value, where a value is
# SP, HTAB, visible ASCII and obs-text (RFC 9110 section 5.5), then the blank line.
_TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_VALID_BLOCK = re.compile(rb"(?:" + _TOKEN + rb":[\t\x20-\x7e\x80-\xff]*\r?\n)*\r?\n")
_VALID_LINE = re.compile(_TOKEN + rb":[\t\x20-\x7e\x80-\xff]*")
_CONTROL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")


@dataclass(frozen=True)
class Refusal:
    """A request clipal answers itself, then closes the connection."""

    status: int
    reason: str  # fixed text, safe to log

    @property
    def phrase(self) -> str:
        return HTTPStatus(self.status).phrase


class Refused(ValueError):
    """Raised where a rule refuses a request. A ValueError, as gevent's pywsgi expects for a client's error."""

    def __init__(self, refusal: Refusal) -> None:
        super().__init__(refusal.reason)
        self.refusal = refusal


class OutOfFileDescriptors(Exception):
    """clipal could not open a connection for lack of file descriptors: its problem, not a provider's."""


def too_large(size: int) -> Refusal:
    return Refusal(431, f"request header block over {MAX_HEADER_BLOCK // 1024} KiB ({size} bytes or more)")


TOO_MANY_LINES = Refusal(431, f"more than {MAX_HEADER_LINES - 1} request header fields")


def header_block_problem(block: bytes) -> Refusal | None:
    """What is wrong with a header block, or None.

    ``block`` is the field lines, each with its line end (CRLF, or LF as
    http.client also reads), then the blank line that ends the block.
    """
    if len(block) > MAX_HEADER_BLOCK:
        return too_large(len(block))
    if block.count(b"\n") > MAX_HEADER_LINES:
        return TOO_MANY_LINES
    if _VALID_BLOCK.fullmatch(block):
        return None  # the common case: one pass over the block
    for line in block.split(b"\n")[:-2]:  # the last two: the blank line and what follows its LF
        content = line[:-1] if line.endswith(b"\r") else line
        if line[:1] in (b" ", b"\t"):
            return Refusal(400, "obsolete line folding in a request header")
        if b"\r" in content:
            return Refusal(400, "bare CR in a request header")
        if b"\0" in content:
            return Refusal(400, "NUL in a request header")
        if _CONTROL.search(content):
            return Refusal(400, "control character in a request header")
        if not _VALID_LINE.fullmatch(content):
            return Refusal(400, "malformed request header line")
    return Refusal(400, "malformed request header block")


def framing_problem(headers: Iterable[tuple[str, str]], http_version: str) -> Refusal | None:
    """What makes the body's length ambiguous or unreadable, or None (RFC 9112 section 6).

    ``headers`` are the request's (name, value) pairs, repeated names as
    separate pairs; ``http_version`` is ``"HTTP/1.1"``, ``"HTTP/1.0"``...
    """
    lengths: list[str] = []
    codings: list[str] = []
    for name, value in headers:  # (the lengths first: this runs for every request)
        if len(name) == 14 and name.lower() == "content-length":
            lengths.append(value.strip(" \t"))
        elif len(name) == 17 and name.lower() == "transfer-encoding":
            codings.append(value.strip(" \t"))
    if codings:
        if lengths:
            return Refusal(400, "both Content-Length and Transfer-Encoding")
        if len(codings) > 1:
            return Refusal(400, "more than one Transfer-Encoding header")
        names = [coding.strip(" \t").lower() for coding in codings[0].split(",")]
        if any(name not in KNOWN_CODINGS for name in names if name):
            return Refusal(501, "unsupported transfer coding")
        if names != ["chunked"]:
            return Refusal(400, "Transfer-Encoding other than chunked")
        if http_version == "HTTP/1.0":
            return Refusal(400, "Transfer-Encoding in an HTTP/1.0 request")
    elif lengths:
        if len(lengths) > 1:
            return Refusal(400, "more than one Content-Length")
        # int() would also take "+42", "4_2", " 42" and non-ASCII digits
        if not (lengths[0].isascii() and lengths[0].isdigit()):
            return Refusal(400, "Content-Length is not a number")
    return None


def environ_problem(environ: Mapping[str, object]) -> Refusal | None:
    """The rules above for a request another server parsed, from its WSGI environ.

    The server has joined repeated fields and kept only what it accepted, so
    this sees the block's size (estimated from names and values) and its
    framing headers as joined; what is lost in the joining is the server's
    own parser's to refuse.
    """
    size = 2  # the blank line
    for key, value in environ.items():
        if key.startswith("HTTP_"):
            size += len(key) - 5 + len(value) + 4  # type: ignore[arg-type]
        elif key in ("CONTENT_TYPE", "CONTENT_LENGTH") and value:
            size += len(key) + len(value) + 4  # type: ignore[arg-type]
    if size > MAX_HEADER_BLOCK:
        return too_large(size)
    framing = [(name, environ[key]) for name, key in (("Content-Length", "CONTENT_LENGTH"),
                                                      ("Transfer-Encoding", "HTTP_TRANSFER_ENCODING"))
               if environ.get(key)]
    return framing_problem(framing, str(environ.get("SERVER_PROTOCOL", "HTTP/1.1")))  # type: ignore[arg-type]


def refusal_response(refusal: Refusal, path: str | None) -> bytes:
    """The whole HTTP response to a refused request: a small JSON error, then the connection closes.

    The JSON has the shape of the client the path belongs to, so an agent's
    SDK reports it as an API error like any other.
    """
    message = f"clipal: {refusal.reason}"
    client = next((c for c in CLIENTS if path and (path == c.prefix or path.startswith(c.prefix + "/"))), None)
    if client is not None:
        body = client.error_body(refusal.status, message)
    else:
        body = json.dumps({"error": {"type": "invalid_request_error", "message": message}}).encode()
    head = (f"HTTP/1.1 {refusal.status} {refusal.phrase}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n")
    return head.encode("latin-1") + body
