"""clipal.headerparse gives exactly what http.client.parse_headers gives (issue 6).

The fast path must be invisible: for every header block, plain or odd, the
message object (class, header list, payload, defects) and the errors raised
are the ones of the standard library's email-based parser.
"""

from __future__ import annotations

import http.client
import io
import random

import pytest
from gevent.pywsgi import OldMessage

from clipal import headerparse

PLAIN = (b"Content-Type: application/json\r\nContent-Length: 353\r\nX-Empty:\r\nX-Spaces: \t a b  \r\n"
         b"Set-Cookie: a=1\r\nSet-Cookie: b=2\r\nauthorization: Bearer sk-x\r\n\r\n")

ODD = [
    b"\r\n",
    b"\n",
    b"",
    b"A: 1\n B: folded\r\n\r\n",            # continuation line
    b"A: 1\r\n\tfolded\r\n\r\n",
    b"A: 1\r\nno colon here\r\nB: 2\r\n\r\n",  # not a header line: the rest becomes the body
    b"Bad Name: 1\r\n\r\n",
    b": empty name\r\nB: 2\r\n\r\n",
    b"From me@example.com\r\nA: 1\r\n\r\n",
    b"A: 1\rB: 2\r\n\r\n",                   # bare CR
    b"A: 1\r\nB: 2\r\n",                     # no blank line (EOF)
    b"Content-Type: multipart/form-data; boundary=x\r\n\r\n",
    b"content-type: Message/rfc822\r\n\r\n",
    b"Content-Type: text/event-stream; charset=utf-8\r\nCache-Control: no-cache\r\n\r\n",
    "X-Latin: caf\u00e9\r\n\r\n".encode("latin-1"),
    b"A:1\r\nA :2\r\n\r\n",
    b"A: 1\nB: 2\n\n",
]


def snapshot(message) -> tuple:
    state = dict(vars(message))
    state["defects"] = [type(d) for d in state.get("defects", [])]
    payload = state.get("_payload")
    if isinstance(payload, list):
        state["_payload"] = [snapshot(m) for m in payload]
    return type(message), state


def both(block: bytes, cls=http.client.HTTPMessage):
    expected = http.client.parse_headers(io.BytesIO(block + b"BODY"), _class=cls)
    got_fp = io.BytesIO(block + b"BODY")
    got = headerparse.parse_headers(got_fp, _class=cls)
    return snapshot(expected), snapshot(got), got_fp.read()


@pytest.mark.parametrize("block", [PLAIN] + ODD)
@pytest.mark.parametrize("cls", [http.client.HTTPMessage, OldMessage])
def test_same_message_as_http_client(block, cls):
    expected, got, rest = both(block, cls)
    assert got == expected
    if block.endswith(b"\n\n") or block.endswith(b"\r\n\r\n") or block in (b"\r\n", b"\n"):
        assert rest == b"BODY"  # reads exactly the header block, not into the body


def random_line(rng: random.Random) -> bytes:
    """Mostly header-like lines, with now and then the things the fast path must hand over."""
    name_chars = [b"A", b"b", b"-", b"x", b"1", b"_"] + [b" ", b"\t", b"{", b"\xe9", b"\r"] * (rng.random() < 0.2)
    value_chars = [b"v", b" ", b"\t", b":", b"/", b";", b"=", b"\xe9"] + [b"\r"] * (rng.random() < 0.1)
    name = b"".join(rng.choice(name_chars) for _ in range(rng.randint(0, 8)))
    sep = b":" if rng.random() < 0.9 else b""
    value = b"".join(rng.choice(value_chars) for _ in range(rng.randint(0, 10)))
    if rng.random() < 0.05:
        value = b" multipart/mixed" if rng.random() < 0.5 else b"message/http"
        name = b"Content-Type"
    return name + sep + value + rng.choice([b"\r\n", b"\n"])


def test_random_header_blocks_match():
    rng = random.Random(6)
    fast = 0
    for _ in range(3000):
        lines = [random_line(rng) for _ in range(rng.randint(0, 6))]
        block = b"".join(lines) + rng.choice([b"\r\n", b"\r\n", b"\n", b""])
        expected, got, _ = both(block)
        assert got == expected, block
        fast += lines != [] and headerparse._simple_message(
            http.client._read_headers(io.BytesIO(block)), http.client.HTTPMessage) is not None
    assert fast > 300  # the fast path itself was exercised, not only the fallback


def test_limits_raise_like_http_client():
    too_long = b"A: " + b"x" * 70000 + b"\r\n\r\n"
    with pytest.raises(http.client.LineTooLong):
        headerparse.parse_headers(io.BytesIO(too_long))
    too_many = b"".join(b"H%d: v\r\n" % i for i in range(101)) + b"\r\n"
    with pytest.raises(http.client.HTTPException, match="more than 100 headers"):
        headerparse.parse_headers(io.BytesIO(too_many))


def test_response_class_reads_status_and_headers():
    raw = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"

    class FakeSocket:
        def makefile(self, mode):
            return io.BytesIO(raw)

    response = headerparse.HTTPResponse(FakeSocket(), method="GET")
    response.begin()
    assert (response.status, response.reason) == (200, "OK")
    assert response.getheader("content-type") == "application/json"
    assert response.read() == b"{}"


# --- the stricter rules for upstream responses (parse_response_headers, HTTPResponse) ---


def strict(block: bytes):
    fp = io.BytesIO(block + b"BODY")
    return snapshot(headerparse.parse_response_headers(fp)), fp.read()


@pytest.mark.parametrize("block", [PLAIN] + [b for b in ODD if headerparse.forbidden_bytes(b) is None])
def test_response_headers_that_pass_the_rules_parse_as_http_client_does(block):
    expected, _, rest = both(block)
    assert strict(block) == (expected, rest)


