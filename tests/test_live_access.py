"""Live: who may spend the owner's keys (access tokens, loopback-only without them, no browsers).

A real clipal with and without ``access_tokens`` in front of fake upstreams,
driven by the official SDKs with their usual key settings and by raw HTTP.
A refused request never reaches a provider; a token never reaches an
upstream or a log line. The non-loopback cases run clipal in a network
namespace of its own (``unshare``), where it has an address that is not
loopback; they are skipped where namespaces cannot be created.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import anthropic
import openai
import pytest
import requests
from google import genai
from google.genai import types as genai_types

from conftest import free_port, provider, write_config, write_yaml

ALICE = "alice-token-0123456789abcdef"
BOB = "bob-token-abcdefghijklmnop"
TOKENS = {"access_tokens": [{"name": "alice", "token": ALICE}, BOB]}
USER = [{"role": "user", "content": "hi"}]


def everything(upstream) -> dict:
    return {"claudecode": [provider("A", upstream)], "codex": [provider("A", upstream)],
            "gemini": [provider("A", upstream)]}


def assert_token_never_left(proxy, upstream, *tokens: str) -> None:
    for request in upstream.requests:
        seen = json.dumps([request.path, list(request.headers.items())]) + request.body.decode("latin-1")
        for token in tokens:
            assert token not in seen, "a token reached the upstream"
    for token in tokens:
        assert token not in proxy.output(), "a token reached a log line"


# --------------------------------------------------------------------------- with tokens


def test_each_agents_usual_key_setting_carries_a_token_and_is_served(clipal, upstream_factory):
    up = upstream_factory("A")
    proxy = clipal(settings=TOKENS, **everything(up))

    message = anthropic.Anthropic(api_key=ALICE, base_url=proxy.url + "/claudecode", max_retries=0).messages.create(
        model="claude-test", max_tokens=8, messages=USER)
    assert message.content[0].text == "hello from A"
    message = anthropic.Anthropic(auth_token=BOB, base_url=proxy.url + "/claudecode", max_retries=0).messages.create(
        model="claude-test", max_tokens=8, messages=USER)  # Claude Code's ANTHROPIC_AUTH_TOKEN: a Bearer token
    assert message.content[0].text == "hello from A"
    answer = openai.OpenAI(api_key=ALICE, base_url=proxy.url + "/codex/v1", max_retries=0).responses.create(
        model="gpt-test", input="hi")
    assert answer.output_text == "hello from A"
    gemini = genai.Client(api_key=BOB, http_options=genai_types.HttpOptions(
        base_url=proxy.url + "/gemini", retry_options=genai_types.HttpRetryOptions(attempts=1)))
    assert gemini.models.generate_content(model="gemini-test", contents="hi").text == "hello from A"
    r = requests.post(proxy.url + f"/gemini/v1beta/models/gemini-test:generateContent?key={ALICE}",
                      json={"contents": [{"parts": [{"text": "hi"}]}]}, timeout=10)
    assert r.status_code == 200

    assert len(up.requests) == 5
    assert_token_never_left(proxy, up, ALICE, BOB)
    out = proxy.wait_for_output("for token-2")  # a bare string is named by its position
    assert "request completed via A for alice" in out


@pytest.mark.parametrize("token", [None, "wrong-token-0123456789abc", ALICE[:-1], ALICE + "z", ALICE.upper()],
                         ids=["missing", "wrong", "prefix", "extension", "case"])
def test_a_missing_wrong_or_near_miss_token_gets_401_in_the_clients_shape(clipal, upstream_factory, token):
    up = upstream_factory("A")
    proxy = clipal(settings={**TOKENS, "max_request_body_bytes": 1000}, **everything(up))
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}

    r = requests.post(proxy.url + "/claudecode/v1/messages", json={"model": "m"}, headers=headers, timeout=10)
    assert r.status_code == 401 and r.json()["type"] == "error"
    assert r.json()["error"]["type"] == "authentication_error" and "access_tokens" in r.json()["error"]["message"]
    r = requests.post(proxy.url + "/codex/v1/responses", json={}, headers=headers, timeout=10)
    assert r.status_code == 401 and "access_tokens" in r.json()["error"]["message"]
    r = requests.post(proxy.url + "/gemini/v1beta/models/m:generateContent", json={},
                      headers={"x-goog-api-key": token} if token else {}, timeout=10)
    assert r.status_code == 401 and r.json()["error"]["status"] == "UNAUTHENTICATED"
    # Before the body is read: an over-limit body still gets the 401, not a 413.
    r = requests.post(proxy.url + "/codex/v1/responses", data=b"x" * 5000, headers=headers, timeout=10)
    assert r.status_code == 401
    assert up.requests == []
    if token:
        assert token not in proxy.output()


def test_a_token_change_applies_on_reload_without_a_restart(clipal, upstream_factory):
    up = upstream_factory("A")
    proxy = clipal(settings=TOKENS, **everything(up))
    config = proxy.config_dir / "config.yaml"
    headers = {"Authorization": f"Bearer {ALICE}"}
    assert requests.post(proxy.url + "/codex/v1/responses", json={}, headers=headers, timeout=10).status_code == 200

    new = "carol-token-0123456789abcdef"
    write_yaml(config, {"log_dir": str(proxy.config_dir / "logs"), "access_tokens": [{"name": "carol", "token": new}]})
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if requests.post(proxy.url + "/codex/v1/responses", json={}, headers=headers, timeout=10).status_code == 401:
            break
        time.sleep(0.05)
    else:
        raise AssertionError("the removed token was still accepted 5 s after the edit")
    r = requests.post(proxy.url + "/codex/v1/responses", json={}, headers={"Authorization": f"Bearer {new}"},
                      timeout=10)
    assert r.status_code == 200
    assert new not in proxy.output() and ALICE not in proxy.output()


@pytest.mark.parametrize("tokens,message", [
    (["short-token"], "at least 16 characters"),
    (["token with spaces inside!"], "whitespace"),
    ([ALICE, ALICE], "duplicate"),
    ([{"name": "x", "token": ALICE}, {"name": "x", "token": BOB}], "duplicate"),
    ([{"token": ALICE}], "name"),
    ([42], "a token string or"),
], ids=["short", "whitespace", "duplicate-token", "duplicate-name", "no-name", "not-a-string"])
def test_a_bad_token_list_is_a_one_line_config_error_that_never_prints_the_token(tmp_path, tokens, message):
    write_config(tmp_path / "cfg", settings={"access_tokens": tokens})
    result = subprocess.run([sys.executable, "-m", "clipal", "--config-dir", str(tmp_path / "cfg"),
                             "--port", str(free_port())], capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("clipal: config.yaml: access_tokens") and message in lines[0]
    for token in (ALICE, BOB, "short-token", "token with spaces inside!"):
        assert token not in result.stderr + result.stdout


# --------------------------------------------------------------------------- browsers


@pytest.mark.parametrize("settings", [{}, TOKENS], ids=["no-tokens", "tokens"])
def test_a_browser_origin_is_refused_and_nothing_is_forwarded(clipal, upstream_factory, settings):
    up = upstream_factory("A")
    proxy = clipal(settings=settings, **everything(up))
    auth = {"Authorization": f"Bearer {ALICE}"} if settings else {}

    r = requests.post(proxy.url + "/codex/v1/responses", json={}, timeout=10,
                      headers={"Origin": "https://evil.example", **auth})
    assert r.status_code == 403 and "allowed_origins" in r.json()["error"]["message"]
    r = requests.options(proxy.url + "/codex/v1/responses", timeout=10, headers={
        "Origin": "https://evil.example", "Access-Control-Request-Method": "POST"})
    assert r.status_code == 403 and "Access-Control-Allow-Origin" not in r.headers
    assert up.requests == []
    assert "a browser origin" in proxy.wait_for_output("refused")


def test_an_allowed_origin_and_an_allowed_host_are_served(clipal, upstream_factory):
    up = upstream_factory("A")
    proxy = clipal(settings={"allowed_origins": ["https://app.example"], "allowed_hosts": ["clipal.lan"]},
                   **everything(up))
    r = requests.post(proxy.url + "/codex/v1/responses", json={}, headers={"Origin": "https://app.example"},
                      timeout=10)
    assert r.status_code == 200
    r = requests.post(proxy.url + "/codex/v1/responses", json={}, headers={"Host": "clipal.lan:3333"}, timeout=10)
    assert r.status_code == 200
    assert len(up.requests) == 2


def test_without_tokens_a_rebinding_host_is_refused(clipal, upstream_factory):
    up = upstream_factory("A")
    proxy = clipal(**everything(up))
    r = requests.post(proxy.url + "/claudecode/v1/messages", json={}, timeout=10,
                      headers={"Host": f"rebind.example:{proxy.port}"})
    assert r.status_code == 403 and "allowed_hosts" in r.json()["error"]["message"]
    assert up.requests == []
    assert requests.get(proxy.url + "/health", headers={"Host": "rebind.example"}, timeout=10).status_code == 200
    out = proxy.wait_for_output("refused")
    assert "[WARN]" in out and "127.0.0.1" in out


def test_refusals_are_logged_at_most_once_a_minute_per_peer(clipal, upstream_factory):
    up = upstream_factory("A")
    proxy = clipal(settings=TOKENS, **everything(up))
    for _ in range(20):
        assert requests.post(proxy.url + "/codex/v1/responses", json={}, timeout=10).status_code == 401
    proxy.wait_for_output("refused")
    time.sleep(0.2)
    assert proxy.output().count("refused") == 1


# --------------------------------------------------------------------------- not on this machine


UNSHARE = shutil.which("unshare")
ADDRESS = "10.200.0.1"


def _in_namespace_possible() -> bool:
    if UNSHARE is None or shutil.which("ip") is None:
        return False
    probe = subprocess.run([UNSHARE, "-n", "true"], capture_output=True)
    return probe.returncode == 0


needs_netns = pytest.mark.skipif(not _in_namespace_possible(),
                                 reason="needs `unshare -n` and `ip` (a network namespace of its own)")

NAMESPACED = r"""
set -e
ip link set lo up
ip addr add {address}/32 dev lo
exec "$@"
"""


def _clipal_in_namespace(config_dir: Path, port: int, client_script: str) -> subprocess.CompletedProcess:
    """Run clipal on 0.0.0.0 inside a fresh network namespace with a non-loopback address on its lo,
    then run ``client_script`` (Python) there against it. Providers in the namespace are a fake
    upstream started by the script itself."""
    script = NAMESPACED.format(address=ADDRESS)
    return subprocess.run([UNSHARE, "-n", "sh", "-c", script, "sh", sys.executable, "-c", client_script,
                           str(config_dir), str(port)],
                          capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONUNBUFFERED": "1"})


CLIENT = r"""
import json, socket, subprocess, sys, time
sys.path.insert(0, {tests!r})
import requests
from fakeupstream import FakeUpstream
from conftest import write_config, provider
config_dir, port = sys.argv[1], int(sys.argv[2])
up = FakeUpstream("A")
from pathlib import Path
write_config(Path(config_dir), settings={settings!r}, codex=[provider("A", up)])
out = open(Path(config_dir).parent / "clipal-ns.out", "wb")
proc = subprocess.Popen([sys.executable, "-m", "clipal", "--config-dir", config_dir, "--port", str(port),
                         "--listen-addr", "0.0.0.0"], stdout=out, stderr=subprocess.STDOUT)
