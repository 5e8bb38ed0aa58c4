"""What clipal counts for Prometheus, and /metrics' text.

Each app has its own :class:`Metrics` with its own ``CollectorRegistry`` (not
prometheus_client's global one), so that several apps in one process - the
tests build many - count separately. A request is measured by a
:class:`RequestMeter` that the app hands the proxy in the WSGI environ (under
:data:`METER`); with ``metrics: false`` it hands none, the proxy uses
:data:`NO_METER`, whose methods do nothing, and nothing is counted.

The series:

* ``clipal_requests_total{client,provider,code}``: requests answered, by the
  status the agent got and the provider that gave it (``provider=""`` when
  clipal answered itself: a refusal, 413, nothing available). A relayed
  answer is counted when its body has ended.
* ``clipal_attempts_total{client,provider,outcome}``: each try of a provider,
  counted when its outcome is known. ``ok``: a 2xx or 3xx answer was relayed
  (to its end, or until the agent hung up); ``returned``: an error status
  that does not fail over was relayed as is (400, 404, 501, and every
  status in manual mode); ``failover``, ``cooling``, ``deactivated``: it
  failed before the commit point and the request moved on to the next key
  or provider (if one was left), with nothing recorded, a cooldown, or the
  key deactivated; ``failed``: it failed and nothing was tried next (manual
  mode); ``broken``: its answer stalled, broke or ended without its
  terminal event after the commit point (the agent's retry goes elsewhere).
* ``clipal_failovers_total{client,reason}``: the attempts of the three
  moving outcomes above, by the failover table's kind (``auth``, ``quota``,
  ``rate_limit``, ``server_error``, ``timeout``, ...).
* ``clipal_request_duration_seconds{client}``: from the request's arrival to
  the end of the answer (the last byte of a stream).
* ``clipal_time_to_first_byte_seconds{client,provider}``: from sending to the
  provider that answered to its first body bytes (the commit point); failed
  attempts before it count in the request's duration, not here.
* ``clipal_active_streams{client}``: relayed answers whose body is being sent now.
* ``clipal_provider_available{client,provider}`` (1 when requests may try it:
  not deactivated, not cooling) and ``clipal_circuit_state{client,provider}``
  (0 closed, 1 half-open, 2 open): read from the routing state at scrape
  time, for the enabled providers (a disabled one is not in rotation, and a
  constant 0 would only set off alerts).

Under gunicorn with ``PROMETHEUS_MULTIPROC_DIR`` set, counters, histograms
and the stream gauge live in files there, and a scrape - answered by
whichever worker gets it - sums every worker's. The routing gauges are
that worker's view of the routing state: the same for all workers over a
shared store, a per-worker view over each worker's memory.

Cost: label children are looked up once and kept in plain dicts, so a
request costs a few dict lookups, lock-protected increments (the
interpreter's lock, not gevent's) and two histogram observations: a few
microseconds of CPU.
"""

from __future__ import annotations

import os
import time
from typing import Callable, Iterable, Iterator, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.registry import Collector
from prometheus_client import values as _values
from gevent.monkey import get_original

from .classify import Verdict
from .clients import CLIENTS
from .routing import HALF_OPEN, OPEN, ProviderView

# prometheus_client (checked with 0.26) guards every value with threading.Lock, which
# gevent's patching makes a greenlet-aware lock at about a microsecond per use, several
# uses per request. An update never yields to another greenlet, so the interpreter's own
# lock is as correct here, across threads too, at a fraction of the cost.
_values.Lock = get_original("_thread", "allocate_lock")

#: The environ key under which the app leaves a request's :class:`RequestMeter`.
METER = "clipal.meter"
#: The Content-Type of /metrics: the text format generate_latest writes, as every Prometheus reads it
#: (and as prometheus_client's own exporters announce it when the scraper asks for nothing newer).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

#: Agent requests run from a fraction of a second (count_tokens) to many minutes (long streams).
DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)
#: A provider's first bytes come within milliseconds (an error) to a minute or more (a long think).
TTFB_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0)

