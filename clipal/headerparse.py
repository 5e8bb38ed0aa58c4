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

#: A header name as the email parser's header-line pattern accepts it (no empty name).
_NAME = re.compile(r"[\041-\071\073-\176]+")
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
    pairs = []
    for raw in lines[:-1]:
        line = raw.decode("iso-8859-1")
        content = line[:-2] if line.endswith("\r\n") else line[:-1]
        if "\r" in content:
            return None  # the email parser splits lines on a bare CR too
        name, _, value = content.partition(":")
        if not _NAME.fullmatch(name) or len(name) == len(content):
            return None  # no colon, empty or odd name, continuation line, "From " line
        value = value.lstrip(" \t")
        if name.lower() == "content-type" and value.lower().startswith(_MIME_STRUCTURE):
            return None
        pairs.append((name, value))
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
