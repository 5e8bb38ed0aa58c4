"""A fast path for ``http.client.parse_headers``, on both sides of the proxy.

http.client (under urllib3, for upstream responses) and gevent's pywsgi (for
client requests) turn a header block into a message object with the email
package's FeedParser, a general MIME parser: about 60 us for a dozen headers
on a small machine, 7-10 % of clipal's CPU for a small proxied request.

An HTTP header block is nearly always plain ``Name: value`` lines. For those,
:func:`parse_headers` builds the same message object directly: same class,
same ``(name, value)`` list, same values (leading blanks and the line end
removed, as the email parser's compat32 policy does). Anything else
(continuation lines, a bare CR, a name the email parser would not take as a
header, a missing blank line, a multipart/* or message/* Content-Type, which
the email parser treats as MIME structure) goes to the email parser exactly as
``http.client.parse_headers`` would hand it over, so the result is always
identical. Nothing is patched globally: pywsgi uses this through
:class:`clipal.server.ProxyHandler`, urllib3 through :class:`HTTPResponse`.

Upstream responses are also held to stricter rules than http.client's, here
and nowhere else, because what passes is relayed to the client:
:func:`read_header_lines` refuses a bare CR (the email parser would split the
line there, so ``X-A: a\rSet-Cookie: evil=1`` would reach the client as two
headers), a NUL, and a block over 64 KiB in total (http.client only limits
each line and the line count, so 6 MB passes). Interim 1xx responses are
skipped (:meth:`HTTPResponse._read_status`). For a block those rules accept,
the parsed message is still exactly http.client's. A reason phrase with other
control characters is relayed as the status's standard phrase
(:func:`relayable_reason`).
"""

from __future__ import annotations

import email.parser
import http
import http.client
import re
import types
from email import policy

#: A block of plain header lines: a name the email parser takes as a header
#: (printable ASCII but the colon, at least one character), a colon, a value
#: without CR or LF, a CRLF or LF line end.
_PLAIN_BLOCK = re.compile(r"(?:[\041-\071\073-\176]+:[^\r\n]*\r?\n)*")
#: One such line: name, and value without its leading blanks (compat32 strips them).
_PLAIN_LINE = re.compile(r"([\041-\071\073-\176]+):[ \t]*([^\r\n]*)\r?\n")
_MIME_STRUCTURE = ("multipart/", "message/")

#: The largest upstream header block relayed, blank line included. It is also
#: http.client's limit for one line, so one long line fails this check first.
MAX_HEADER_BLOCK = 64 * 1024
#: Interim responses skipped before the final one; past this the upstream is looping.
MAX_INTERIM_RESPONSES = 16


class MalformedHeaderBlock(http.client.HTTPException):
    """An upstream response head clipal will not relay.

    An HTTPException, so urllib3 handles it as it does http.client's own
    limits: the connection is closed, and requests raises ConnectionError.
    The message names the rule broken, never a header value (it may echo a key).
    """

    def __init__(self, problem: str) -> None:
        super().__init__(f"upstream sent a malformed header block ({problem})")


def parse_headers(fp, _class=http.client.HTTPMessage):
    """``http.client.parse_headers``: same arguments, same limits and errors, same result."""
    return _message(http.client._read_headers(fp), _class)


def parse_response_headers(fp, _class=http.client.HTTPMessage):
    """:func:`parse_headers` for an upstream response: :func:`read_header_lines` reads the block."""
    return _message(read_header_lines(fp), _class)


def read_header_lines(fp) -> list[bytes]:
    """``http.client._read_headers`` plus the upstream rules; raises :class:`MalformedHeaderBlock`.

    Reading stops as soon as the block is too large, so an oversized one is
    never buffered whole. The count limit is http.client's, checked in the
    same order, so a block it accepts is accepted here unless it breaks a rule.
    """
    lines: list[bytes] = []
    size = 0
    while True:
        line = fp.readline(MAX_HEADER_BLOCK - size + 1)
        size += len(line)
        if size > MAX_HEADER_BLOCK:
            raise MalformedHeaderBlock(f"over {MAX_HEADER_BLOCK // 1024} KiB")
        lines.append(line)
        if len(lines) > http.client._MAXHEADERS:
            raise MalformedHeaderBlock(f"more than {http.client._MAXHEADERS} lines")
        if line in (b"\r\n", b"\n", b""):
            break
    problem = forbidden_bytes(b"".join(lines))
    if problem is not None:
        raise MalformedHeaderBlock(problem)
    return lines


