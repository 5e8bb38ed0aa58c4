"""Request bodies: read once, replayed byte-identical on every attempt, memory bounded.

Every attempt sends the whole request body again from its start, so clipal
holds it until the response is committed. Held as bytes, fifty 20 MiB uploads
at once would cost a gigabyte of RAM; so bodies in memory, across all the
requests in flight, share one budget (:data:`BUDGET`, 256 MiB). A body that
does not fit goes to a temporary file instead: unnamed (``O_TMPFILE`` where
the OS has it) under the system temp dir, so it disappears when it is closed,
and even a killed process leaves nothing behind. An ordinary agent request
(tens of KB to a few MB) fits and never touches the disk.

A body whose length is announced (Content-Length) reserves all of it before
the first byte is read, so the budget is never exceeded, not even while slow
clients are still sending. A chunked body reserves as it grows, and moves to a
file at the point where it no longer fits.

:meth:`Body.close` gives the share back (or closes the file); it is
idempotent, and the caller closes every body on every path.

A long announced body (:func:`start_body`) is not read before the first
attempt starts: :class:`ArrivingBody` reads it from the client as that attempt
sends it, keeping every piece (in memory or in its file, by the same rules)
so a later attempt replays it whole; what has not arrived by then is read
from the client as the replay reaches it.

Nothing here touches the network: the body is read from the WSGI input the
server gives.
"""

from __future__ import annotations

import io
import os
import tempfile
import threading
from typing import BinaryIO, Callable, Iterator

from .clientwatch import ClientGone

__all__ = ["BUDGET", "ArrivingBody", "Body", "BodyReader", "BodyTooLarge", "MemoryBudget", "NoRoomForBody",
           "Payload", "Replay", "read_body", "start_body"]

#: Bytes read from the client at a time once a body goes to a file, has no announced length, or is
#: forwarded as it arrives (each read is forwarded as soon as it is complete).
READ_SIZE = 64 * 1024
#: An announced body longer than this is forwarded while it arrives. A shorter one is on the socket
#: whole by the time the app runs (one TCP window or so), is sent with the request headers in one
#: write (transport.COALESCE_LIMIT), and would gain nothing.
STREAM_THRESHOLD = 64 * 1024
#: The total of request bodies held in memory at once; the process's share of RAM for them.
MEMORY_BUDGET = 256 * 1024 * 1024
#: For tests only: a smaller budget, so that a test can push bodies to files with small uploads.
_TEST_BUDGET_VARIABLE = "CLIPAL_TEST_BODY_MEMORY_BUDGET"


class BodyTooLarge(Exception):
    """The body is larger than max_request_body_bytes."""


class MemoryBudget:
    """Bytes of request bodies held in memory, against a limit shared by every request.

    Reservations are all-or-nothing, so a body either fits whole or goes to a
    file, and the total never passes the limit. A plain lock: uncontended
    under gevent (it is cooperative once patched), correct with threads.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_use = 0
        self._lock = threading.Lock()

    def reserve(self, size: int) -> bool:
        with self._lock:
            if self.in_use + size > self.limit:
                return False
            self.in_use += size
            return True

    def release(self, size: int) -> None:
        with self._lock:
            self.in_use -= size


def _budget_from_environment() -> MemoryBudget:
    value = os.environ.get(_TEST_BUDGET_VARIABLE, "")
    return MemoryBudget(int(value) if value.isdigit() else MEMORY_BUDGET)


#: The process's budget. Each gunicorn worker is a process of its own, with its own budget.
BUDGET = _budget_from_environment()


class BodyReader(io.RawIOBase):
    """One attempt's reading of a body held in a file: from its start, at its own position.

    ``len()`` is the body's whole length, so code written for a ``bytes``
    body (``if body:``, ``len(body)`` for Content-Length) works unchanged.
    It reads with ``pread`` and never closes the file: that is the
    :class:`Body`'s to do, and attempts never share a file position. Once
    the body is closed, reading raises ValueError (never another file that
    got the same descriptor number).
    """

    def __init__(self, file: BinaryIO, length: int) -> None:
        super().__init__()
        self._file = file
        self._length = length
        self._position = 0

    def __len__(self) -> int:
        return self._length

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: self._length}[whence]
        self._position = max(0, base + offset)
        return self._position

    def read(self, size: int = -1) -> bytes:
        # urllib3 sends a file body by calling read(blocksize) until b"": the
        # bytes pread returns go out as they are, with no copy into a buffer.
        left = self._length - self._position
        wanted = left if size is None or size < 0 else min(size, left)
        if wanted <= 0:
            return b""
        data = os.pread(self._file.fileno(), wanted, self._position)
        self._position += len(data)
        return data

    def readinto(self, buffer) -> int:  # type: ignore[override]  # any writable buffer, as RawIOBase's
        view = memoryview(buffer).cast("B")
        data = self.read(len(view))
        view[:len(data)] = data
        return len(data)


class Body:
    """A request body read once: in memory (``data``) or in a temporary file (``data`` is None)."""

    def __init__(self, data: bytes | None, length: int, *, budget: MemoryBudget | None = None,
                 file: BinaryIO | None = None) -> None:
        self.data = data
        self.length = length
        self._budget = budget  # set while this body holds a share of it
        self._file = file

    @property
    def in_file(self) -> bool:
        return self._file is not None

    @property
    def complete(self) -> bool:
        """Whether all of the body has been read from the client (always, for a body read whole)."""
        return True

    def when_arrived(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` once the client has sent all of the body: now, for a body read whole."""
        callback()

    def payload(self) -> Payload:
        """What one attempt sends: the bytes, or a reader from the start of the file."""
        if self.data is not None:
            return self.data
        if self._file is None:
            raise ValueError("the request body was closed")
        return BodyReader(self._file, self.length)

    def close(self) -> None:
        """Give back the memory share, or close (and so delete) the file. Idempotent."""
        budget, self._budget = self._budget, None
        if budget is not None:
            budget.release(self.length)
        file, self._file = self._file, None
        if file is not None:
            file.close()

    def __enter__(self) -> "Body":
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


