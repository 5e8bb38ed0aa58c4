"""The front door's rules as pure functions: framing, header hygiene, the refusal's bytes.

tests/test_live_frontdoor.py sends the same cases over real sockets to every server clipal runs on.
"""

from __future__ import annotations

import json

import pytest

from clipal.clients import CODEX
from clipal.config import Provider
from clipal.frontdoor import (MAX_HEADER_BLOCK, Refusal, environ_problem, framing_problem, header_block_problem,
                              refusal_response)
from clipal.outbound import build_upstream_request


@pytest.mark.parametrize("headers, version, expected", [
    ([("Content-Length", "42")], "HTTP/1.1", None),
    ([("content-length", " 42 ")], "HTTP/1.1", None),  # optional whitespace is not part of the value
    ([("Transfer-Encoding", "chunked")], "HTTP/1.1", None),
    ([("Transfer-Encoding", "Chunked")], "HTTP/1.1", None),  # codings are case-insensitive
    ([], "HTTP/1.1", None),
    ([("Content-Length", "42"), ("Transfer-Encoding", "chunked")], "HTTP/1.1",
     Refusal(400, "both Content-Length and Transfer-Encoding")),
    ([("Content-Length", "2"), ("Content-Length", "60")], "HTTP/1.1", Refusal(400, "more than one Content-Length")),
    ([("Content-Length", "42"), ("Content-Length", "42")], "HTTP/1.1", Refusal(400, "more than one Content-Length")),
    ([("Content-Length", "42, 42")], "HTTP/1.1", Refusal(400, "Content-Length is not a number")),
    ([("Content-Length", "+42")], "HTTP/1.1", Refusal(400, "Content-Length is not a number")),
    ([("Content-Length", "4_2")], "HTTP/1.1", Refusal(400, "Content-Length is not a number")),
    ([("Content-Length", "-1")], "HTTP/1.1", Refusal(400, "Content-Length is not a number")),
    ([("Content-Length", "\u0664\u0662")], "HTTP/1.1", Refusal(400, "Content-Length is not a number")),  # Arabic digits
    ([("Content-Length", "")], "HTTP/1.1", Refusal(400, "Content-Length is not a number")),
    ([("Transfer-Encoding", "gzip, chunked")], "HTTP/1.1", Refusal(400, "Transfer-Encoding other than chunked")),
    ([("Transfer-Encoding", "chunked, chunked")], "HTTP/1.1", Refusal(400, "Transfer-Encoding other than chunked")),
    ([("Transfer-Encoding", "chunked,")], "HTTP/1.1", Refusal(400, "Transfer-Encoding other than chunked")),
    ([("Transfer-Encoding", "identity")], "HTTP/1.1", Refusal(400, "Transfer-Encoding other than chunked")),
    ([("Transfer-Encoding", "")], "HTTP/1.1", Refusal(400, "Transfer-Encoding other than chunked")),
    ([("Transfer-Encoding", "chunked"), ("Transfer-Encoding", "chunked")], "HTTP/1.1",
     Refusal(400, "more than one Transfer-Encoding header")),
    ([("Transfer-Encoding", "foo")], "HTTP/1.1", Refusal(501, "unsupported transfer coding")),
    ([("Transfer-Encoding", "foo, chunked")], "HTTP/1.1", Refusal(501, "unsupported transfer coding")),
    ([("Transfer-Encoding", "chunked")], "HTTP/1.0", Refusal(400, "Transfer-Encoding in an HTTP/1.0 request")),
])
def test_framing_rules(headers, version, expected):
    assert framing_problem(headers, version) == expected


def lines(*header_lines: bytes) -> bytes:
    return b"".join(header_lines) + b"\r\n"


