"""clipal.body: request bodies in memory within a shared budget, else in a temporary file; never kept on failure.

tests/test_live_bodies.py checks the same through a real clipal (temporary
files seen in /proc, the failover replay on real sockets).
"""

from __future__ import annotations

import errno
import io
import os
import tempfile
from pathlib import Path

import pytest
import requests
import responses

from clipal import body as body_module
from clipal.app import create_app
from clipal.body import ArrivingBody, Body, BodyTooLarge, MemoryBudget, NoRoomForBody, read_body, start_body
from clipal.clientwatch import ClientGone
from clipal.config import load_config
from conftest import write_config


class Trickle:
    """A WSGI input that hands out at most ``piece`` bytes per read, then fails or ends."""

    def __init__(self, data: bytes, piece: int = 1000, error: OSError | None = None) -> None:
        self._data = io.BytesIO(data)
        self._piece = piece
        self._error = error

    def read(self, size: int = -1) -> bytes:
        got = self._data.read(min(size, self._piece) if size >= 0 else self._piece)
        if not got and self._error is not None:
            raise self._error
        return got


def announced(data: bytes, **trickle) -> dict:
    return {"wsgi.input": Trickle(data, **trickle), "CONTENT_LENGTH": str(len(data))}


def chunked(data: bytes, **trickle) -> dict:
    return {"wsgi.input": Trickle(data, **trickle), "HTTP_TRANSFER_ENCODING": "chunked"}


def files_open_under(directory: Path) -> list[str]:
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue  # the listing's own descriptor, closed by now
        if target.startswith(str(directory) + "/"):
            found.append(target)
    return found


def read_all(body: Body) -> bytes:
    payload = body.payload()
    if isinstance(payload, bytes):
        return payload
    pieces = []
    while piece := payload.read(777):
        pieces.append(piece)
    return b"".join(pieces)


def test_a_body_that_fits_is_held_in_memory_and_its_share_given_back_once():
    budget = MemoryBudget(10_000)
    data = os.urandom(6000)
    body = read_body(announced(data), 1 << 20, budget=budget)
    assert body.data == data and not body.in_file and budget.in_use == 6000
    assert body.payload() is body.data
    body.close()
    body.close()
    assert budget.in_use == 0


def test_a_body_that_does_not_fit_goes_to_a_file_and_every_reader_starts_at_the_beginning():
    budget = MemoryBudget(10_000)
    held = read_body(announced(b"h" * 6000), 1 << 20, budget=budget)
    data = os.urandom(6000)
    body = read_body(announced(data, piece=999), 1 << 20, budget=budget)
    assert body.in_file and body.data is None and budget.in_use == 6000  # only the first one's share
    first, second = body.payload(), body.payload()
    assert len(first) == len(second) == 6000 and bool(first)  # what forward uses for Content-Length
    assert first.read(100) == data[:100]
    assert read_all(body) == data  # a second attempt: from the start, whatever the first one read
    assert first.read() == data[100:]
    assert io.BufferedReader(body.payload()).read() == data
    body.close()
    with pytest.raises(ValueError):
        body.payload()
    held.close()
    assert budget.in_use == 0


