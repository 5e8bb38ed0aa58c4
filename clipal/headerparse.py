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
"""

from __future__ import annotations

import email.parser
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


def parse_headers(fp, _class=http.client.HTTPMessage):
    """``http.client.parse_headers``: same arguments, same limits and errors, same result."""
    lines = http.client._read_headers(fp)
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


def _with_fast_headers(function):
    """An http.client function whose ``parse_headers`` global is :func:`parse_headers`."""
    namespace = dict(function.__globals__, parse_headers=parse_headers)
    return types.FunctionType(function.__code__, namespace, function.__name__, function.__defaults__,
                              function.__closure__)


class HTTPResponse(http.client.HTTPResponse):
    """http.client's response, reading its header block with :func:`parse_headers`.

    ``begin`` is http.client's own code, only bound to this module's parser.
    """

    begin = _with_fast_headers(http.client.HTTPResponse.begin)