class ArrivingBody(Body):
    """An announced body forwarded while the client is still sending it.

    Whoever iterates a :class:`Replay` reads the client: every piece read is
    kept (in memory within the share reserved for the whole length, or
    appended to the file) before it is handed on, so a later attempt sends
    the same bytes from the start. Attempts run one after another in the
    request's greenlet, so only one ever reads the client at a time. The
    client's EOF before the announced length raises :class:`ClientGone`.
    """

    def __init__(self, read: Callable[[int], bytes], length: int, *, budget: MemoryBudget | None = None,
                 spool: _Spool | None = None) -> None:
        super().__init__(None, length, budget=budget, file=spool.file if spool is not None else None)
        self.received = 0
        self._read: Callable[[int], bytes] | None = read
        self._spool = spool
        self._pieces: list[bytes] = []  # in memory: the pieces as read, never joined (no second copy)
        self._arrived: list[Callable[[], None]] = []

    @property
    def complete(self) -> bool:
        return self.received == self.length

    def when_arrived(self, callback: Callable[[], None]) -> None:
        if self.complete:
            callback()
        else:
            self._arrived.append(callback)

    def payload(self) -> Replay:
        if self._read is None:
            raise ValueError("the request body was closed")
        return Replay(self)

    def kept(self, index: int, position: int) -> bytes:
        """Piece ``index`` (in memory) or the bytes at ``position`` (in the file), of what has arrived."""
        if self._read is None:
            raise ValueError("the request body was closed")
        if self._spool is None:
            return self._pieces[index]
        return os.pread(self._spool.file.fileno(), min(READ_SIZE, self.received - position), position)

    def pull(self) -> bytes:
        """The next piece from the client, kept before it is returned."""
        read = self._read
        if read is None:
            raise ValueError("the request body was closed")
        data = read(min(READ_SIZE, self.length - self.received))
        if not data:
            raise ClientGone()
        if self._spool is None:
            self._pieces.append(data)
        else:
            self._spool.write(data)
            self._spool.flush()  # read back with pread, below the file object's buffer
        self.received += len(data)
        if self.complete:
            callbacks, self._arrived = self._arrived, []
            for callback in callbacks:
                callback()
        return data

    def close(self) -> None:
        self._read = None
        self._pieces = []
        self._arrived = []
        super().close()


class Replay:
    """One attempt's sending of an :class:`ArrivingBody`: from its start, reading the client past what arrived.

    An iterable of pieces, with no ``read`` and no buffer interface, so
    urllib3 sends each piece as it comes (see :func:`clipal.transport.prepare`);
    ``len()`` is the announced length, which frames the upstream request.
    """

    def __init__(self, body: ArrivingBody) -> None:
        self._body = body

    def __len__(self) -> int:
        return self._body.length

    def __iter__(self) -> Iterator[bytes]:
        body = self._body
        position = index = 0
        while position < body.length:
            piece = body.kept(index, position) if position < body.received else body.pull()
            position += len(piece)
            index += 1
            yield piece


#: What one attempt sends, as :meth:`Body.payload` gives it.
Payload = bytes | BodyReader | Replay


class NoRoomForBody(Exception):
    """The body did not fit the memory budget, and no temporary file could hold it."""

    def __init__(self, error: OSError) -> None:
        super().__init__(error.strerror or str(error))


