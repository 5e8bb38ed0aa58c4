"""Whether a streamed (SSE) answer reached its protocol's end: the completion check.

A provider that cuts its stream short - cleanly, with a proper end of the
HTTP body, or not - has failed even though clipal committed to it: the agent
got half an answer. The relay cannot fail over any more (bytes went out), but
it can notice, log a warning naming the provider and count a failure, so the
agent's retry of the turn goes elsewhere. Noticing means seeing the
protocol's terminal event:

- Anthropic (Claude Code): the ``message_stop`` event, or an ``error`` event;
- OpenAI Chat Completions (Codex): ``data: [DONE]``, or a chunk whose
  ``finish_reason`` is not null;
- OpenAI Responses (Codex): ``response.completed``, ``response.failed``,
  ``response.incomplete`` or ``error``.

Gemini streams have no terminal event (the last chunk merely carries a
``finishReason``, and a stream may end without one), so they are not checked.
Codex speaks Chat Completions or Responses as its own configuration says,
which clipal never sees; its streams accept either protocol's terminal
event, which is safe because neither protocol's terminal marker occurs in
the other's streams.

This module only reads: :class:`CompletionCheck` is fed the chunks the
client gets and never changes them. It is pure (no I/O); the relay owns the
logging and the circuit breaker.

How an event is recognised, and why:

- An event's name is read from its ``event:`` line; an event's type also from
  its data's ``"type"`` member, because Codex reads Responses events by their
  data alone and some providers leave the ``event:`` lines out.
- A terminal event counts once the line that names it has arrived whole (up
  to its CR or LF): the check asks whether the provider reached the end of its
  answer, and one that sent ``event: message_stop`` and its data has, even if
  the blank line that ends the event never follows. A line that has not
  ended (the stream stops inside it) does not count: it may be cut short
  (``data: [DO``), and SSE clients act on whole lines only.
- The hot path does not parse JSON. Each batch of whole lines is searched
  for the few byte strings a terminal event must contain (``message_stop``,
  ``error``, ``[DONE]``, ...), and only a line that contains one is looked at
  more closely: its field, its ``"type"`` member. Inside a JSON string a quote
  is always escaped and a line break always written ``\\n``, so text that
  merely mentions ``"type":"message_stop"`` or a line ``event: error`` (an
  agent working on this very file) does not end the stream.
- ``"finish_reason":null`` is on nearly every Chat chunk; only a value other
  than ``null`` (or ``""``, which some providers send for "not yet") counts.
- Only the unfinished last line is kept between chunks, and at most
  ``LINE_LIMIT`` bytes of it: a longer line (a ``response.completed`` that
  repeats the whole answer) is judged by its head, where the ``"type"`` is.

Encoded streams (gzip, deflate, br, zstd; by Content-Encoding or by their
magic bytes, as :mod:`clipal.decode` recognises them) are decoded
incrementally from their first byte: a coding cannot be entered in its
middle, so decoding only a tail would still mean decoding everything before
it (or keeping the whole raw stream). Decoding costs more than the search
(see bench/completion_cost.py) and stops after ``DECODE_LIMIT`` plain bytes,
and at the first byte that does not decode; the check then reports
``"unchecked"``, never ``"incomplete"``, since nothing is known against the
provider. The decoder's own bound also caps its memory: one bomb chunk costs
at most about one limit of memory, once.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from .decode import Decoder

__all__ = ["DECODE_LIMIT", "LINE_LIMIT", "CompletionCheck", "Status", "looks_like_sse"]

#: What the check concluded; see :attr:`CompletionCheck.status`.
Status = Literal["complete", "incomplete", "unchecked"]

#: The most plain bytes of an encoded stream inspected; past them the check is abandoned.
#: SSE compresses well (about ten to one), so this covers streams of more than a megabyte as
#: received, and an answer that writes a large file is still checked.
DECODE_LIMIT = 16 << 20
#: The most bytes of one unfinished line kept between chunks.
LINE_LIMIT = 64 * 1024

_BOM = b"\xef\xbb\xbf"
# The first bytes of gzip, zstd and zlib: decode.py recognises these codings by their magic
# bytes even without a Content-Encoding. A stream starting with any other byte is plain, and
# skips the decoder (whose byte count would end the inspection of a long plain stream).
_MAGIC_FIRST_BYTES = frozenset(b"\x1f\x28\x78")
# A Chat chunk whose finish_reason is set: any value but null or "" on the same line.
_FINISH_REASON_SET = re.compile(rb'"finish_reason"[ \t]*:[ \t]*(?!null\b|"")[^\s]')
_SSE_PRELUDE = (b":", b"id:", b"retry:")


@dataclass(frozen=True)
class _Rule:
    """The terminal events one client's streams may end with, and what finds them."""

    #: terminal event names (on ``event:`` lines) and data types
    names: frozenset[bytes]
    #: the byte strings whole lines are searched for: a line holding one is looked at closely
    markers: tuple[bytes, ...]
    #: whether Chat Completions' ``[DONE]`` and ``finish_reason`` end a stream too
    chat: bool
    #: a data line whose JSON has a terminal ``"type"`` member
    data_type: re.Pattern[bytes]