try:
    for _ in range(200):
        try:
            requests.get(f"http://127.0.0.1:{{port}}/health", timeout=1); break
        except requests.ConnectionError:
            time.sleep(0.05)
    results = {{}}
    session = requests.Session()
    def post(headers):
        # From the non-loopback address: bind the client socket to it.
        sock = socket.create_connection(({address!r}, port), source_address=({address!r}, 0))
        body = b"{{}}"
        lines = [f"POST /codex/v1/responses HTTP/1.1", f"Host: {address}:{{port}}", "Content-Type: application/json",
                 f"Content-Length: {{len(body)}}", "Connection: close"] + [f"{{k}}: {{v}}" for k, v in headers.items()]
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
        data = b""
        while True:
            more = sock.recv(65536)
            if not more: break
            data += more
        head, _, rest = data.partition(b"\r\n\r\n")
        return int(head.split()[1]), rest.decode(errors="replace")
    results["plain"] = post({{}})
    results["forged"] = post({{"X-Forwarded-For": "127.0.0.1"}})
    results["token"] = post({{"Authorization": "Bearer {token}"}})
    results["upstream_requests"] = len(up.requests)
    print("RESULTS " + json.dumps(results))
finally:
    proc.terminate(); proc.wait(10); up.stop()
"""


@needs_netns
def test_without_tokens_a_peer_that_is_not_loopback_gets_403_even_with_a_forged_forwarded_for(tmp_path):
    script = CLIENT.format(tests=str(Path(__file__).parent), settings={}, address=ADDRESS, token=ALICE)
    result = _clipal_in_namespace(tmp_path / "cfg", free_port(), script)
    assert result.returncode == 0, result.stderr
    results = json.loads(result.stdout.split("RESULTS ", 1)[1])
    for case in ("plain", "forged", "token"):
        status, body = results[case]
        assert status == 403 and "access_tokens" in body, case
    assert results["upstream_requests"] == 0
    log = (tmp_path / "clipal-ns.out").read_text()
    assert "without access_tokens" in log and "[WARN]" in log  # the start warning


@needs_netns
def test_with_tokens_a_peer_that_is_not_loopback_is_served(tmp_path):
    script = CLIENT.format(tests=str(Path(__file__).parent), settings=TOKENS, address=ADDRESS, token=ALICE)
    result = _clipal_in_namespace(tmp_path / "cfg", free_port(), script)
    assert result.returncode == 0, result.stderr
    results = json.loads(result.stdout.split("RESULTS ", 1)[1])
    assert results["plain"][0] == 401 and results["forged"][0] == 401
    assert results["token"][0] == 200
    assert results["upstream_requests"] == 1
    assert "without access_tokens" not in (tmp_path / "clipal-ns.out").read_text()
