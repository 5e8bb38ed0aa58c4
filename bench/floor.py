#!/usr/bin/env python3
"""The stack's floor: the least a Flask + gevent + requests proxy can do, to bench beside clipal.

clipal's stack is fixed (a Flask app on gevent's WSGIServer, each request
forwarded through one ``requests.Session`` and streamed back with urllib3's
``read1``). This file is that stack with nothing of clipal on it: no
configuration rules, front door, failover, classification, access check,
metrics, logging or redaction. One Flask view forwards every request under
``/<client>/`` to the one upstream and streams the answer back untouched.
Whatever this costs, clipal cannot cost less; what clipal costs above it is
clipal's own.

With ``--answer-itself`` there is no upstream either: the Flask view answers
as bench/upstream.js would (the same JSON, the same SSE events at the same
pace, the agent phase's body hash). That is the serving half of the stack
alone, a lower bound for any proxy built on it: a proxy does all of this and
the upstream half (connect, send, read, parse) as well.

bench/run.py runs it in clipal's place:

    python bench/run.py --clipal-cmd "{python} /abs/bench/floor.py --config-dir {config_dir} --port {port}"
    python bench/run.py --clipal-cmd "{python} /abs/bench/floor.py --answer-itself \
        --config-dir {config_dir} --port {port}"

It reads the upstream's base_url from the config dir's codex.yaml, as the
harness writes it, and answers GET /health.
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
import re  # noqa: E402
import socket  # noqa: E402
from pathlib import Path  # noqa: E402

import requests  # noqa: E402
import gevent  # noqa: E402
from flask import Flask, Response, request  # noqa: E402
from gevent.pywsgi import WSGIServer  # noqa: E402

# Hop-by-hop headers (RFC 9110 §7.6.1) and the ones the WSGI server or requests set again.
NOT_FORWARDED = {"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding",
                 "upgrade", "host", "content-length"}
READ_SIZE = 64 * 1024


def create_app(base_url: str) -> Flask:
    app = Flask(__name__)
    session = requests.Session()
    session.trust_env = False  # no proxy or netrc lookup per request
    session.mount("http://", requests.adapters.HTTPAdapter(pool_connections=4, pool_maxsize=1024))

    @app.get("/health")
    def health():
        return "ok\n"

    @app.route("/<client>/<path:rest>", methods=["GET", "POST"])
    def forward(client: str, rest: str):
        headers = {k: v for k, v in request.headers.items() if k.lower() not in NOT_FORWARDED}
        url = f"{base_url}/{rest}"
        if request.query_string:
            url += "?" + request.query_string.decode("latin-1")
        upstream = session.request(request.method, url, data=request.get_data(), headers=headers,
                                   stream=True, timeout=(10, 300), allow_redirects=False)

        def relay():
            try:
                while chunk := upstream.raw.read1(READ_SIZE, decode_content=False):
                    yield chunk
            finally:
                upstream.close()

        answer = [(k, v) for k, v in upstream.raw.headers.items() if k.lower() not in NOT_FORWARDED]
        return Response(relay(), status=upstream.status_code, headers=answer, direct_passthrough=True)

    return app


class Server(WSGIServer):
    """gevent's WSGIServer with Nagle off, as any proxy needs: a small last send (the final chunk)
    would otherwise wait ~40 ms for the client's delayed ACK. urllib3 already sets it upstream."""

    def handle(self, sock, address):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return super().handle(sock, address)


CHAT = json.dumps({
    "id": "chatcmpl-bench0000000000000000000000", "object": "chat.completion", "created": 1700000000,
    "model": "bench-model", "choices": [{"index": 0, "message": {
        "role": "assistant", "content": "Hello from the clipal bench upstream. This is a short answer."},
        "logprobs": None, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 12, "completion_tokens": 14, "total_tokens": 26}}, separators=(",", ":"))
SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def paced(events: list[str], interval_s: float):
    """The events, the first at once and then one every interval (a fixed rate, as Node's setInterval)."""
    start = time.monotonic()
    for i, event in enumerate(events):
        if i:
            gevent.sleep(max(0.0, start + i * interval_s - time.monotonic()))
        yield event.encode()


def query_int(name: str, default: int, low: int) -> int:
    try:
        return max(low, int(request.args.get(name, default)))
    except ValueError:
        return default


def create_answering_app() -> Flask:
    """bench/upstream.js's routes, answered by the Flask view itself."""
    app = Flask(__name__)

    @app.get("/health")
    def health():
        return "ok\n"

    @app.route("/<client>/v1/chat/completions", methods=["POST"])
    def chat(client: str):
        request.get_data()
        return Response(CHAT, content_type="application/json")

    @app.route("/<client>/v1/stream", methods=["GET", "POST"])
    def stream(client: str):
        request.get_data()
        n = query_int("events", 50, 1)
        events = ['data: {"id":"chatcmpl-bench","object":"chat.completion.chunk","choices":[{"index":0,'
                  '"delta":{"content":"tok%d"}}]}\n\n' % i for i in range(n - 1)] + ["data: [DONE]\n\n"]
        return Response(paced(events, query_int("interval", 20, 0) / 1000), headers=SSE_HEADERS,
                        direct_passthrough=True)

    @app.route("/<client>/v1/messages", methods=["POST"])
    def messages(client: str):
        body = request.get_data()
        n, sha = len(body), hashlib.sha256(body).hexdigest()
        count = query_int("events", 40, 6)

        def sse(kind: str, obj: dict) -> str:
            return f"event: {kind}\ndata: {json.dumps(obj, separators=(',', ':'))}\n\n"

        events = [sse("message_start", {"type": "message_start", "message": {
            "id": "msg_bench", "type": "message", "role": "assistant", "model": "bench-model", "content": [],
            "stop_reason": None, "usage": {"input_tokens": round(n / 4), "output_tokens": 1}},
            "bench": {"bytes": n, "sha256": sha}}),
            sse("content_block_start", {"type": "content_block_start", "index": 0,
                                        "content_block": {"type": "text", "text": ""}})]
        events += [sse("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {
            "type": "text_delta", "text": f"token {i} of the answer "}}) for i in range(2, count - 3)]
        events += [sse("content_block_stop", {"type": "content_block_stop", "index": 0}),
                   sse("message_delta", {"type": "message_delta", "delta": {
                       "stop_reason": "end_turn", "stop_sequence": None}, "usage": {"output_tokens": count - 5}}),
                   sse("message_stop", {"type": "message_stop"})]
        headers = dict(SSE_HEADERS, **{"Content-Type": "text/event-stream; charset=utf-8",
                                       "X-Bench-Body-Bytes": str(n), "X-Bench-Body-Sha256": sha})
        return Response(paced(events, query_int("interval", 50, 0) / 1000), headers=headers,
                        direct_passthrough=True)

    return app


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config-dir", required=True, type=Path)
    ap.add_argument("--port", required=True, type=int)
    ap.add_argument("--log-level", default="error", help="accepted for the harness; nothing is logged")
    ap.add_argument("--answer-itself", action="store_true", help="no upstream: answer as bench/upstream.js")
    args = ap.parse_args()
    if args.answer_itself:
        Server(("127.0.0.1", args.port), create_answering_app(), log=None).serve_forever()
        return
    match = re.search(r"base_url:\s*(\S+)", (args.config_dir / "codex.yaml").read_text())
    if not match:
        raise SystemExit(f"no base_url in {args.config_dir / 'codex.yaml'}")
    Server(("127.0.0.1", args.port), create_app(match.group(1).rstrip("/")), log=None).serve_forever()


if __name__ == "__main__":
    main()