def _rule(names: tuple[bytes, ...], *, chat: bool) -> _Rule:
    alternatives = b"|".join(re.escape(name) for name in names)
    return _Rule(names=frozenset(names), markers=names + ((b"[DONE]",) if chat else ()), chat=chat,
                 data_type=re.compile(rb'"type"\s*:\s*"(?:' + alternatives + rb')"'))


#: By client kind name; Gemini's streams are not checked.
_BY_CLIENT: dict[str, _Rule | None] = {
    "claudecode": _rule((b"message_stop", b"error"), chat=False),
    "codex": _rule((b"response.completed", b"response.failed", b"response.incomplete", b"error"), chat=True),
    "gemini": None,
}


def looks_like_sse(content_type: str, first_bytes: bytes) -> bool:
    """Whether a response is an SSE stream: by its Content-Type, or else by its first bytes.

    ``first_bytes`` are the body's first bytes decoded (for an encoded body,
    :func:`clipal.decode.decoded` of what was read). Some providers stream
    with ``application/json`` or no Content-Type at all; their bodies start
    with an ``event:`` or ``data:`` line, which no JSON document or error page
    does. Blank lines, a UTF-8 byte order mark, and comment (``:``), ``id:``
    and ``retry:`` lines may come first, as SSE allows (OpenRouter opens with
    comments); but only an ``event:`` or ``data:`` line decides: bytes that
    end inside that prelude are not enough to tell, and say no.
    """
    if content_type.split(";", 1)[0].strip().lower() == "text/event-stream":
        return True
    data = first_bytes[len(_BOM):] if first_bytes.startswith(_BOM) else first_bytes
    at = 0
    while at < len(data):
        end = _line_end(data, at)
        line = data[at:] if end < 0 else data[at:end]
        if line.startswith((b"event:", b"data:")):
            return True
        if end < 0 or (line and not line.startswith(_SSE_PRELUDE)):
            return False
        at = end + 1
    return False


def _line_end(data: bytes, start: int) -> int:
    """Where the line starting at ``start`` ends (its CR or LF), -1 when it has not ended."""
    lf = data.find(b"\n", start)
    cr = data.find(b"\r", start, lf if lf >= 0 else len(data))
    return cr if cr >= 0 else lf


def _line_start(data: bytes, end: int) -> int:
    """Where the line holding position ``end`` starts."""
    return max(data.rfind(b"\n", 0, end), data.rfind(b"\r", 0, end)) + 1