#: clipal_circuit_state's values, by breaker state.
CIRCUIT_VALUES = {"closed": 0, HALF_OPEN: 1, OPEN: 2}
#: The routing states in which a request may still try a provider.
SERVING_STATES = frozenset({"available", "circuit_open", "half_open"})

#: Reads every client's provider views now: (client name, views) pairs.
ViewsSource = Callable[[], Iterable[tuple[str, list[ProviderView]]]]
M = TypeVar("M", bound=MetricWrapperBase)


def multiprocess_dir() -> str | None:
    """The directory prometheus_client's multiprocess mode uses, if set (its own two spellings)."""
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or os.environ.get("prometheus_multiproc_dir")


class RoutingStateCollector(Collector):
    """clipal_provider_available and clipal_circuit_state, computed from the routing state at each scrape."""

    def __init__(self, views: ViewsSource) -> None:
        self._views = views

    def _families(self) -> tuple[GaugeMetricFamily, GaugeMetricFamily]:
        return (GaugeMetricFamily("clipal_provider_available",
                                  "1 when requests may try the provider now (not deactivated, not cooling)",
                                  labels=["client", "provider"]),
                GaugeMetricFamily("clipal_circuit_state", "the provider's circuit breaker: 0 closed, 1 half-open, "
                                                          "2 open", labels=["client", "provider"]))

    def describe(self) -> Iterator[GaugeMetricFamily]:
        # Names only: registering the collector must not read the routing state.
        return iter(self._families())

    def collect(self) -> Iterator[GaugeMetricFamily]:
        available, circuit = self._families()
        for client, views in self._views():
            for view in views:
                labels = [client, view.provider.name]
                available.add_metric(labels, 1.0 if view.state in SERVING_STATES else 0.0)
                circuit.add_metric(labels, float(CIRCUIT_VALUES.get(view.breaker, 0)))
        yield available
        yield circuit