def test_the_file_is_unnamed_and_gone_once_closed(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    body = read_body(announced(b"x" * 5000), 1 << 20, budget=MemoryBudget(100))
    reader = body.payload()
    assert len(files_open_under(tmp_path)) == 1
    assert os.listdir(tmp_path) == []
    body.close()
    assert files_open_under(tmp_path) == []
    with pytest.raises(ValueError):  # an attempt still holding a reader reads nothing else
        reader.read(10)


def test_a_chunked_body_reserves_as_it_grows_and_moves_to_a_file_when_it_no_longer_fits():
    budget = MemoryBudget(200_000)
    small = os.urandom(150_000)
    body = read_body(chunked(small, piece=30_000), 1 << 20, budget=budget)
    assert body.data == small and budget.in_use == 150_000
    data = os.urandom(300_000)
    spilled = read_body(chunked(data, piece=30_000), 1 << 20, budget=budget)
    assert spilled.in_file and spilled.length == 300_000 and read_all(spilled) == data
    assert budget.in_use == 150_000  # what the second body held before moving is given back
    spilled.close()
    body.close()
    assert budget.in_use == 0


@pytest.mark.parametrize("budget_size", [1 << 20, 1000])  # over the limit in memory, or in its file
def test_a_chunked_body_over_the_limit_keeps_nothing(budget_size):
    budget = MemoryBudget(budget_size)
    with pytest.raises(BodyTooLarge):
        read_body(chunked(os.urandom(300_000), piece=65536), 200_000, budget=budget)
    assert budget.in_use == 0


def test_an_announced_body_over_the_limit_is_refused_before_reading():
    stream = Trickle(b"x" * 10)
    with pytest.raises(BodyTooLarge):
        read_body({"wsgi.input": stream, "CONTENT_LENGTH": "1000"}, 999, budget=MemoryBudget(10_000))
    assert stream.read(10) == b"x" * 10  # nothing read


@pytest.mark.parametrize("budget_size", [1 << 20, 100])
@pytest.mark.parametrize("error", [None, OSError("unexpected end of file while reading request")])
def test_a_client_gone_mid_body_keeps_nothing(budget_size, error):
    budget = MemoryBudget(budget_size)
    environ = {"wsgi.input": Trickle(b"x" * 3000, error=error), "CONTENT_LENGTH": "5000"}
    with pytest.raises(ClientGone):
        read_body(environ, 1 << 20, budget=budget)
    assert budget.in_use == 0
    with pytest.raises(ClientGone):
        read_body(chunked(b"x" * 3000, error=OSError("reset")), 1 << 20, budget=budget)
    assert budget.in_use == 0


def test_no_room_for_a_temporary_file_is_its_own_error(monkeypatch):
    def full(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tempfile, "TemporaryFile", full)
    budget = MemoryBudget(100)
    with pytest.raises(NoRoomForBody, match="No space left"):
        read_body(announced(b"x" * 5000), 1 << 20, budget=budget)
    with pytest.raises(NoRoomForBody):
        read_body(chunked(b"x" * 5000, piece=60), 1 << 20, budget=budget)
    assert budget.in_use == 0


def test_no_body_and_empty_bodies_hold_nothing():
    budget = MemoryBudget(10)
    for environ in ({"wsgi.input": Trickle(b"")}, announced(b""), chunked(b"")):
        body = read_body(environ, 100, budget=budget)
        assert body.data == b"" and body.length == 0
        body.close()
    assert budget.in_use == 0


# --- through the app, upstreams mocked ------------------------------------------------------

A = "https://a.example"
B = "https://b.example"
PROVIDERS = [{"name": "A", "base_url": A, "api_key": "sk-test-provider-a-0123456789"},
             {"name": "B", "base_url": B, "api_key": "sk-test-provider-b-0123456789"}]


@pytest.fixture
def temp_dir(tmp_path) -> Path:
    path = tmp_path / "tmp"
    path.mkdir()
    return path


@pytest.fixture
def small_budget(monkeypatch, temp_dir) -> MemoryBudget:
    budget = MemoryBudget(4096)
    monkeypatch.setattr(body_module, "BUDGET", budget)
    monkeypatch.setattr(tempfile, "tempdir", str(temp_dir))
    return budget


@pytest.fixture
def app_client(tmp_path: Path):
    write_config(tmp_path, settings={"log_stdout": False, "max_request_body_bytes": 100_000},
                 claudecode=PROVIDERS)
    return create_app(config=load_config(tmp_path), watch=False).test_client()


@pytest.mark.parametrize("size", [1000, 50_000])  # in memory, and in a temporary file
@responses.activate
def test_the_failover_replays_the_same_bytes_and_the_body_is_let_go_when_the_response_ends(
        app_client, small_budget, temp_dir, size):
    received: list[bytes] = []

    def record(status: int):
        def callback(request):
            body = request.body
            received.append(body if isinstance(body, bytes) else body.read())
            return status, {}, b'{"type": "message"}'
        return callback

    responses.add_callback(responses.POST, f"{A}/v1/messages", callback=record(503))
    responses.add_callback(responses.POST, f"{B}/v1/messages", callback=record(200))
    data = os.urandom(size)
    r = app_client.post("/claudecode/v1/messages", data=data, buffered=False)
    assert r.status_code == 200 and r.headers["X-Clipal-Provider"] == "B"
    assert received == [data, data]
    assert [call.request.headers["Content-Length"] for call in responses.calls] == [str(size)] * 2
    # Held while the response is relayed (the upstream response still refers to it) ...
    assert (small_budget.in_use, len(files_open_under(temp_dir))) == ((size, 0) if size < 4096 else (0, 1))
    r.close()  # ... and let go when the server closes the response
    assert (small_budget.in_use, files_open_under(temp_dir)) == (0, [])


@responses.activate
def test_every_ending_gives_the_budget_back(app_client, small_budget):
    responses.post(f"{A}/v1/messages", status=503)
    responses.post(f"{B}/v1/messages", status=502)
    assert app_client.post("/claudecode/v1/messages", data=b"x" * 3000).status_code == 503  # all failed
    assert app_client.post("/claudecode/v1/messages", data=b"x" * 100_001).status_code == 413
    responses.replace(responses.POST, f"{A}/v1/messages", body=requests.ConnectionError("reset"))
    assert app_client.post("/claudecode/v1/messages", data=b"x" * 3000).status_code == 503  # failed over
    responses.replace(responses.POST, f"{A}/v1/messages", body=RuntimeError("a bug"))
    assert app_client.post("/claudecode/v1/messages", data=b"x" * 3000).status_code == 500  # clipal's own
    assert small_budget.in_use == 0


# --- a long announced body, forwarded while it arrives --------------------------------------

LONG = body_module.STREAM_THRESHOLD + 200_000


def test_a_short_or_chunked_body_is_still_read_whole():
    budget = MemoryBudget(1 << 22)
    short = os.urandom(body_module.STREAM_THRESHOLD)
    for environ in (announced(short), chunked(os.urandom(LONG))):
        body = start_body(environ, 1 << 22, budget=budget)
        assert type(body) is Body and body.complete and isinstance(body.payload(), bytes)
        body.close()
    assert budget.in_use == 0


@pytest.mark.parametrize("budget_size", [1 << 22, 1000])  # in memory, or in its temporary file
def test_a_long_body_is_kept_as_it_is_read_and_every_replay_sends_it_all(budget_size, tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    budget = MemoryBudget(budget_size)
    data = os.urandom(LONG)
    stream = Trickle(data, piece=40_000)
    body = start_body({"wsgi.input": stream, "CONTENT_LENGTH": str(LONG)}, 1 << 22, budget=budget)
    assert isinstance(body, ArrivingBody) and not body.complete and body.received == 0  # nothing read yet
    in_memory = budget_size > LONG
    assert (budget.in_use, body.in_file, len(files_open_under(tmp_path))) == \
        ((LONG, False, 0) if in_memory else (0, True, 1))  # reserved, or its file opened, before any read
    arrived: list[int] = []
    body.when_arrived(lambda: arrived.append(body.received))

    first = body.payload()
    assert len(first) == LONG and bool(first)  # what transport.prepare frames the request by
    pieces = iter(first)
    sent = next(pieces) + next(pieces)  # an attempt that fails after two pieces
    assert sent == data[:80_000] and body.received == 80_000 and arrived == []

    assert b"".join(body.payload()) == data  # the replay: what arrived, then the rest from the client
    assert body.complete and arrived == [LONG]
    assert b"".join(body.payload()) == data  # and again, from what is kept alone
    body.when_arrived(lambda: arrived.append(-1))  # already arrived: called at once
    assert arrived == [LONG, -1]
    body.close()
    body.close()
    assert budget.in_use == 0 and files_open_under(tmp_path) == [] and os.listdir(tmp_path) == []
    with pytest.raises(ValueError):
        body.payload()
    with pytest.raises(ValueError):  # an attempt still holding a replay reads nothing else
        list(pieces)


@pytest.mark.parametrize("budget_size", [1 << 22, 1000])
@pytest.mark.parametrize("error", [None, OSError("unexpected end of file while reading request")])
def test_a_client_gone_mid_body_raises_client_gone_from_the_replay(budget_size, error):
    budget = MemoryBudget(budget_size)
    environ = {"wsgi.input": Trickle(os.urandom(100_000), error=error), "CONTENT_LENGTH": str(LONG)}
    body = start_body(environ, 1 << 22, budget=budget)
    with pytest.raises(ClientGone):
        list(body.payload())
    assert not body.complete
    body.close()
    assert budget.in_use == 0


def test_a_long_announced_body_over_the_limit_or_without_room_is_refused_before_reading(monkeypatch):
    stream = Trickle(b"x" * 10)
    with pytest.raises(BodyTooLarge):
        start_body({"wsgi.input": stream, "CONTENT_LENGTH": str(LONG)}, LONG - 1, budget=MemoryBudget(1 << 22))
    assert stream.read(10) == b"x" * 10  # nothing read

    def full(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tempfile, "TemporaryFile", full)
    budget = MemoryBudget(100)
    with pytest.raises(NoRoomForBody):
        start_body(announced(os.urandom(LONG)), 1 << 22, budget=budget)
    assert budget.in_use == 0
