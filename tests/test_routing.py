"""The routing policy with a fake clock and a memory store, no sockets.

classify.py decides what an outcome means (tests/test_classify.py); these
tests feed verdicts into a request's Walk and check which provider and key
it tries next, what stays out of service and for how long, what the circuit
breaker does, and what clipal answers when nothing is left.
"""

from __future__ import annotations

import pytest

from clipal.classify import Kind, Verdict
from clipal.config import BreakerSettings, Provider
from clipal.routing import COUNT_TOKENS, MAIN, Attempt, Routing
from clipal.store import MemoryStore

BREAKER = BreakerSettings(failure_threshold=4, success_threshold=2, open_timeout=60.0)


class FakeClock:
    def __init__(self, start: float = 1_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def p(name: str, *, keys: int = 1, priority: int = 1, enabled: bool = True) -> Provider:
    return Provider(name=name, base_url=f"http://{name.lower()}.invalid",
                    api_keys=tuple(f"sk-{name}-key{i}-0123456789" for i in range(1, keys + 1)),
                    priority=priority, enabled=enabled)


def verdict(kind: Kind, cooldown: float | None = None) -> Verdict:
    deactivate = kind in (Kind.AUTH, Kind.BILLING, Kind.QUOTA)
    return Verdict(True, kind, deactivate, cooldown, f"{kind.value} (test)")


AUTH, BILLING, QUOTA, RATE, SERVER, OVERLOADED, TIMEOUT = (
    Kind.AUTH, Kind.BILLING, Kind.QUOTA, Kind.RATE_LIMIT, Kind.SERVER_ERROR, Kind.OVERLOADED, Kind.TIMEOUT)


class World:
    """One client's routing over a memory store, and helpers to run requests through it."""

    def __init__(self, *providers: Provider, reactivate_after: float = 3600.0, isolate: bool = False,
                 breaker: BreakerSettings = BREAKER, pinned: str | None = None) -> None:
        self.clock = FakeClock()
        self.store = MemoryStore(self.clock)
        self.providers = providers
        self.settings = dict(reactivate_after=reactivate_after, isolate_count_tokens=isolate, breaker=breaker)
        self.pinned = {"codex": pinned} if pinned else {}
        self.reload(*providers)

    def reload(self, *providers: Provider) -> None:
        self.routing = Routing({"codex": providers}, store=self.store, clock=self.clock, pinned=self.pinned,
                               **self.settings)
        self.routing.forget_others()
        self.client = self.routing.client("codex")

    def request(self, outcomes: dict[str, object] | None = None, *, lane: str = MAIN, count_tokens: bool = False,
                finish: bool | None = True) -> tuple[list[str], object]:
        """Run one request: each attempt's outcome is looked up by "name" or "name/keyN" (default: success).

        Returns the attempts made ("A" or "A/key2" when the provider has several keys) and the
        final answer: the committed attempt, or the Unavailable answer.
        """
        outcomes = outcomes or {}
        walk = self.client.walk(lane, count_tokens=count_tokens)
        tried = []
        for attempt in walk:
            label = attempt.provider.name + (f"/key{attempt.key + 1}" if len(attempt.provider.api_keys) > 1 else "")
            tried.append(label)
            outcome = outcomes.get(label, outcomes.get(attempt.provider.name, "ok"))
            if isinstance(outcome, Verdict):
                walk.failed(attempt, outcome)
                continue
            walk.committed(attempt)
            walk.finished(attempt, success=finish if outcome == "ok" else outcome)
            self.walk = walk
            return tried, attempt
        self.walk = walk
        return tried, walk.unavailable()

    def state(self, name: str) -> str:
        return next(v.state for v in self.client.views() if v.provider.name == name)


# --------------------------------------------------------------------------- order and stickiness


def test_a_request_starts_at_the_current_provider_and_the_answering_one_becomes_current():
    world = World(p("A"), p("B"), p("C"))
    assert world.request()[0] == ["A"]
    tried, _ = world.request({"A": verdict(SERVER)})
    assert tried == ["A", "B"]
    assert world.request()[0] == ["B"]  # sticky


def test_priorities_order_the_walk_and_ties_keep_file_order():
    world = World(p("low", priority=2), p("first"), p("second"), p("off", enabled=False))
    tried, _ = world.request({"first": verdict(SERVER), "second": verdict(SERVER)})
    assert tried == ["first", "second", "low"]


def test_the_walk_wraps_from_the_current_provider_and_tries_each_once():
    world = World(p("A"), p("B"), p("C"))
    world.request({"A": verdict(SERVER)})  # B is current
    tried, answer = world.request({"B": verdict(SERVER), "C": verdict(SERVER), "A": verdict(SERVER)})
    assert tried == ["B", "C", "A"]
    assert (answer.status, answer.retry_after) == (503, 1)


# --------------------------------------------------------------------------- each outcome, one key


@pytest.mark.parametrize("kind", [AUTH, BILLING, QUOTA])
def test_deactivation_keeps_a_provider_out_until_reactivate_after(kind):
    world = World(p("A"), p("B"), reactivate_after=600)
    assert world.request({"A": verdict(kind)})[0] == ["A", "B"]
    assert world.state("A") == "deactivated"
    world.clock.advance(599)
    assert world.request()[0] == ["B"]
    world.clock.advance(2)
    world.request({"B": verdict(SERVER)})  # A is back (and logged as reactivated)
    assert any("provider A reactivated" in e.message for e in world.walk.events)
    assert world.state("A") == "available"


def test_reactivate_after_zero_never_deactivates():
    world = World(p("A"), p("B"), reactivate_after=0)
    assert world.request({"A": verdict(AUTH)})[0] == ["A", "B"]
    assert world.state("A") == "available"


@pytest.mark.parametrize("kind", [RATE, SERVER, OVERLOADED, TIMEOUT])
def test_a_hinted_failure_cools_down_for_the_hint(kind):
    world = World(p("A"), p("B"))
    world.request({"A": verdict(kind, cooldown=30)})
    assert world.state("A") == "cooling"
    world.clock.advance(29)
    tried, _ = world.request({"B": verdict(SERVER)})
    assert tried == ["B"]
    world.clock.advance(1.5)
    assert world.request()[0] == ["A"]  # back, and current again: B's failure moved the cursor on to it


@pytest.mark.parametrize("kind", [RATE, SERVER, OVERLOADED, TIMEOUT])
def test_a_failure_without_a_hint_only_moves_on(kind):
    world = World(p("A"), p("B"))
    assert world.request({"A": verdict(kind)})[0] == ["A", "B"]
    assert world.state("A") == "available"
    assert world.request({"B": verdict(SERVER)})[0] == ["B", "A"]


# --------------------------------------------------------------------------- several keys


@pytest.mark.parametrize("kind", [AUTH, BILLING, QUOTA])
def test_a_key_scoped_failure_tries_the_next_key_of_the_same_provider_first(kind):
    world = World(p("A", keys=3), p("B"))
    tried, answer = world.request({"A/key1": verdict(kind)})
    assert tried == ["A/key1", "A/key2"] and answer.provider.name == "A" and answer.key == 1
    assert world.request()[0] == ["A/key2"]  # the key that last succeeded is current
    world.clock.advance(3599)
    assert world.request({"A/key2": verdict(SERVER)})[0] == ["A/key2", "B"]  # provider-scoped: next provider
    world.clock.advance(2)
    assert [v.keys_available for v in world.client.views()] == [3, 1]


def test_a_rate_limit_without_a_hint_puts_the_key_out_for_this_request_only():
    world = World(p("A", keys=2), p("B"))
    assert world.request({"A/key1": verdict(RATE)})[0] == ["A/key1", "A/key2"]
    assert world.request({"A/key2": verdict(RATE)})[0] == ["A/key2", "A/key1"]  # key1 is back at once


def test_a_rate_limit_with_a_hint_cools_only_that_key():
    world = World(p("A", keys=2), p("B"))
    world.request({"A/key1": verdict(RATE, cooldown=20)})
    assert world.state("A") == "available"
    assert [v.keys_available for v in world.client.views()][0] == 1


def test_keys_wrap_from_the_current_key_each_once_then_the_next_provider():
    world = World(p("A", keys=3), p("B"))
    world.request({"A/key1": verdict(RATE)})  # key2 current
    tried, answer = world.request({"A/key2": verdict(AUTH), "A/key3": verdict(AUTH), "A/key1": verdict(QUOTA)})
    assert tried == ["A/key2", "A/key3", "A/key1", "B"]
    assert answer.provider.name == "B"


def test_all_keys_out_put_the_provider_out_until_its_soonest_key_is_back():
    world = World(p("A", keys=2), p("B"), reactivate_after=600)
    world.request({"A/key1": verdict(AUTH)})
    world.clock.advance(100)
    world.request({"A/key2": verdict(RATE, cooldown=50)})
    views = world.client.views()
    assert views[0].state == "cooling" and views[0].keys_available == 0
    assert views[0].retry_in == pytest.approx(50)  # the rate-limited key comes back first
    world.clock.advance(51)
    assert world.state("A") == "available"


def test_all_providers_out_answer_with_the_soonest_recovery():
    world = World(p("A", keys=2), p("B"), reactivate_after=600)
    tried, answer = world.request({"A/key1": verdict(QUOTA), "A/key2": verdict(RATE, cooldown=40),
                                   "B": verdict(OVERLOADED, cooldown=90)})
    assert tried == ["A/key1", "A/key2", "B"]
    assert (answer.status, answer.retry_after) == (429, 41)
    assert answer.message.endswith("retry in 40s")


def test_retry_after_is_capped_at_a_minute_and_the_message_says_the_real_wait():
    world = World(p("A"), p("B"))
    _, answer = world.request({"A": verdict(RATE, cooldown=3600), "B": verdict(SERVER, cooldown=3240)})
    assert (answer.status, answer.retry_after) == (503, 60)
    assert answer.message.endswith("retry in 54m")


def test_deactivated_soonest_answers_503_and_a_failure_without_a_hint_answers_retry_after_1():
    world = World(p("A"), p("B"), reactivate_after=30)
    _, answer = world.request({"A": verdict(AUTH), "B": verdict(RATE, cooldown=300)})
    assert (answer.status, answer.retry_after) == (503, 31)
    world = World(p("A"), p("B"))
    _, answer = world.request({"A": verdict(AUTH), "B": verdict(SERVER)})
    assert (answer.status, answer.retry_after) == (503, 1)


def test_no_providers_answers_503():
    world = World()
    assert world.request()[1].status == 503


# --------------------------------------------------------------------------- lanes (count_tokens)


def test_isolated_count_tokens_failures_move_only_their_own_cursor():
    world = World(p("A"), p("B"), isolate=True)
    lane = world.client.lane_for(True)
    assert lane == COUNT_TOKENS
    world.request({"A": verdict(SERVER, cooldown=30)}, lane=lane, count_tokens=True)
    assert world.request()[0] == ["A"]  # the conversation stays on A (cooldowns are per lane)
    assert world.request(lane=lane, count_tokens=True)[0] == ["B"]


def test_deactivation_is_shared_by_every_lane():
    world = World(p("A"), p("B"), isolate=True)
    world.request({"A": verdict(AUTH)}, lane=COUNT_TOKENS, count_tokens=True)
    assert world.request()[0] == ["B"]


def test_without_isolation_count_tokens_is_an_ordinary_request():
    world = World(p("A"), p("B"))
    assert world.client.lane_for(True) == MAIN


# --------------------------------------------------------------------------- the circuit breaker


def fail_a(world: World, times: int, kind: Kind = SERVER) -> None:
    for _ in range(times):
        world.client.set_current(None, world.client.providers[0], MAIN)  # each request starts at A
        world.request({"A": verdict(kind)})


def test_consecutive_counted_failures_open_the_breaker_and_it_is_tried_last():
    world = World(p("A"), p("B"))
    fail_a(world, 3)
    assert world.state("A") == "available"
    fail_a(world, 1)
    assert world.state("A") == "circuit_open"
    assert any("circuit opened" in e.message for e in world.walk.events)
    world.client.set_current(None, world.client.providers[0], MAIN)
    assert world.request()[0] == ["B"]  # skipped while another is available


def test_an_open_provider_is_still_tried_when_it_is_the_only_one_left():
    world = World(p("A"), p("B"))
    fail_a(world, 4)
    world.client.set_current(None, world.client.providers[0], MAIN)
    tried, answer = world.request({"B": verdict(SERVER)})
    assert tried == ["B", "A"] and isinstance(answer, Attempt) and answer.deferred
    single = World(p("solo"))
    for _ in range(4):
        single.request({"solo": verdict(SERVER)})
    assert single.state("solo") == "circuit_open"
    tried, answer = single.request()
    assert tried == ["solo"] and isinstance(answer, Attempt)  # never refused because of its breaker


def test_half_open_lets_one_probe_through_and_closes_after_enough_successes():
    world = World(p("A"), p("B"))
    fail_a(world, 4)
    world.clock.advance(61)
    assert world.state("A") == "half_open"
    world.client.set_current(None, world.client.providers[0], MAIN)
    first = world.client.walk()
    attempt = next(iter(first))
    assert attempt.provider.name == "A" and attempt.probe
    second = world.client.walk()  # while the probe is in flight, A is tried last
    assert next(iter(second)).provider.name == "B"
    first.committed(attempt)
    first.finished(attempt, success=True)
    assert world.state("A") == "half_open"
    tried, answer = world.request()
    assert tried == ["A"] and answer.probe
    assert world.state("A") == "available"
    assert any("circuit closed" in e.message for e in world.walk.events)


def test_a_counted_failure_while_half_open_opens_it_again():
    world = World(p("A"), p("B"))
    fail_a(world, 4)
    world.clock.advance(61)
    world.client.set_current(None, world.client.providers[0], MAIN)
    assert world.request({"A": verdict(TIMEOUT)})[0] == ["A", "B"]
    assert world.state("A") == "circuit_open"
    world.clock.advance(59)
    assert world.state("A") == "circuit_open"  # for another full open_timeout


def test_a_neutral_answer_releases_the_probe_and_neither_counts_nor_resets():
    world = World(p("A"), p("B"))
    fail_a(world, 3)
    world.client.set_current(None, world.client.providers[0], MAIN)
    world.request(finish=None)  # a 4xx returned as is
    fail_a(world, 1)
    assert world.state("A") == "circuit_open"  # the 4xx did not reset the count
    world.clock.advance(61)
    world.client.set_current(None, world.client.providers[0], MAIN)
    tried, answer = world.request(finish=None)
    assert answer.probe and world.state("A") == "half_open"
    assert world.request()[1].probe  # the permit was released: the next request probes


@pytest.mark.parametrize("kind", [AUTH, BILLING, QUOTA, RATE])
def test_key_scoped_outcomes_never_count_for_the_breaker(kind):
    world = World(p("A"), p("B"), reactivate_after=0)
    fail_a(world, 10, kind)
    assert world.state("A") == "available"


def test_a_success_resets_the_count():
    world = World(p("A"), p("B"))
    fail_a(world, 3)
    world.client.set_current(None, world.client.providers[0], MAIN)
    world.request()
    fail_a(world, 3)
    assert world.state("A") == "available"


def test_stalls_and_incomplete_streams_after_the_commit_point_count_and_move_the_cursor():
    world = World(p("A"), p("B"))
    for _ in range(4):
        world.client.set_current(None, world.client.providers[0], MAIN)
        walk = world.client.walk()
        attempt = next(iter(walk))
        walk.committed(attempt)
        walk.finished(attempt, success=False, reason="stalled", kind=Kind.TIMEOUT)
        assert world.client.current().name == "B"
    assert world.state("A") == "circuit_open"


def test_count_tokens_never_changes_a_breaker_nor_takes_the_probe():
    world = World(p("A"), p("B"))
    for _ in range(6):
        world.client.set_current(None, world.client.providers[0], MAIN)
        world.request({"A": verdict(SERVER)}, count_tokens=True)
    assert world.state("A") == "available"
    fail_a(world, 4)
    world.clock.advance(61)
    world.client.set_current(None, world.client.providers[0], MAIN)
    tried, answer = world.request(count_tokens=True)
    assert tried == ["B"]  # half-open is tried last for count_tokens, and the probe stays free
    world.client.set_current(None, world.client.providers[0], MAIN)
    assert world.request()[1].probe


def test_failure_threshold_zero_disables_the_breaker():
    world = World(p("A"), p("B"), breaker=BreakerSettings(failure_threshold=0, success_threshold=2,
                                                         open_timeout=60.0))
    fail_a(world, 20)
    assert world.state("A") == "available"


def test_panic_rule_short_outages_everywhere_degrade_to_plain_failover():
    world = World(p("A"), p("B"), p("C"))
    for _ in range(4):
        for name in "ABC":
            world.request({n: verdict(SERVER) for n in "ABC" if n != name} | {name: "ok"})
    states = {v.provider.name: v.state for v in world.client.views()}
    tried, answer = world.request()
    assert isinstance(answer, Attempt), f"a request was refused with breakers {states}"


# --------------------------------------------------------------------------- manual mode


def test_manual_mode_sends_everything_to_the_pinned_provider_and_records_nothing():
    world = World(p("A"), p("B", keys=2), pinned="B")
    tried, answer = world.request({"B": verdict(AUTH)})
    assert tried == ["B/key1"] and not isinstance(answer, Attempt)
    for _ in range(6):
        world.request({"B": verdict(SERVER, cooldown=30)})
    assert [v.state for v in world.client.views()] == ["available", "available"]
    assert len(world.store) == 0


# --------------------------------------------------------------------------- reloads


def test_state_survives_a_reload_for_unchanged_providers_and_starts_fresh_for_changed_ones():
    a, b, c = p("A", keys=2), p("B"), p("C")
    world = World(a, b, c)
    world.request({"A/key1": verdict(AUTH), "A/key2": verdict(AUTH)})  # A out; B current
    for _ in range(4):
        world.client.set_current(None, world.client.providers[2], MAIN)
        world.request({"C": verdict(SERVER)})
    assert world.state("C") == "circuit_open"
    world.reload(a, b, c, p("D"))  # a provider added: the others keep their state
    assert [world.state(n) for n in "ABCD"] == ["deactivated", "available", "circuit_open", "available"]
    assert world.client.current().name == "B"
    changed = Provider(name="A", base_url=a.base_url, api_keys=("sk-A-new-key-0123456789",))
    world.reload(changed, b, c)
    assert world.state("A") == "available"  # a changed key is a fresh start
    moved = Provider(name="C", base_url="http://elsewhere.invalid", api_keys=c.api_keys)
    world.reload(changed, b, moved)
    assert world.state("C") == "available"  # so is a changed base_url


def test_a_provider_fixed_by_a_reload_ahead_of_the_current_one_is_tried_at_once():
    a, b, c = p("A"), p("B"), p("C")
    world = World(a, b, c, reactivate_after=600)
    world.request({"A": verdict(AUTH)})  # A deactivated, B current
    previous = world.routing
    fixed = Provider(name="A", base_url=a.base_url, api_keys=("sk-A-fixed-0123456789",))
    world.reload(fixed, b, c)
    world.routing.revalidate(previous)
    assert world.request()[0] == ["A"]  # the edit is the re-validation
    previous = world.routing
    world.reload(fixed, b, c, p("D"))  # a provider added behind the current one changes nothing
    world.routing.revalidate(previous)
    assert world.client.current().name == "A"


def test_attempt_counters_go_on_across_a_reload():
    world = World(p("A"), p("B"))
    world.request({"A": verdict(SERVER)})
    previous = world.routing
    world.reload(p("A"), p("B"), p("C"))
    world.routing.carry_counters(previous)
    counters = world.client.counters
    assert (counters["A"].requests, counters["A"].failures, counters["B"].requests, counters["C"].requests) \
        == (1, 1, 1, 0)
