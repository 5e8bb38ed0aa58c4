"""Request bodies over the in-memory budget are held in a temporary file, replayed byte-identical.

clipal keeps the request bodies of all requests in flight in memory up to a
budget; past it, a body goes to an unnamed temporary file under the system
temp dir, removed when the request ends. The budget is set low here through
``CLIPAL_TEST_BODY_MEMORY_BUDGET`` (for tests only), and clipal's TMPDIR is a
directory of the test's own, so /proc/PID/fd shows which file is which.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest
import requests

from conftest import provider
from fakeupstream import Reply

BUDGET = 256 * 1024
PATH = "/claudecode/v1/messages"


def temp_files_open(pid: int, temp_dir: Path) -> list[str]:
    """The files under ``temp_dir`` that process ``pid`` holds open (an unlinked one ends in " (deleted)")."""
    found = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue  # closed meanwhile
        if target.startswith(str(temp_dir) + "/"):
            found.append(target)
    return found


def no_temp_files_soon(pid: int, temp_dir: Path, timeout: float = 3.0) -> bool:
    """Whether the temp files are closed within ``timeout``: the server closes the response just after
    its last bytes went out, so the client may see the end a moment before."""
    deadline = time.monotonic() + timeout
    while temp_files_open(pid, temp_dir):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


@pytest.fixture
def temp_dir(tmp_path: Path) -> Path:
    path = tmp_path / "clipal-tmp"
    path.mkdir()
    return path


def start(clipal, upstream_factory, temp_dir: Path):
    a, b = upstream_factory("A"), upstream_factory("B")
    a.default = Reply.anthropic_error(503)
    proxy = clipal(claudecode=[provider("A", a), provider("B", b)],
                   settings={"log_level": "debug", "max_request_body_bytes": 4 * BUDGET},
                   env={"CLIPAL_TEST_BODY_MEMORY_BUDGET": str(BUDGET), "TMPDIR": str(temp_dir)})
    return proxy, a, b


def send_while_b_holds(proxy, b, body: bytes | Iterator[bytes],
                       temp_dir: Path) -> tuple[requests.Response, list[str]]:
    """Send ``body`` (pieces are sent chunked); while B holds its answer, note the temp files clipal
    has open; then let B answer."""
    gate = threading.Event()
    b.script(Reply.stall(until=gate))
    result: list[requests.Response] = []
    sender = threading.Thread(target=lambda: result.append(requests.post(
        proxy.url + PATH, data=body, headers={"Content-Type": "application/octet-stream"}, timeout=20)))
    sender.start()
    try:
        b.wait_for_requests(1, timeout=10)
        during = temp_files_open(proxy.proc.pid, temp_dir)
    finally:
        gate.set()
        sender.join(20)
    return result[0], during


def test_a_body_over_the_budget_goes_to_a_temp_file_replayed_identically_and_removed(clipal, upstream_factory,
                                                                                   temp_dir):
    proxy, a, b = start(clipal, upstream_factory, temp_dir)
    body = os.urandom(BUDGET + 12345)

    response, during = send_while_b_holds(proxy, b, body, temp_dir)
    assert response.status_code == 200 and response.headers["X-Clipal-Provider"] == "B"
    assert len(during) == 1, during  # held in one temporary file while the attempts ran
    assert a.requests[0].body == body  # the first attempt, and the failover's replay, byte for byte
    assert b.requests[0].body == body
    assert a.requests[0].headers["Content-Length"] == str(len(body))
    assert no_temp_files_soon(proxy.proc.pid, temp_dir)  # gone with the request
    assert os.listdir(temp_dir) == []  # and never had a name there


def test_a_body_within_the_budget_never_touches_the_disk(clipal, upstream_factory, temp_dir):
    proxy, a, b = start(clipal, upstream_factory, temp_dir)
    body = os.urandom(BUDGET // 2)

    response, during = send_while_b_holds(proxy, b, body, temp_dir)
    assert response.status_code == 200
    assert during == []
    assert a.requests[0].body == body and b.requests[0].body == body


def test_a_chunked_body_that_outgrows_the_budget_moves_to_a_temp_file(clipal, upstream_factory, temp_dir):
    proxy, a, b = start(clipal, upstream_factory, temp_dir)
    body = os.urandom(3 * BUDGET)

    pieces = (body[start:start + 50_000] for start in range(0, len(body), 50_000))
    response, during = send_while_b_holds(proxy, b, pieces, temp_dir)
    assert response.status_code == 200
    assert a.requests[0].headers["Content-Length"] == str(len(body))  # sent framed by its length
    assert len(during) == 1
    assert a.requests[0].body == body and b.requests[0].body == body
    assert no_temp_files_soon(proxy.proc.pid, temp_dir)


def test_the_budget_comes_back_after_every_kind_of_ending(clipal, upstream_factory, temp_dir):
    # All providers failing, a 413 found while reading, a client gone mid-body:
    # afterwards a body that fits the budget is held in memory again, so none
    # of them kept its share.
    proxy, a, b = start(clipal, upstream_factory, temp_dir)
    b.default = Reply.anthropic_error(503)
    for _ in range(3):
        r = requests.post(proxy.url + PATH, data=os.urandom(BUDGET - 1000), timeout=20)
        assert r.status_code == 503  # both failed
    over = os.urandom(5 * BUDGET)
    r = requests.post(proxy.url + PATH, data=(over[i:i + 65536] for i in range(0, len(over), 65536)), timeout=20)
    assert r.status_code == 413  # chunked: found out only after it outgrew the budget and the limit
    with socket.create_connection(("127.0.0.1", proxy.port)) as sock:  # gone after half its body
        sock.sendall(f"POST {PATH} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {BUDGET - 1000}\r\n\r\n".encode()
                     + b"x" * (BUDGET // 2))
    proxy.wait_for_output("request body cut short by the client")  # the front door noticed; nothing forwarded
    assert no_temp_files_soon(proxy.proc.pid, temp_dir)
    b.default = Reply.answer()
    response, during = send_while_b_holds(proxy, b, os.urandom(BUDGET - 1000), temp_dir)
    assert response.status_code == 200 and during == []