@pytest.mark.parametrize("block, expected", [
    (lines(b"Host: x\r\n", b"Content-Length: 2\r\n"), None),
    (lines(b"Host: x\n"), None),  # LF-only line ends, as http.client reads them
    (lines(b"X-Tab: a\tb\r\n", b"X-Utf8: \xc3\xa9\r\n", b"X-Empty:\r\n"), None),
    (lines(b"X-Note: first\r\n", b" folded\r\n"), "obsolete line folding in a request header"),
    (lines(b"X-Note: first\r\n", b"\tfolded\r\n"), "obsolete line folding in a request header"),
    (lines(b"X-Note: a\rX-Injected: b\r\n"), "bare CR in a request header"),
    (lines(b"X-Note: a\x00b\r\n"), "NUL in a request header"),
    (lines(b"X-Note: a\x1bb\r\n"), "control character in a request header"),
    (lines(b"X-Note: a\x7fb\r\n"), "control character in a request header"),
    (lines(b"Content-Length : 5\r\n"), "malformed request header line"),  # no space before the colon
    (lines(b"no colon here\r\n"), "malformed request header line"),
    (lines(b": no name\r\n"), "malformed request header line"),
    (lines(b"Bad\xffName: x\r\n"), "malformed request header line"),
])
def test_header_line_rules(block, expected):
    problem = header_block_problem(block)
    assert (problem.reason if problem else None) == expected
    assert problem is None or problem.status == 400


def test_a_refusal_never_repeats_the_header_value():
    secret = b"sk-live-do-not-log-0123456789"
    for block in (lines(b"Authorization: " + secret + b"\r\n", b" folded\r\n"),
                  lines(b"Authorization: " + secret + b"\x00\r\n")):
        problem = header_block_problem(block)
        assert problem is not None and secret.decode() not in problem.reason


def test_environ_rules_cover_what_another_parser_joined():
    base = {"REQUEST_METHOD": "POST", "SERVER_PROTOCOL": "HTTP/1.1", "HTTP_HOST": "x", "CONTENT_TYPE": "a/b"}
    assert environ_problem(base) is None
    assert environ_problem({**base, "HTTP_TRANSFER_ENCODING": "chunked"}) is None
    assert environ_problem({**base, "HTTP_TRANSFER_ENCODING": "gzip,chunked"}) == Refusal(
        400, "Transfer-Encoding other than chunked")
    assert environ_problem({**base, "CONTENT_LENGTH": "4_2"}) == Refusal(400, "Content-Length is not a number")
    just_under = {**base, "HTTP_X_PAD": "p" * (MAX_HEADER_BLOCK - 200)}
    assert environ_problem(just_under) is None
    over = {**base, **{f"HTTP_X_PAD_{i}": "p" * 4000 for i in range(17)}}
    problem = environ_problem(over)
    assert problem is not None and problem.status == 431


def test_the_refusal_is_a_closing_json_error_in_the_clients_shape():
    raw = refusal_response(Refusal(400, "both Content-Length and Transfer-Encoding"), "/codex/v1/responses")
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.split(b"\r\n")[0] == b"HTTP/1.1 400 Bad Request"
    assert b"\r\nConnection: close" in head and b"\r\nContent-Type: application/json" in head
    assert f"Content-Length: {len(body)}".encode() in head
    assert json.loads(body)["error"]["message"] == "clipal: both Content-Length and Transfer-Encoding"
    assert json.loads(body) == json.loads(CODEX.error_body(400, "clipal: both Content-Length and Transfer-Encoding"))
    # No client's path (or none parsed): a generic error; a prefix must be whole to count.
    for path in (None, "/other", "/codexy/v1"):
        generic = json.loads(refusal_response(Refusal(431, "too large"), path).partition(b"\r\n\r\n")[2])
        assert generic == {"error": {"type": "invalid_request_error", "message": "clipal: too large"}}
    assert refusal_response(Refusal(431, "x"), None).startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n")


def test_expect_is_never_forwarded():
    # clipal's server has met the expectation: the whole body is read before anything is forwarded.
    request = build_upstream_request(
        method="POST", path="/v1/responses", query="",
        headers=[("Expect", "100-continue"), ("Content-Type", "application/json"), ("X-Other", "kept")],
        provider=Provider(name="A", base_url="http://127.0.0.1:1", api_keys=("sk-test",)), key="sk-test",
        client=CODEX, remote_addr="127.0.0.1")
    names = [name.lower() for name, _ in request.headers]
    assert "expect" not in names and "x-other" in names
