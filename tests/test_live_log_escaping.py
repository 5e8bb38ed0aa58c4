"""Upstream text in clipal's log is escaped: a garbage status line cannot forge a line or drive a terminal.

An upstream whose status line is not HTTP makes http.client raise
BadStatusLine with the line as received, CR LF and all, and clipal logs why
the attempt failed. The line must arrive in the log as one line, with its
control characters written as escapes.
"""

from __future__ import annotations

import requests

from conftest import provider
from test_live_upstream_framing import RawUpstream

GARBAGE = b"HTCPCP/1.0 500 bad\x1b[31m\x07reason\x85\r\n\r\n"


def test_a_garbage_status_line_is_logged_escaped_on_one_line(clipal, upstream_factory):
    a = RawUpstream([GARBAGE])
    try:
        b = upstream_factory("B")
        proxy = clipal(codex=[provider("A", a.url), provider("B", b)])
        response = requests.post(proxy.url + "/codex/v1/chat/completions", json={"model": "m"}, timeout=10)
        assert response.status_code == 200 and response.headers["X-Clipal-Provider"] == "B"
        out = proxy.wait_for_output("provider A failed")
    finally:
        a.stop()
    line = next(line for line in out.split("\n") if "provider A failed" in line)
    assert "HTCPCP/1.0 500 bad\\x1b[31m\\x07reason\\x85\\r\\n" in line
    assert line.endswith("; trying next")  # the rest of the message is on the same line
    assert not any(ch in out for ch in "\x1b\x07\x85\r")
