"""/metrics, /status and their pieces in process: Flask's test client, upstreams mocked with `responses`.

Milliseconds per test: each app counts in its own registry; an attempt's
outcome follows what the routing policy recorded; ``metrics: false``
counts nothing and a reload turns counting back on; and the rule of
``clipal status`` - which clients have nothing left, how a state reads -
on documents written by hand. tests/test_live_metrics.py and
tests/test_live_status.py check the same over real sockets.
"""

from __future__ import annotations

from pathlib import Path

import responses
from prometheus_client.parser import text_string_to_metric_families

from clipal import metrics as metrics_module
from clipal.app import METRICS
from clipal.classify import Kind, Verdict, provider_failure
from clipal.config import load_config
from clipal.status import describe_provider, render_table, unavailable_clients
from conftest import write_config
from test_app_inprocess import make_client  # noqa: F401 - the fixture

A = "https://a.example"
PROVIDERS = [{"name": "A", "base_url": A, "api_key": "sk-test-provider-a-0123456789"}]
MESSAGE = {"type": "message", "content": [{"type": "text", "text": "hi"}]}


def values(client, name: str) -> dict[frozenset, float]:
    text = client.get("/metrics").get_data(as_text=True)
    return {frozenset(sample.labels.items()): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples if sample.name == name}


@responses.activate
def test_each_app_counts_in_its_own_registry(make_client):
    responses.post(f"{A}/v1/messages", json=MESSAGE)
    first, second = make_client(claudecode=PROVIDERS), make_client(claudecode=PROVIDERS)
    for _ in range(3):
        assert first.post("/claudecode/v1/messages", json={"model": "m"}).status_code == 200
    assert second.post("/claudecode/v1/messages", json={"model": "m"}).status_code == 200
    key = frozenset({"client": "claudecode", "provider": "A", "code": "200"}.items())
    assert values(first, "clipal_requests_total")[key] == 3
    assert values(second, "clipal_requests_total")[key] == 1
    assert first.application.extensions[METRICS] is not second.application.extensions[METRICS]


@responses.activate
def test_refusals_are_counted_as_clipals_own_answers(make_client):
    client = make_client(settings={"access_tokens": ["in-process-token-0123456789"]}, claudecode=PROVIDERS)
    assert client.post("/claudecode/v1/messages", json={}).status_code == 401
    assert client.get("/metrics").status_code == 401  # /metrics itself needs the token
    text = client.get("/metrics", headers={"x-api-key": "in-process-token-0123456789"}).get_data(as_text=True)
    assert 'clipal_requests_total{client="claudecode",code="401",provider=""} 1.0' in text
    assert len(responses.calls) == 0  # neither the refused request nor the scrape reached a provider


@responses.activate
def test_metrics_false_counts_nothing_until_a_reload_turns_it_on(make_client, tmp_path: Path):
    responses.post(f"{A}/v1/messages", json=MESSAGE)
    client = make_client(settings={"metrics": False}, claudecode=PROVIDERS)
    assert client.post("/claudecode/v1/messages", json={"model": "m"}).status_code == 200
    assert client.get("/metrics").status_code == 404

    write_config(tmp_path, settings={"log_stdout": False}, claudecode=PROVIDERS)  # metrics back to its default
    runtime = client.application.extensions["clipal"]
    runtime.apply(load_config(tmp_path))
    assert values(client, "clipal_requests_total") == {}  # the request under metrics: false left no trace
    assert client.post("/claudecode/v1/messages", json={"model": "m"}).status_code == 200
    assert list(values(client, "clipal_requests_total").values()) == [1]


def recorded(verdict: Verdict, *, reactivate_after: float = 3600.0, tried_next: bool = True) -> dict:
    metrics = metrics_module.Metrics(lambda: [])
    meter = metrics.meter("codex", reactivate_after)
    meter.failed("A", verdict, tried_next=tried_next)
    text = metrics.exposition().decode()
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples
            if sample.name.endswith("_total")}


def outcome_of(verdict: Verdict, **kwargs) -> str:
    (labels,) = [labels for name, labels in recorded(verdict, **kwargs) if name == "clipal_attempts_total"]
    return dict(labels)["outcome"]


