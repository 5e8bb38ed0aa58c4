"""GET /metrics against a real clipal, and under gunicorn with two workers.

A scripted sequence - successes, a failover, a deactivation, a circuit that
opens, a stream held open - must leave exactly the counts, histogram
observations and gauges it implies, in text that prometheus_client's own
parser reads. Under gunicorn with ``PROMETHEUS_MULTIPROC_DIR`` one scrape
adds up both workers' requests. ``metrics: false`` makes /metrics a 404.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
from typing import Any

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from conftest import provider, write_config
from fakeupstream import Reply

pytest.importorskip("gunicorn")
from test_gunicorn_live import chat, gunicorn_clipal, hit_both_workers  # noqa: E402,F401 - the fixture too

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


class Scrape:
    """One /metrics answer, parsed: sample values by name and labels."""

    def __init__(self, text: str) -> None:
        self.samples: dict[tuple[str, frozenset], float] = {}
        self.types: dict[str, str] = {}
        for family in text_string_to_metric_families(text):
            self.types[family.name] = family.type
            for sample in family.samples:
                self.samples[(sample.name, frozenset(sample.labels.items()))] = sample.value

    def value(self, name: str, **labels: str) -> float:
        """The sample's value; 0 for a labelled series never created (nothing counted yet)."""
        return self.samples.get((name, frozenset(labels.items())), 0.0)

    def series(self, name: str) -> dict[frozenset, float]:
        return {labels: value for (sample, labels), value in self.samples.items() if sample == name}


def scrape(url: str, **kwargs: Any) -> Scrape:
    response = requests.get(url + "/metrics", timeout=5, **kwargs)
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    return Scrape(response.text)


def post(url: str) -> requests.Response:
    return requests.post(url + "/codex/v1/chat/completions", json=CHAT, timeout=10)


def test_metrics_count_what_a_scripted_sequence_did(clipal, upstream_factory):
    d, a, b = upstream_factory("D"), upstream_factory("A"), upstream_factory("B")
    d.default = Reply.openai_error(503)  # always down: its breaker opens at the first failure
    proxy = clipal(settings={"circuit_breaker": {"failure_threshold": 1}},
                   codex=[provider("D", d), provider("A", a, priority=2), provider("B", b, priority=3)])
    empty = scrape(proxy.url)
    assert empty.types["clipal_requests"] == "counter"
    assert empty.types["clipal_request_duration_seconds"] == "histogram"
    assert empty.value("clipal_active_streams", client="codex") == 0

    # 1. D fails (server error, breaker opens), A answers. 2. A answers again.
    assert post(proxy.url).headers["X-Clipal-Provider"] == "A"
    assert post(proxy.url).headers["X-Clipal-Provider"] == "A"
    # 3. A is rate limited without a hint (a failover that records nothing), B answers and becomes current.
    a.script(Reply.openai_error(429))
    assert post(proxy.url).headers["X-Clipal-Provider"] == "B"
    # 4. B's key is refused (deactivated); D is open, so tried last; A answers.
    b.script(Reply.openai_error(401))
    assert post(proxy.url).headers["X-Clipal-Provider"] == "A"
    # 5. A stream that A holds after its first event.
    gate = threading.Event()
    a.script(Reply.answer().stall_after(1, until=gate))
    connection = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
    connection.request("POST", "/codex/v1/chat/completions", body=json.dumps({**CHAT, "stream": True}),
                       headers={"Content-Type": "application/json"})
    streaming = connection.getresponse()
    assert streaming.status == 200 and streaming.read1(65536)

    held = scrape(proxy.url)
    value = held.value
    assert value("clipal_active_streams", client="codex") == 1
    assert value("clipal_active_streams", client="claudecode") == 0
    assert value("clipal_requests_total", client="codex", provider="A", code="200") == 3  # the stream is not over
    assert value("clipal_requests_total", client="codex", provider="B", code="200") == 1
    assert sum(held.series("clipal_requests_total").values()) == 4
    attempts = {tuple(sorted(labels))[1:]: count for labels, count in held.series("clipal_attempts_total").items()}
    assert attempts == {
        (("outcome", "failover"), ("provider", "D")): 1,
        (("outcome", "ok"), ("provider", "A")): 3,
        (("outcome", "failover"), ("provider", "A")): 1,
        (("outcome", "ok"), ("provider", "B")): 1,
        (("outcome", "deactivated"), ("provider", "B")): 1,
    }
    assert {dict(labels)["reason"]: count for labels, count in held.series("clipal_failovers_total").items()} == \
        {"server_error": 1, "rate_limit": 1, "auth": 1}
    assert value("clipal_request_duration_seconds_count", client="codex") == 4
    assert 0 < value("clipal_request_duration_seconds_sum", client="codex") < 10
    assert value("clipal_request_duration_seconds_bucket", client="codex", le="+Inf") == 4
    assert value("clipal_time_to_first_byte_seconds_count", client="codex", provider="A") == 4  # the stream too
    assert value("clipal_time_to_first_byte_seconds_count", client="codex", provider="B") == 1
    assert value("clipal_time_to_first_byte_seconds_count", client="codex", provider="D") == 0
    assert {dict(labels)["provider"]: v for labels, v in held.series("clipal_provider_available").items()} == \
        {"D": 1, "A": 1, "B": 0}  # an open circuit still serves, as a last resort
    assert {dict(labels)["provider"]: v for labels, v in held.series("clipal_circuit_state").items()} == \
        {"D": 2, "A": 0, "B": 0}

    gate.set()
    assert b"[DONE]" in streaming.read()
    connection.close()
    deadline = time.monotonic() + 5
    while scrape(proxy.url).value("clipal_active_streams", client="codex") != 0:
        assert time.monotonic() < deadline, "the finished stream is still counted as active"
        time.sleep(0.05)
    done = scrape(proxy.url)
    assert done.value("clipal_requests_total", client="codex", provider="A", code="200") == 4
    assert done.value("clipal_attempts_total", client="codex", provider="A", outcome="ok") == 4
    assert done.value("clipal_request_duration_seconds_count", client="codex") == 5