class CompletionCheck:
    """Watches one committed SSE response for its protocol's terminal event.

    ``client`` is the client kind's name (``"claudecode"``, ``"codex"``,
    ``"gemini"``); ``content_encoding`` the response's Content-Encoding
    header (``""`` when it has none). Feed it every chunk the client gets, in
    order, from the first body bytes on; read :attr:`status` once the stream
    is over. It keeps at most ``LINE_LIMIT`` bytes between chunks, plus
    the decoder's state for an encoded stream.
    """

    def __init__(self, client: str, content_encoding: str = "", limit: int = DECODE_LIMIT) -> None:
        if client not in _BY_CLIENT:
            raise ValueError(f"no completion rule for client {client!r}")
        self._rule = _BY_CLIENT[client]
        self._verdict: Status | None = None if self._rule else "unchecked"
        self._content_encoding = content_encoding
        self._limit = limit
        names = [name.strip().lower() for name in content_encoding.split(",")]
        self._encoded = any(name and name != "identity" for name in names)
        self._decoder: Decoder | None = Decoder(content_encoding, limit) if self._encoded else None
        self._started = False
        self._carry = b""  # the unfinished last line (its head, when it is overlong)
        self._overlong = False  # the unfinished line passed LINE_LIMIT: its rest is skipped

    @property
    def status(self) -> Status:
        """``"complete"``: a terminal event was seen; ``"incomplete"``: none so far;
        ``"unchecked"``: nothing can be said (Gemini; an encoded stream that did
        not decode or passed the limit before its terminal event)."""
        return self._verdict or "incomplete"

    @property
    def complete(self) -> bool:
        """Whether the stream owes nothing: its terminal event was seen, or it is Gemini's (never checked)."""
        return self._verdict == "complete" or self._rule is None

    def feed(self, chunk: bytes) -> None:
        """Look at the next chunk the client gets; after a verdict it is ignored at once."""
        if self._verdict is not None or not chunk:
            return
        if not self._started:
            self._started = True
            if not self._encoded and chunk[0] in _MAGIC_FIRST_BYTES:
                self._decoder = Decoder(self._content_encoding, self._limit)
        if self._decoder is not None:
            plain = self._decoder.feed(chunk)
            if plain is None:  # corrupt, or more than the limit: the check is abandoned
                self._verdict = "unchecked"
                self._decoder = None
                return
            if not plain:
                return
            chunk = plain
        self._scan(chunk)

    def _scan(self, data: bytes) -> None:
        """Search the whole lines that ``data`` completes; keep its unfinished last line."""
        if self._overlong:
            end = _line_end(data, 0)
            if end < 0:
                return  # still inside the overlong line
            head, self._carry, self._overlong = self._carry, b"", False
            if self._ends_stream(head + b"\n"):
                self._verdict = "complete"
                return
            data = data[end:]
        elif self._carry:
            data = self._carry + data
        last = data[-1]
        if last == 10 or last == 13:  # "\n" or "\r": the usual case, a chunk of whole events
            lines, rest = data, b""
        else:
            cut = _line_start(data, len(data))
            lines, rest = data[:cut], data[cut:]
        if len(rest) > LINE_LIMIT:
            rest, self._overlong = rest[:LINE_LIMIT], True
        self._carry = rest
        if lines and self._ends_stream(lines):
            self._verdict = "complete"
            self._carry = b""

    def _ends_stream(self, lines: bytes) -> bool:
        """Whether whole ``lines`` (ending with a line break) hold a terminal event."""
        rule = self._rule
        assert rule is not None  # an unchecked stream has its verdict and is never scanned
        for marker in rule.markers:
            at = lines.find(marker)
            while at >= 0:
                end = _line_end(lines, at)
                if _is_terminal(rule, lines[_line_start(lines, at):end]):
                    return True
                at = lines.find(marker, end)
        # A JSON key cannot occur unquoted inside a string, so no line check is needed here.
        return rule.chat and _FINISH_REASON_SET.search(lines) is not None


def _is_terminal(rule: _Rule, line: bytes) -> bool:
    """One whole line, without its line break: an ``event:`` or ``data:`` line that ends the stream."""
    if line.startswith(_BOM):
        line = line[len(_BOM):]
    field, _, value = line.partition(b":")
    if field == b"event":
        return value.strip() in rule.names
    if field != b"data":
        return False
    if rule.chat and value.strip() == b"[DONE]":
        return True
    return rule.data_type.search(value) is not None