def test_an_attempts_outcome_is_what_the_routing_policy_records():
    auth = Verdict(True, Kind.AUTH, True, None, "auth error (401)")
    assert outcome_of(auth) == "deactivated"
    # reactivate_after: 0 deactivates nothing; a hinted wait is still honoured, else nothing is recorded.
    assert outcome_of(auth, reactivate_after=0) == "failover"
    assert outcome_of(Verdict(True, Kind.QUOTA, True, 30.0, "quota"), reactivate_after=0) == "cooling"
    assert outcome_of(Verdict(True, Kind.RATE_LIMIT, False, 30.0, "rate limited (429)")) == "cooling"
    assert outcome_of(provider_failure("connection refused")) == "failover"
    assert outcome_of(provider_failure("connection refused"), tried_next=False) == "failed"
    failovers = {labels: value for (name, labels), value in recorded(auth).items() if name == "clipal_failovers_total"}
    assert failovers == {(("client", "codex"), ("reason", "auth")): 1}
    assert not any(name == "clipal_failovers_total"
                   for name, _ in recorded(provider_failure("refused"), tried_next=False))


def test_the_null_meter_counts_nothing_and_a_proxy_without_an_app_uses_it():
    meter = metrics_module.NO_METER
    meter.sending()
    meter.failed("A", provider_failure("refused"))
    meter.committed("A")
    meter.streaming()
    meter.finished("A", 200, True)
    meter.answered(200, "A")
    assert not hasattr(meter, "__dict__")  # no state to keep: one shared instance serves every request


# --------------------------------------------------------------------------- clipal status, on documents


def entry(name: str, state: str, *, enabled: bool = True, reason: str | None = None,
          retry_in_s: float | None = None) -> dict:
    return {"name": name, "priority": 1, "enabled": enabled, "state": state, "reason": reason,
            "retry_in_s": retry_in_s, "keys": {"total": 2, "available": 1}, "breaker": "closed",
            "requests": 0, "failures": 0}


def document(**clients: list[dict]) -> dict:
    return {"version": "0.0.0", "uptime_s": 61.5, "config_dir": "/c", "listen": "127.0.0.1:3333",
            "state": {"backend": "redis", "connected": False},
            "clients": {name: {"file": f"{name}.yaml", "mode": "auto", "current": providers[0]["name"] if providers
                               else None, "providers": providers} for name, providers in clients.items()}}


def test_a_client_counts_as_served_while_one_enabled_provider_is_not_deactivated_or_cooling():
    out = [entry("x", "deactivated", reason="auth"), entry("y", "cooling", reason="rate_limit")]
    assert unavailable_clients(document(codex=out, gemini=[])) == ["codex"]
    assert unavailable_clients(document(codex=out + [entry("z", "circuit_open")])) == []
    assert unavailable_clients(document(codex=out + [entry("z", "half_open")])) == []
    # Every provider disabled: like a client without providers, not a failure.
    assert unavailable_clients(document(codex=[entry("off", "deactivated", enabled=False, reason="disabled")])) == []


def test_states_read_with_their_time_left_and_reason():
    assert describe_provider(entry("x", "cooling", reason="rate_limit", retry_in_s=24.2)) == \
        "cooling, 25s left: rate_limit"
    assert describe_provider(entry("x", "deactivated", reason="auth", retry_in_s=3599.5)) == \
        "deactivated, 1h left: auth"
    assert describe_provider(entry("x", "circuit_open", reason="circuit_open", retry_in_s=5)) == \
        "circuit open, 5s left (degraded: tried last)"
    assert describe_provider(entry("x", "deactivated", enabled=False, reason="disabled")) == "disabled"
    table = render_table(document(codex=[entry("x", "available")]))
    assert table.splitlines()[0] == "clipal 0.0.0 on 127.0.0.1:3333, up 1m1s, config /c, state in redis (NOT connected)"
    assert table.splitlines()[1:] == ["codex (codex.yaml): current x", "  x  available  keys 1 of 2"]
    wide = render_table(document(codex=[entry("x", "available"), entry("longer", "cooling", reason="rate_limit",
                                                                           retry_in_s=5)]))
    cooling = "cooling, 5s left: rate_limit"
    assert wide.splitlines()[2:] == ["  x       " + "available".ljust(len(cooling)) + "  keys 1 of 2",
                                     f"  longer  {cooling}  keys 1 of 2"]