class Metrics:
    """One app's series, their cached label children, and the text a scrape gets."""

    def __init__(self, views: ViewsSource) -> None:
        self.registry = CollectorRegistry()
        registry = self.registry
        self.requests = Counter("clipal_requests", "requests answered, by status and by the provider that answered "
                                "(empty: clipal answered itself)", ["client", "provider", "code"], registry=registry)
        self.attempts = Counter("clipal_attempts", "tries of a provider, by outcome",
                                ["client", "provider", "outcome"], registry=registry)
        self.failovers = Counter("clipal_failovers", "attempts that failed before the commit point and moved the "
                                 "request on, by kind", ["client", "reason"], registry=registry)
        self.duration = Histogram("clipal_request_duration_seconds", "from a request's arrival to the end of its "
                                  "answer", ["client"], buckets=DURATION_BUCKETS, registry=registry)
        self.ttfb = Histogram("clipal_time_to_first_byte_seconds", "from sending to the provider that answered to "
                              "its first body bytes", ["client", "provider"], buckets=TTFB_BUCKETS, registry=registry)
        # livesum: under gunicorn the scrape adds up the workers that are alive.
        self.streams = Gauge("clipal_active_streams", "answers being relayed now", ["client"], registry=registry,
                             multiprocess_mode="livesum")
        state = RoutingStateCollector(views)
        registry.register(state)
        self._children: dict[tuple[int, ...] | tuple[object, ...], MetricWrapperBase] = {}
        # Every client's stream gauge is there from the start (0), so a dashboard sees 0, not nothing.
        self._stream_gauges = {client.name: self.streams.labels(client.name) for client in CLIENTS}
        if multiprocess_dir():
            # The values are in the directory's files; a scrape reads them all, and adds this worker's view
            # of the routing state.
            self._scrape = CollectorRegistry()
            MultiProcessCollector(self._scrape)
            self._scrape.register(state)
        else:
            self._scrape = registry

    def _child(self, metric: M, *labels: str) -> M:
        # prometheus_client's labels() validates and locks each time; a dict lookup is a fraction of that.
        key = (id(metric), *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child  # type: ignore[return-value]

    def meter(self, client: str, reactivate_after: float) -> RequestMeter:
        """Start measuring one request of ``client`` (now)."""
        return RequestMeter(self, client, reactivate_after)

    def exposition(self) -> bytes:
        """The text /metrics answers."""
        return generate_latest(self._scrape)

    # -- what a meter reports ----------------------------------------------------------------------------

    def count_attempt(self, client: str, provider: str, outcome: str) -> None:
        self._child(self.attempts, client, provider, outcome).inc()

    def count_failover(self, client: str, reason: str) -> None:
        self._child(self.failovers, client, reason).inc()

    def count_answer(self, client: str, provider: str, code: int, seconds: float) -> None:
        self._child(self.requests, client, provider, str(code)).inc()
        self._child(self.duration, client).observe(seconds)

    def observe_first_byte(self, client: str, provider: str, seconds: float) -> None:
        self._child(self.ttfb, client, provider).observe(seconds)

    def stream_gauge(self, client: str) -> Gauge:
        return self._stream_gauges[client]


class NullMeter:
    """A request not measured (``metrics: false``, or a proxy driven without an app): every report is dropped."""

    __slots__ = ()

    def sending(self) -> None:
        """An attempt's request is about to go to its provider."""

    def failed(self, provider: str, verdict: Verdict, *, tried_next: bool = True) -> None:
        """An attempt failed before the commit point; ``tried_next`` False in manual mode."""

    def committed(self, provider: str) -> None:
        """An attempt's answer goes to the agent (its first bytes are here)."""

    def streaming(self) -> None:
        """The committed answer's body starts going to the agent."""

    def finished(self, provider: str, status: int, success: bool | None) -> None:
        """The committed answer ended: ``success`` as :meth:`clipal.routing.Walk.finished` takes it."""

    def answered(self, status: int, provider: str) -> None:
        """The app is sending a response; counted here unless it is a committed answer (counted when it ends)."""


NO_METER = NullMeter()


class RequestMeter(NullMeter):
    """The measurements of one request; each method is one report, made once where it happens."""

    __slots__ = ("_metrics", "client", "started", "_reactivate_after", "_attempt_started", "_committed",
                 "_streaming")

    def __init__(self, metrics: Metrics, client: str, reactivate_after: float) -> None:
        self._metrics = metrics
        self.client = client
        self.started = time.perf_counter()
        self._reactivate_after = reactivate_after
        self._attempt_started = self.started
        self._committed = False
        self._streaming = False

    def sending(self) -> None:
        self._attempt_started = time.perf_counter()

    def failed(self, provider: str, verdict: Verdict, *, tried_next: bool = True) -> None:
        metrics = self._metrics
        if not tried_next:
            metrics.count_attempt(self.client, provider, "failed")
            return
        # As the routing policy records it: a deactivation needs reactivate_after, else a hinted cooldown applies.
        if verdict.deactivate and self._reactivate_after > 0:
            outcome = "deactivated"
        elif verdict.cooldown:
            outcome = "cooling"
        else:
            outcome = "failover"
        metrics.count_attempt(self.client, provider, outcome)
        metrics.count_failover(self.client, verdict.kind.value if verdict.kind is not None else "server_error")

    def committed(self, provider: str) -> None:
        self._committed = True
        self._metrics.observe_first_byte(self.client, provider, time.perf_counter() - self._attempt_started)

    def streaming(self) -> None:
        if not self._streaming:
            self._streaming = True
            self._metrics.stream_gauge(self.client).inc()

    def finished(self, provider: str, status: int, success: bool | None) -> None:
        metrics = self._metrics
        if self._streaming:
            self._streaming = False
            metrics.stream_gauge(self.client).dec()
        if success is False:
            outcome = "broken"
        else:
            outcome = "ok" if status < 400 else "returned"
        metrics.count_attempt(self.client, provider, outcome)
        metrics.count_answer(self.client, provider, status, time.perf_counter() - self.started)

    def answered(self, status: int, provider: str) -> None:
        if not self._committed:
            self._metrics.count_answer(self.client, provider, status, time.perf_counter() - self.started)
