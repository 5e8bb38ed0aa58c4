"""The smallest end-to-end check: clipal starts, answers /health and forwards one request."""

import requests

from conftest import provider


def test_health_and_one_forwarded_request(clipal, upstream_factory):
    a = upstream_factory("A")
    proxy = clipal(codex=[provider("A", a)])
    assert requests.get(proxy.url + "/health").json() == {"status": "healthy"}
    r = requests.post(proxy.url + "/codex/v1/chat/completions", json={"model": "m", "messages": []})
    assert r.status_code == 200
    assert r.headers["X-Clipal-Provider"] == "A"
    assert "hello from A" in r.text
