"""One attempt against one provider, up to the commit point, and the stream after it.

:func:`send` sends the request and waits for what clipal calls the commit
point: the response headers *and* the first body bytes (or the first whole
event of an SSE stream, so an error event can still fail over), and returns
what it saw as a :class:`Ready`. It does not judge the answer: the attempt
loop asks :func:`clipal.classify.classify_answer` whether to fail over. A
network failure before the commit point (no connection, no headers or no
first bytes within the idle timeout, a broken or malformed response head)
raises :class:`NetworkFailure`. Nothing has reached the client yet in
either case. :func:`stream_rest` then relays the remaining bytes exactly as
they arrive.

Bytes are read with urllib3's ``read1(decode_content=False)`` (after the
commit point, a chunked body with http.client's own, see
:func:`clipal.transport.body_reader`): it returns whatever has arrived (one
recv) instead of waiting to fill a buffer, it removes chunked framing but
never content encoding, so a gzip body stays gzip. Every wait on the upstream is bounded by the whole idle timeout (:class:`IdleTimer`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Mapping

import gevent
import requests
from gevent import getcurrent
import urllib3.exceptions

from .body import Payload, Replay
from .classify import FAILOVER_STATUSES, Kind
from .config import format_duration
from .completion import looks_like_sse
from .decode import Decoder, decoded
from .outbound import UpstreamRequest, end_to_end
from .frontdoor import NO_FILE_DESCRIPTORS, OutOfFileDescriptors
from .transport import body_reader, causes, describe_error, prepare, proxies_for, refused_head

#: Largest read handed to the client at once; smaller reads return as soon as bytes arrive.
READ_SIZE = 64 * 1024
#: Error bodies are read up to this size for classification and logs.
ERROR_BODY_LIMIT = 64 * 1024
#: An SSE response is committed after its first event, or after this many bytes without one.
FIRST_EVENT_LIMIT = 64 * 1024
#: Opening a TCP/TLS connection gets at most this long (or the idle timeout, if shorter).
CONNECT_TIMEOUT = 15.0


class NetworkFailure(Exception):
    """The provider could not be reached or broke off before its first body bytes."""

    def __init__(self, reason: str, kind: Kind = Kind.SERVER_ERROR) -> None:
        super().__init__(reason)
        self.reason = reason
        self.kind = kind  # Kind.TIMEOUT for an idle timeout, else SERVER_ERROR


class UpstreamIdle(Exception):
    """No bytes from the upstream within the idle timeout."""


@dataclass
class Ready:
    """An upstream response at its commit point, and what clipal read of it to judge it.

    ``first`` is what the client gets first, exactly as received. ``event``
    is the first SSE event of a 2xx stream, decoded (None for anything else);
    for a status that may fail over, ``first`` is the (bounded) error body.
    """

    status: int
    reason: str
    headers: list[tuple[str, str]]
    upstream_headers: Mapping[str, str]
    first: bytes
    event: bytes | None
    response: requests.Response
    #: bounds the reads of the rest of the body, as it bounded those before the commit point
    timer: IdleTimer

    def close(self) -> None:
        self.response.close()
        self.timer.close()


class IdleTimer:
    """Bounds each wait on the upstream by the whole idle timeout (``0``: no limit).

    One per attempt, re-armed for every read: ``with timer: read()``. A
    stream reads once per event, and a ``gevent.Timeout`` per read (a Python
    object and a libev timer made and freed each time) cost more than the
    rest of relaying a small event. libev's ``ev_timer_again`` restarts a
    repeating timer at its whole repeat from now; a timer stopped and started
    again would instead resume with what it had left, and cut a steady
    stream one timeout after its start.
    """

    __slots__ = ("_timer", "_waiting")

    def __init__(self, timeout: float) -> None:
        self._timer = gevent.get_hub().loop.timer(timeout, timeout) if timeout else None
        self._waiting = None

    def start(self) -> None:
        """Arm it for one wait, with the whole timeout from now."""
        if self._timer is not None:
            self._waiting = getcurrent()
            self._timer.again(self._expired)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.stop()
            self._waiting = None

    def __enter__(self) -> None:
        self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _expired(self) -> None:  # runs in the hub, while the reading greenlet waits
        waiting, self._waiting = self._waiting, None
        self._timer.stop()
        if waiting is not None:
            waiting.throw(UpstreamIdle())

    def close(self) -> None:
        if self._timer is not None:
            self._timer.stop()
            self._timer.close()
            self._timer = None


class _ClientPaced:
    """A :class:`~clipal.body.Replay` whose waits on the client are left off the upstream's clock.

    The timer is stopped while the next piece of a body still arriving is
    read from the client: a slow client is bounded by the server's body read
    timeout, and its slowness is never the provider's idle time. Each piece
    sent starts the timer again with the whole timeout.
    """

    def __init__(self, body: Replay, timer: IdleTimer) -> None:
        self._body = body
        self._timer = timer

    def __len__(self) -> int:  # the announced length frames the request (transport.prepare)
        return len(self._body)

    def __iter__(self) -> Iterator[bytes]:
        pieces = iter(self._body)
        while True:
            self._timer.stop()
            try:
                piece = next(pieces, None)
            finally:
                self._timer.start()
            if piece is None:
                return
            yield piece


def _read_some(response: requests.Response, timer: IdleTimer) -> bytes:
    """The next bytes of the raw (still encoded) body; ``b""`` at its end."""
    with timer:
        return response.raw.read1(READ_SIZE, decode_content=False) or b""


def _read_up_to(response: requests.Response, limit: int, timer: IdleTimer) -> bytes:
    """Read until EOF or ``limit`` bytes."""
    buffer = bytearray()
    while len(buffer) < limit:
        data = _read_some(response, timer)
        if not data:
            break
        buffer += data
    return bytes(buffer)


def _read_first_event(response: requests.Response, timer: IdleTimer, received: bytes = b"") -> tuple[bytes, bytes]:
    """An SSE stream up to the end of its first event: the bytes as received, and decoded.

    The client gets the received bytes unchanged; the event is looked for in
    the decoded ones, so a gzip, br or zstd stream is not held back until
    FIRST_EVENT_LIMIT and its error event still fails over. Reading also
    stops at EOF and where the bytes stop decoding (corrupt, or a bomb);
    what decoded until then is the event.
    """
    plain = bytearray()
    decoder = Decoder(response.headers.get("Content-Encoding", ""))
    if received:
        plain += decoder.feed(received) or b""
        if b"\n\n" in plain or b"\r\n\r\n" in plain or b"\r\r" in plain:
            return received, bytes(plain)
    received = bytearray(received)
    while len(received) < FIRST_EVENT_LIMIT:
        data = _read_some(response, timer)
        if not data:  # EOF: the decoder may still hold the few bytes it was sniffing
            plain += decoder.end() or b""
            break
        received += data
        more = decoder.feed(data)
        if more is None:
            break
        plain += more
        if b"\n\n" in plain or b"\r\n\r\n" in plain or b"\r\r" in plain:
            break
    return bytes(received), bytes(plain)


def _known_empty(method: str, status: int, response: requests.Response) -> bool:
    return (
        method == "HEAD"
        or status in (204, 304)
        or 100 <= status < 200
        or response.headers.get("Content-Length") == "0"
    )


def _is_event_stream(response: requests.Response) -> bool:
    return response.headers.get("Content-Type", "").lower().startswith("text/event-stream")


def send(session: requests.Session, request: UpstreamRequest, body: Payload, idle_timeout: float) -> Ready:
    """Run one attempt up to the commit point. Raises :class:`NetworkFailure`.

    ``body`` is :meth:`clipal.body.Body.payload`: bytes, a file reader, or a
    :class:`~clipal.body.Replay` that reads the client as it is sent. What
    reading the client raises (:class:`~clipal.clientwatch.ClientGone`, the
    server's refusal of the body, :class:`~clipal.body.NoRoomForBody`)
    passes through unchanged, never as a NetworkFailure: it is not the
    provider's. urllib3 then closes the half-sent connection rather than
    pooling it (transport.prepare).

    The caller owns the returned response and must close it on every path.
    """
    connect = min(CONNECT_TIMEOUT, idle_timeout) if idle_timeout else CONNECT_TIMEOUT
    timer = IdleTimer(idle_timeout)  # stopped after each wait; the Ready closes it, or it goes with the attempt
    try:
        adapter = session.get_adapter(request.url)
        prepared = prepare(request, _ClientPaced(body, timer) if isinstance(body, Replay) else body)
        with timer:
            response = adapter.send(prepared, stream=True, timeout=(connect, None),
                                    proxies=proxies_for(request.url))
    except UpstreamIdle:
        raise NetworkFailure(f"no response headers within {format_duration(idle_timeout)}", Kind.TIMEOUT) from None
    except requests.exceptions.ConnectTimeout:
        raise NetworkFailure("connect timeout") from None
    except requests.exceptions.ConnectionError as exc:
        if any(getattr(error, "errno", None) in NO_FILE_DESCRIPTORS for error in causes(exc)):
            raise OutOfFileDescriptors(describe_error(exc)) from None  # clipal's shortage, not the provider's
        raise NetworkFailure(refused_head(exc) or f"connection failed: {describe_error(exc)}") from None
    except requests.exceptions.RequestException as exc:
        raise NetworkFailure(f"request failed: {describe_error(exc)}") from None

    try:
        return _to_commit_point(request.method, response, timer, idle_timeout)
    except BaseException:
        response.close()
        raise


def _to_commit_point(method: str, response: requests.Response, timer: IdleTimer, idle_timeout: float) -> Ready:
    status = response.status_code
    event: bytes | None = None
    try:
        if status in FAILOVER_STATUSES:  # the verdict may depend on the body or its retry hint
            first = _read_up_to(response, ERROR_BODY_LIMIT, timer)
        elif _known_empty(method, status, response):
            first = b""
        elif 200 <= status < 300 and _is_event_stream(response):
            first, event = _read_first_event(response, timer)
        else:
            first = _read_some(response, timer)
            if 200 <= status < 300 and first and looks_like_sse(
                    response.headers.get("Content-Type", ""),
                    decoded(first, response.headers.get("Content-Encoding", "")) or first):
                # An event stream under another Content-Type: its first event is judged all the same.
                first, event = _read_first_event(response, timer, first)
    except UpstreamIdle:
        raise NetworkFailure(f"no body bytes within {format_duration(idle_timeout)} (HTTP {status})",
                             Kind.TIMEOUT) from None
    except (requests.exceptions.RequestException, OSError, urllib3.exceptions.HTTPError) as exc:
        raise NetworkFailure(f"connection broke before the body (HTTP {status}): {describe_error(exc)}") from None

    headers = end_to_end(list(response.raw.headers.items()))
    return Ready(status=status, reason=response.reason or "", headers=headers, upstream_headers=response.headers,
                 first=first, event=event, response=response, timer=timer)


def stream_rest(ready: Ready) -> Iterator[bytes]:
    """The rest of the body, chunk by chunk as it arrives.

    Raises :class:`UpstreamIdle` on a stall and ``OSError``/urllib3 errors
    when the upstream breaks; on a clean end the connection goes back to the
    pool for reuse.
    """
    response, timer = ready.response, ready.timer
    read1 = body_reader(response)
    while True:
        with timer:  # each wait gets the whole idle timeout, never what the last one left
            data = read1(READ_SIZE)
        if not data:
            response.raw.release_conn()
            return
        yield data