def forbidden_bytes(head: bytes) -> str | None:
    """What in a response head's bytes must not be relayed ("bare CR", "NUL"), or None."""
    if head.count(b"\r") != head.count(b"\r\n"):
        return "bare CR"
    if b"\0" in head:
        return "NUL"
    return None


def _check_reason(reason: str) -> None:
    """Refuse a reason phrase (its line end still on, as http.client leaves it) with a bare CR or NUL.

    clipal relays the reason phrase; the server it relays it through would
    refuse a CR there only once the attempt is past failing over.
    """
    problem = forbidden_bytes(reason.encode("iso-8859-1").removesuffix(b"\r\n").removesuffix(b"\n"))
    if problem is not None:
        raise MalformedHeaderBlock(f"{problem} in the status line")


#: A character a reason phrase must not hold: a control character other than HTAB (the grammar
#: allows HTAB, SP, VCHAR and obs-text, RFC 9112 section 4). Bare CR and NUL never get this far
#: (:func:`_check_reason` fails the attempt on them).
_NOT_IN_A_REASON = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


def relayable_reason(status: int, reason: str) -> str:
    """The reason phrase to relay: the upstream's, or the standard one for ``status`` if it holds control characters.

    A reason phrase carries no meaning (clients ignore it), so a garbled one
    is not worth failing over for; but relayed raw, an escape sequence in it
    would reach whatever prints the client's status line.
    """
    if _NOT_IN_A_REASON.search(reason) is None:
        return reason
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return ""


def _message(lines: list[bytes], _class):
    message = _simple_message(lines, _class)
    if message is None:
        text = b"".join(lines).decode("iso-8859-1")
        message = email.parser.Parser(_class=_class).parsestr(text)
    return message


def _simple_message(lines: list[bytes], _class):
    """The parsed message when every line is a plain header line, else None."""
    if not lines or lines[-1] not in (b"\r\n", b"\n"):
        return None  # ended without a blank line: leave the edge cases to the email parser
    block = b"".join(lines[:-1]).decode("iso-8859-1")
    if _PLAIN_BLOCK.fullmatch(block) is None:
        return None  # continuation line, bare CR, no colon, empty or odd name, "From " line
    pairs = _PLAIN_LINE.findall(block)
    for name, value in pairs:
        if len(name) == 12 and name.lower() == "content-type" and value.lower().startswith(_MIME_STRUCTURE):
            return None
    message = _class(policy=policy.compat32)
    message._headers = pairs
    message._payload = ""  # what the email parser leaves for an empty body
    return message


def _with_parser(function, parser):
    """An http.client function whose ``parse_headers`` global is ``parser``."""
    namespace = dict(function.__globals__, parse_headers=parser)
    return types.FunctionType(function.__code__, namespace, function.__name__, function.__defaults__,
                              function.__closure__)


class HTTPResponse(http.client.HTTPResponse):
    """http.client's response for upstream responses, read with :func:`parse_response_headers`.

    ``begin`` is http.client's own code, only bound to that parser.
    """

    begin = _with_parser(http.client.HTTPResponse.begin, parse_response_headers)

    def _read_status(self):
        # begin() skips 100 Continue only: a 103 Early Hints would be taken as
        # the final response, body-less, and the real one left unread on a
        # connection that goes back to the pool. 101 is final (the protocol changes).
        for _ in range(MAX_INTERIM_RESPONSES + 1):
            version, status, reason = super()._read_status()
            _check_reason(reason)
            if not 100 <= status < 200 or status == 101:
                return version, status, relayable_reason(status, reason.rstrip("\r\n"))
            read_header_lines(self.fp)  # held to the same rules, then dropped
        raise MalformedHeaderBlock(f"more than {MAX_INTERIM_RESPONSES} interim responses")