@pytest.mark.parametrize("block,problem", [
    (b"A: 1\rB: 2\r\n\r\n", "bare CR"),
    (b"X-A: a\rSet-Cookie: evil=1\r\n\r\n", "bare CR"),
    (b"A: 1\r\r\n\r\n", "bare CR"),            # a CR before the CRLF is bare too
    (b"A: 1\r\n\r", "bare CR"),               # a blank line cut short
    (b"A: a\x00b\r\n\r\n", "NUL"),
    (b"A\x00: 1\r\n\r\n", "NUL"),
    (b"A: " + b"x" * 70_000 + b"\r\n\r\n", "over 64 KiB"),
    (b"".join(b"X-Pad-%02d: %s\r\n" % (i, b"p" * 800) for i in range(90)) + b"\r\n", "over 64 KiB"),
    (b"".join(b"H%d: v\r\n" % i for i in range(100)) + b"\r\n", "more than 100 lines"),
])
def test_response_headers_breaking_a_rule_are_refused_without_their_values(block, problem):
    with pytest.raises(headerparse.MalformedHeaderBlock) as caught:
        headerparse.parse_response_headers(io.BytesIO(block))
    assert str(caught.value) == f"upstream sent a malformed header block ({problem})"
    assert isinstance(caught.value, http.client.HTTPException)  # urllib3 closes the connection as for its own


def test_response_header_block_limit_is_64_KiB_with_the_blank_line():
    exactly = b"A: " + b"x" * (headerparse.MAX_HEADER_BLOCK - 7) + b"\r\n\r\n"
    assert len(exactly) == headerparse.MAX_HEADER_BLOCK
    expected, _, rest = both(exactly)
    assert strict(exactly) == (expected, rest)
    with pytest.raises(headerparse.MalformedHeaderBlock, match="over 64 KiB"):
        headerparse.parse_response_headers(io.BytesIO(b"A" + exactly))


def test_response_header_line_count_limit_is_http_clients():
    most = b"".join(b"H%d: v\r\n" % i for i in range(99)) + b"\r\n"  # 100 lines with the blank one
    expected, _, rest = both(most)
    assert strict(most) == (expected, rest)


def test_an_oversized_response_header_block_is_not_read_whole():
    fp = io.BytesIO(b"".join(b"X-%02d: %s\r\n" % (i, b"v" * 60_000) for i in range(99)) + b"\r\n")
    with pytest.raises(headerparse.MalformedHeaderBlock):
        headerparse.parse_response_headers(fp)
    assert fp.tell() <= headerparse.MAX_HEADER_BLOCK + 1


def test_random_response_header_blocks_parse_as_http_client_or_are_refused():
    rng = random.Random(7)
    refused = accepted = 0
    for _ in range(3000):
        block = b"".join(random_line(rng) for _ in range(rng.randint(0, 6))) + rng.choice([b"\r\n", b"\n", b""])
        if rng.random() < 0.05:
            block = block.replace(b"v", b"\x00", 1)
        if headerparse.forbidden_bytes(block) is None:
            expected, _, rest = both(block)
            assert strict(block) == (expected, rest), block
            accepted += 1
        else:
            with pytest.raises(headerparse.MalformedHeaderBlock):
                headerparse.parse_response_headers(io.BytesIO(block))
            refused += 1
    assert accepted > 2000 and refused > 100


def read_response(raw: bytes, method: str = "GET") -> headerparse.HTTPResponse:
    class FakeSocket:
        def makefile(self, mode):
            return io.BytesIO(raw)

    response = headerparse.HTTPResponse(FakeSocket(), method=method)
    response.begin()
    return response


FINAL = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}"
HINTS = b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n"


@pytest.mark.parametrize("interim", [
    HINTS, b"HTTP/1.1 100 Continue\r\n\r\n" + HINTS + HINTS, b"HTTP/1.1 102 Processing\r\n\r\n",
    HINTS * headerparse.MAX_INTERIM_RESPONSES,
])
def test_interim_responses_are_skipped(interim):
    response = read_response(interim + FINAL)
    assert (response.status, response.getheader("Link")) == (200, None)
    assert response.read() == b"{}"


def test_101_is_a_final_response():
    response = read_response(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n" + FINAL)
    assert (response.status, response.getheader("Upgrade")) == (101, "websocket")


@pytest.mark.parametrize("raw,problem", [
    (HINTS * (headerparse.MAX_INTERIM_RESPONSES + 1) + FINAL, "more than 16 interim responses"),
    (HINTS.replace(b"preload", b"preload\rSet-Cookie: evil=1") + FINAL, "bare CR"),
    (FINAL.replace(b"200 OK", b"200 OK\rSet-Cookie: evil=1"), "bare CR in the status line"),
    (FINAL.replace(b"200 OK", b"200 OK\r"), "bare CR in the status line"),
    (FINAL.replace(b"200 OK", b"200 O\x00K"), "NUL in the status line"),
])
def test_response_heads_breaking_a_rule_are_refused(raw, problem):
    with pytest.raises(headerparse.MalformedHeaderBlock, match=f"\\({problem}\\)$"):
        read_response(raw)


@pytest.mark.parametrize("status, reason, relayed", [
    (200, "OK", "OK"),
    (404, "Not\tFound", "Not\tFound"),
    (503, "Busy\x1b[2J", "Service Unavailable"),
    (599, "Custom\x07", ""),  # no standard phrase: an empty one rather than the bell
])
def test_relayable_reason(status, reason, relayed):
    assert headerparse.relayable_reason(status, reason) == relayed