def test_clipals_own_answers_and_broken_streams_are_counted(clipal, upstream_factory):
    a = upstream_factory("A")
    proxy = clipal(settings={"max_request_body_bytes": 100}, codex=[provider("A", a)])
    assert requests.post(proxy.url + "/codex/v1/chat/completions", data=b"x" * 101, timeout=10).status_code == 413
    assert requests.post(proxy.url + "/gemini/v1beta/models/m:generateContent", json={}, timeout=10).status_code == 503
    a.script(Reply.openai_error(404))
    assert post(proxy.url).status_code == 404
    a.script(Reply.answer(delay=0.05).drop_after(2))
    with pytest.raises(requests.exceptions.ChunkedEncodingError):
        requests.post(proxy.url + "/codex/v1/chat/completions", json={**CHAT, "stream": True}, timeout=10).content
    deadline = time.monotonic() + 5
    while (metrics := scrape(proxy.url)).value("clipal_attempts_total", client="codex", provider="A",
                                               outcome="broken") != 1:
        assert time.monotonic() < deadline, "the broken stream was not counted"
        time.sleep(0.05)
    assert metrics.value("clipal_requests_total", client="codex", provider="", code="413") == 1
    assert metrics.value("clipal_requests_total", client="gemini", provider="", code="503") == 1
    assert metrics.value("clipal_requests_total", client="codex", provider="A", code="404") == 1
    assert metrics.value("clipal_attempts_total", client="codex", provider="A", outcome="returned") == 1
    assert metrics.value("clipal_active_streams", client="codex") == 0


def test_metrics_false_answers_404_and_counts_nothing(clipal, upstream_factory):
    a = upstream_factory("A")
    proxy = clipal(settings={"metrics": False}, codex=[provider("A", a)])
    assert post(proxy.url).status_code == 200
    response = requests.get(proxy.url + "/metrics", timeout=5)
    assert response.status_code == 404
    assert response.json()["error"]["message"] == "clipal: no route for /metrics; use /claudecode, /codex or /gemini"
    assert requests.get(proxy.url + "/status", timeout=5).status_code == 200  # /status stays


def test_one_scrape_adds_up_both_gunicorn_workers(tmp_path, upstream_factory, gunicorn_clipal, monkeypatch):
    multiproc = tmp_path / "prometheus"
    multiproc.mkdir()
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(multiproc))  # inherited by gunicorn and its workers
    a = upstream_factory("A")
    config_dir = tmp_path / "config"
    write_config(config_dir, codex=[provider("A", a)])
    server = gunicorn_clipal(config_dir)

    served = hit_both_workers(server, lambda s, test_id: chat(s, test_id)[0])
    assert {pid for pid, _ in served.values()} == server.worker_pids()
    metrics = scrape(server.url, headers={"Connection": "close"})
    assert metrics.value("clipal_requests_total", client="codex", provider="A", code="200") == len(served)
    assert metrics.value("clipal_attempts_total", client="codex", provider="A", outcome="ok") == len(served)
    assert metrics.value("clipal_request_duration_seconds_count", client="codex") == len(served)
    # The stream gauge adds up the live workers; the routing gauges are the scraping worker's view.
    assert metrics.value("clipal_active_streams", client="codex") == 0
    assert metrics.value("clipal_provider_available", client="codex", provider="A") == 1
    live_gauges = sorted(path.name for path in multiproc.glob("gauge_livesum_*.db"))
    assert live_gauges == sorted(f"gauge_livesum_{pid}.db" for pid in server.worker_pids())
    assert server.stop() == 0
    # deploy/gunicorn.conf.py's child_exit hook: a worker that is gone takes its live gauges along.
    assert list(multiproc.glob("gauge_livesum_*.db")) == []
    assert len(list(multiproc.glob("counter_*.db"))) == 2  # counters outlive their worker, in the sums