class _Spool:
    """A temporary file being filled with a body; :class:`NoRoomForBody` when the disk says no."""

    def __init__(self) -> None:
        try:
            self.file: BinaryIO = tempfile.TemporaryFile()  # type: ignore[assignment]
        except OSError as error:
            raise NoRoomForBody(error) from None
        self.size = 0

    def write(self, data: bytes | memoryview) -> None:
        try:
            self.file.write(data)
        except OSError as error:
            raise NoRoomForBody(error) from None
        self.size += len(data)

    def flush(self) -> None:
        try:
            self.file.flush()  # read back with pread, below the file object's buffer
        except OSError as error:
            raise NoRoomForBody(error) from None

    def finish(self) -> Body:
        self.flush()
        return Body(None, self.size, file=self.file)

    def discard(self) -> None:
        self.file.close()


def _reader(stream) -> Callable[[int], bytes]:
    """``stream.read``, with a broken client connection reported as :class:`ClientGone`."""

    def read(size: int) -> bytes:
        try:
            return stream.read(size)
        except OSError:  # gevent's input says "unexpected end of file", gunicorn's a reset
            raise ClientGone() from None

    return read


def _announced_length(environ: dict, limit: int) -> int | None:
    """The Content-Length, None without a usable one; :class:`BodyTooLarge` past ``limit``, before any read."""
    length_header = environ.get("CONTENT_LENGTH")
    if not length_header:
        return None
    try:
        length = int(length_header)
    except ValueError:
        return None
    if length > limit:
        raise BodyTooLarge()
    return length if length >= 0 else None


def read_body(environ: dict, limit: int, *, budget: MemoryBudget | None = None) -> Body:
    """The whole request body, read once.

    Raises :class:`BodyTooLarge` past ``limit``, :class:`ClientGone` when the
    client leaves before sending all of it, and :class:`NoRoomForBody` when a
    body that needs a temporary file cannot have one; in every case nothing
    of it is kept.
    """
    budget = budget or BUDGET
    read = _reader(environ["wsgi.input"])
    length = _announced_length(environ, limit)
    if length == 0:
        return Body(b"", 0)
    if length is not None:
        return _read_announced(read, length, budget)
    if "chunked" not in environ.get("HTTP_TRANSFER_ENCODING", "").lower():
        return Body(b"", 0)
    return _read_chunked(read, limit, budget)


def start_body(environ: dict, limit: int, *, budget: MemoryBudget | None = None) -> Body:
    """The request body as the attempts take it: read whole, or a long announced one still arriving.

    A body over :data:`STREAM_THRESHOLD` with a Content-Length becomes an
    :class:`ArrivingBody` without reading a byte (so ``Expect: 100-continue``
    is still answered when the first attempt starts sending it): its whole
    length is reserved from the budget now, or its temporary file opened
    now, exactly as :func:`read_body` would. A chunked body is read whole as
    before: its length is only known at its end, and the upstream request
    is framed by that length. The errors are :func:`read_body`'s.
    """
    length = _announced_length(environ, limit)
    if length is None or length <= STREAM_THRESHOLD:
        return read_body(environ, limit, budget=budget)
    budget = budget or BUDGET
    read = _reader(environ["wsgi.input"])
    if budget.reserve(length):
        return ArrivingBody(read, length, budget=budget)
    return ArrivingBody(read, length, spool=_Spool())


def _read_announced(read: Callable[[int], bytes], length: int, budget: MemoryBudget) -> Body:
    if budget.reserve(length):
        try:
            data = read(length)  # one allocation of the whole body; a short read is the client's EOF
            if len(data) < length:
                parts, got = [data], len(data)
                while got < length:
                    more = read(length - got)
                    if not more:
                        raise ClientGone()
                    parts.append(more)
                    got += len(more)
                data = b"".join(parts)
        except BaseException:
            budget.release(length)
            raise
        return Body(data, length, budget=budget)
    spool = _Spool()
    try:
        while spool.size < length:
            more = read(min(READ_SIZE, length - spool.size))
            if not more:
                raise ClientGone()
            spool.write(more)
        return spool.finish()
    except BaseException:
        spool.discard()
        raise


def _read_chunked(read: Callable[[int], bytes], limit: int, budget: MemoryBudget) -> Body:
    memory = io.BytesIO()  # getvalue() hands over its buffer without a copy
    spool: _Spool | None = None
    try:
        while more := read(READ_SIZE):
            if (spool.size if spool else memory.tell()) + len(more) > limit:
                raise BodyTooLarge()
            if spool is None and budget.reserve(len(more)):
                memory.write(more)
                continue
            if spool is None:  # it no longer fits: what is held in memory moves to the file
                spool = _Spool()
                spool.write(memory.getbuffer())
                budget.release(memory.tell())
                memory = io.BytesIO()
            spool.write(more)
        if spool is not None:
            return spool.finish()
    except BaseException:
        budget.release(memory.tell())
        if spool is not None:
            spool.discard()
        raise
    size = memory.tell()
    return Body(memory.getvalue(), size, budget=budget if size else None)
