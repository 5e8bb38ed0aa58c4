"""The failover state (SPEC §4.2, §4.3 bookkeeping, §4.4, §4.6) with a fake clock, no sockets.

classify.py decides what an outcome means (tests/test_classify.py); these
tests feed verdicts straight into a ProviderPool and check which providers a
request would try, in which order, and what clipal answers when none is left.
"""

from __future__ import annotations

import pytest

from clipal.classify import Kind, Verdict
from clipal.config import Provider
from clipal.failover import COUNT_TOKENS, MAIN, FailoverState, ProviderPool


class FakeClock:
    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def p(name: str, priority: int = 1, enabled: bool = True) -> Provider:
    return Provider(name=name, base_url=f"http://{name.lower()}.invalid", api_keys=(f"sk-{name}",),
                    priority=priority, enabled=enabled)


# Verdicts as classify.py hands them over (only the fields the pool reads matter).
def server_error(cooldown: float | None = None) -> Verdict:
    return Verdict(True, Kind.SERVER_ERROR, False, cooldown, "server error (503)")


def rate_limited(cooldown: float | None = None) -> Verdict:
    return Verdict(True, Kind.RATE_LIMIT, False, cooldown, "rate limited (429)")


def overloaded(cooldown: float | None = None) -> Verdict:
    return Verdict(True, Kind.OVERLOADED, False, cooldown, "overloaded (529)")


def auth(cooldown: float | None = None) -> Verdict:
    return Verdict(True, Kind.AUTH, True, cooldown, "auth error (401)")


def quota(cooldown: float | None = None) -> Verdict:
    return Verdict(True, Kind.QUOTA, True, cooldown, "quota exhausted (429)")


def billing() -> Verdict:
    return Verdict(True, Kind.BILLING, True, None, "billing error (402)")


def make_pool(*providers: Provider, reactivate_after: float = 3600.0, isolate: bool = False,
              clock: FakeClock | None = None) -> tuple[ProviderPool, FakeClock]:
    clock = clock or FakeClock()
    pool = ProviderPool(tuple(providers), reactivate_after=reactivate_after,
                        isolate_count_tokens=isolate, clock=clock)
    return pool, clock


def names(pool: ProviderPool, lane: str = MAIN) -> list[str]:
    return [provider.name for provider in pool.candidates(lane)]


def by_name(pool: ProviderPool, name: str) -> Provider:
    return next(provider for provider in pool.providers if provider.name == name)


# --------------------------------------------------------------------------- order (§4.2)


def test_order_is_by_priority_with_ties_in_file_order_and_disabled_left_out():
    pool, _ = make_pool(p("slow", 3), p("first", 1), p("off", 1, enabled=False), p("second", 1),
                        p("middle", 2))
    assert [provider.name for provider in pool.providers] == ["first", "second", "middle", "slow"]
    assert names(pool) == ["first", "second", "middle", "slow"]
    assert pool.current().name == "first"


def test_no_enabled_providers_means_no_candidates_and_503():
    pool, _ = make_pool(p("off", enabled=False))
    assert names(pool) == []
    assert pool.current() is None
    answer = pool.unavailable()
    assert (answer.status, answer.retry_after) == (503, 1)


def test_candidates_walk_from_the_current_provider_wrapping_each_once():
    pool, _ = make_pool(p("A"), p("B"), p("C"), p("D"))
    pool.succeeded(by_name(pool, "C"))
    assert names(pool) == ["C", "D", "A", "B"]


def test_success_makes_the_provider_current_so_later_requests_stick_to_it():
    pool, _ = make_pool(p("A"), p("B"), p("C"))
    pool.failed(by_name(pool, "A"), server_error())
    pool.succeeded(by_name(pool, "B"))
    # A failed without a cooldown, so it is available again - but B stays current.
    for _ in range(3):
        assert names(pool) == ["B", "C", "A"]
        assert pool.current().name == "B"


def test_a_failure_moves_the_cursor_past_the_failed_provider():
    pool, _ = make_pool(p("A"), p("B"), p("C"))
    pool.failed(by_name(pool, "A"), server_error())
    assert names(pool) == ["B", "C", "A"]
    pool.failed(by_name(pool, "B"), server_error())
    pool.failed(by_name(pool, "C"), server_error())
    assert names(pool) == ["A", "B", "C"]  # wrapped around


def test_a_failure_of_a_provider_that_is_not_current_leaves_the_cursor_alone():
    # A concurrent request already moved on; its late failure report must not
    # push the cursor off the provider that is working now.
    pool, _ = make_pool(p("A"), p("B"), p("C"))
    pool.failed(by_name(pool, "A"), server_error())
    pool.succeeded(by_name(pool, "B"))
    pool.failed(by_name(pool, "A"), server_error())
    assert pool.current().name == "B"


def test_outcomes_of_providers_missing_from_this_configuration_are_ignored():
    pool, _ = make_pool(p("A"), p("B"))
    ghost = p("ghost")
    assert pool.failed(ghost, auth()) is None
    pool.succeeded(ghost)
    assert names(pool) == ["A", "B"]


def test_candidates_respect_an_outage_recorded_while_the_walk_is_under_way():
    pool, _ = make_pool(p("A"), p("B"), p("C"))
    walk = pool.candidates()
    assert next(walk).name == "A"
    pool.failed(by_name(pool, "B"), auth())  # a concurrent request deactivates B
    assert [provider.name for provider in walk] == ["C"]


# --------------------------------------------------------------------------- deactivation


@pytest.mark.parametrize("verdict", [auth(), billing(), quota()], ids=["auth", "billing", "quota"])
def test_deactivated_providers_are_skipped_until_reactivate_after_has_passed(verdict):
    pool, clock = make_pool(p("A"), p("B"), p("C"), reactivate_after=600)
    outage = pool.failed(by_name(pool, "A"), verdict)
    assert outage is not None and outage.until == clock.now + 600 and outage.kind is verdict.kind
    pool.succeeded(by_name(pool, "B"))
    pool.failed(by_name(pool, "B"), server_error())  # the walk would reach A again ...
    assert names(pool) == ["C", "B"]  # ... but A is out
    assert not pool.is_available(by_name(pool, "A"))

    clock.advance(599.9)
    assert pool.expire() == []
    assert "A" not in names(pool)

    clock.advance(0.1)
    assert pool.expire() == ["A"]  # reported once, so the proxy can log the reactivation
    assert pool.expire() == []
    assert names(pool) == ["C", "A", "B"]


def test_deactivation_ignores_the_hint_and_lasts_reactivate_after():
    pool, clock = make_pool(p("A"), p("B"), reactivate_after=100)
    pool.failed(by_name(pool, "A"), auth(cooldown=5))
    clock.advance(50)
    assert pool.outage(by_name(pool, "A")).until == 1100
    assert names(pool) == ["B"]


def test_a_deactivated_provider_comes_back_even_without_expire_being_called():
    pool, clock = make_pool(p("A"), p("B"), reactivate_after=10)
    pool.failed(by_name(pool, "A"), auth())
    clock.advance(10)
    assert names(pool) == ["B", "A"]


def test_reactivate_after_zero_never_deactivates():
    pool, clock = make_pool(p("A"), p("B"), reactivate_after=0)
    for verdict in (auth(), billing(), quota()):
        assert pool.failed(by_name(pool, "A"), verdict) is None
        assert pool.is_available(by_name(pool, "A"))
    # Failover still happened: the cursor moved on, and A is still in the walk.
    assert names(pool) == ["B", "A"]
    assert pool.expire() == []


def test_reactivate_after_zero_still_honours_a_hinted_wait():
    pool, clock = make_pool(p("A"), p("B"), reactivate_after=0)
    outage = pool.failed(by_name(pool, "A"), quota(cooldown=30))
    assert outage is not None and outage.until == clock.now + 30
    assert names(pool) == ["B"]
    clock.advance(30)
    assert names(pool) == ["B", "A"]


# --------------------------------------------------------------------------- cooldowns


@pytest.mark.parametrize("verdict", [rate_limited(20), overloaded(20), server_error(20)],
                         ids=["rate_limit", "overloaded", "server_error"])
def test_a_hinted_cooldown_skips_the_provider_until_it_expires(verdict):
    pool, clock = make_pool(p("A"), p("B"))
    outage = pool.failed(by_name(pool, "A"), verdict)
    assert outage.until == clock.now + 20
    assert names(pool) == ["B"]
    clock.advance(19.99)
    assert names(pool) == ["B"]
    clock.advance(0.01)
    assert pool.expire() == []  # a cooldown ending is not a reactivation
    assert names(pool) == ["B", "A"]


def test_a_failure_without_a_hint_does_not_cool_down():
    pool, _ = make_pool(p("A"), p("B"))
    for verdict in (rate_limited(), overloaded(), server_error()):
        assert pool.failed(by_name(pool, "A"), verdict) is None
        assert pool.is_available(by_name(pool, "A"))


def test_a_shorter_hint_does_not_shorten_a_running_cooldown():
    pool, clock = make_pool(p("A"), p("B"))
    pool.failed(by_name(pool, "A"), rate_limited(60))
    clock.advance(1)
    outage = pool.failed(by_name(pool, "A"), rate_limited(5))
    assert outage.until == 1060
    clock.advance(30)
    assert names(pool) == ["B"]


def test_state_is_per_provider():
    pool, clock = make_pool(p("A"), p("B"), p("C"))
    pool.failed(by_name(pool, "A"), rate_limited(10))
    pool.failed(by_name(pool, "B"), auth())
    assert names(pool) == ["C"]
    clock.advance(10)
    assert names(pool) == ["C", "A"]


def test_state_is_per_client():
    clock = FakeClock()
    state = FailoverState({"codex": (p("A"), p("B")), "gemini": (p("A"), p("B"))},
                          reactivate_after=60, isolate_count_tokens=False, clock=clock)
    codex, gemini = state.pool("codex"), state.pool("gemini")
    codex.failed(by_name(codex, "A"), auth())
    assert names(codex) == ["B"]
    assert names(gemini) == ["A", "B"]


# --------------------------------------------------------------------------- count_tokens (§4.6)


def test_isolated_count_tokens_failures_move_only_the_count_tokens_cursor():
    pool, _ = make_pool(p("A"), p("B"), isolate=True)
    lane = pool.lane_for(True)
    assert lane == COUNT_TOKENS and pool.lane_for(False) == MAIN
    pool.failed(by_name(pool, "A"), server_error(), lane)
    pool.succeeded(by_name(pool, "B"), lane)
    assert names(pool, COUNT_TOKENS) == ["B", "A"]
    assert names(pool, MAIN) == ["A", "B"]  # the conversation stays on A (and its prompt cache)
    assert pool.current(MAIN).name == "A" and pool.current(COUNT_TOKENS).name == "B"


def test_isolated_count_tokens_cooldowns_do_not_push_the_conversation_off_its_provider():
    pool, clock = make_pool(p("A"), p("B"), isolate=True)
    pool.failed(by_name(pool, "A"), rate_limited(30), COUNT_TOKENS)
    assert names(pool, COUNT_TOKENS) == ["B"]
    assert names(pool, MAIN) == ["A", "B"]
    # ... and the reverse: the conversation's cooldown does not bench count_tokens' provider.
    pool.failed(by_name(pool, "B"), overloaded(30), MAIN)
    assert names(pool, MAIN) == ["A"]
    assert names(pool, COUNT_TOKENS) == ["B"]


@pytest.mark.parametrize("verdict", [auth(), billing()], ids=["auth", "billing"])
def test_isolated_count_tokens_deactivation_still_applies_to_both_lanes(verdict):
    pool, clock = make_pool(p("A"), p("B"), isolate=True, reactivate_after=60)
    pool.failed(by_name(pool, "A"), verdict, COUNT_TOKENS)
    assert names(pool, COUNT_TOKENS) == ["B"]
    assert names(pool, MAIN) == ["B"]
    clock.advance(60)
    assert pool.expire() == ["A"]
    assert names(pool, MAIN) == ["A", "B"]  # the main cursor never moved


def test_without_isolation_count_tokens_is_an_ordinary_request():
    pool, _ = make_pool(p("A"), p("B"), isolate=False)
    lane = pool.lane_for(True)
    assert lane == MAIN
    pool.failed(by_name(pool, "A"), rate_limited(30), lane)
    pool.succeeded(by_name(pool, "B"), lane)
    assert names(pool, pool.lane_for(False)) == ["B"]


# --------------------------------------------------------------------------- nothing left (§4.4)


def test_all_rate_limited_answers_429_with_whole_seconds_plus_one():
    pool, clock = make_pool(p("A"), p("B"))
    pool.failed(by_name(pool, "A"), rate_limited(30))
    pool.failed(by_name(pool, "B"), rate_limited(12.5))
    answer = pool.unavailable()
    assert (answer.status, answer.retry_after) == (429, 13)
    clock.advance(10)  # 2.5 s left on B
    assert pool.unavailable().retry_after == 3
    clock.advance(2.4)  # 0.1 s left
    assert pool.unavailable().retry_after == 1


def test_soonest_overloaded_answers_429():
    pool, _ = make_pool(p("A"), p("B"), reactivate_after=600)
    pool.failed(by_name(pool, "A"), auth())
    pool.failed(by_name(pool, "B"), overloaded(40))
    answer = pool.unavailable()
    assert (answer.status, answer.retry_after) == (429, 41)


def test_soonest_deactivated_answers_503():
    pool, _ = make_pool(p("A"), p("B"), reactivate_after=60)
    pool.failed(by_name(pool, "A"), quota())
    pool.failed(by_name(pool, "B"), rate_limited(300))
    answer = pool.unavailable()
    assert (answer.status, answer.retry_after) == (503, 60)  # 61 s away: the header is capped
    assert answer.message.endswith("retry in 1m")


@pytest.mark.parametrize("cooldown,status,told", [(3600, 429, "retry in 1h"), (3240, 429, "retry in 54m")])
def test_retry_after_is_capped_at_a_minute_while_the_message_says_the_real_wait(cooldown, status, told):
    pool, _ = make_pool(p("A"), p("B"))
    pool.failed(by_name(pool, "A"), rate_limited(cooldown))
    pool.failed(by_name(pool, "B"), rate_limited(cooldown))
    answer = pool.unavailable()
    assert (answer.status, answer.retry_after) == (status, 60)
    assert answer.message.endswith(told)


def test_a_wait_under_a_minute_is_not_changed_by_the_cap():
    pool, _ = make_pool(p("A"))
    pool.failed(by_name(pool, "A"), rate_limited(58.5))
    assert pool.unavailable().retry_after == 59


@pytest.mark.parametrize("verdict", [server_error(20), Verdict(True, Kind.TIMEOUT, False, 20, "timeout (408)")],
                         ids=["server_error", "timeout"])
def test_soonest_cooling_for_another_reason_answers_503(verdict):
    pool, _ = make_pool(p("A"), p("B"))
    pool.failed(by_name(pool, "A"), verdict)
    pool.failed(by_name(pool, "B"), rate_limited(300))
    answer = pool.unavailable()
    assert (answer.status, answer.retry_after) == (503, 21)


def test_a_provider_both_deactivated_and_cooling_recovers_at_the_later_time():
    pool, clock = make_pool(p("A"), reactivate_after=50)
    pool.failed(by_name(pool, "A"), rate_limited(5))
    pool.failed(by_name(pool, "A"), auth())
    assert (pool.unavailable().status, pool.unavailable().retry_after) == (503, 51)
    clock.advance(5)
    assert names(pool) == []

    pool, clock = make_pool(p("A"), reactivate_after=10)
    pool.failed(by_name(pool, "A"), auth())
    pool.failed(by_name(pool, "A"), rate_limited(100))
    clock.advance(10)
    assert pool.expire() == ["A"]
    assert names(pool) == []  # still cooling
    assert (pool.unavailable().status, pool.unavailable().retry_after) == (429, 60)  # 91 s, capped


def test_every_attempt_failed_without_cooldowns_answers_503_retry_after_1():
    pool, _ = make_pool(p("A"), p("B"))
    pool.failed(by_name(pool, "A"), server_error())
    pool.failed(by_name(pool, "B"), rate_limited())
    answer = pool.unavailable()
    assert (answer.status, answer.retry_after) == (503, 1)


def test_a_failure_without_cooldown_next_to_cooling_providers_answers_503_retry_after_1():
    # B may well work on an immediate retry, so "come back in 30 s" would be wrong.
    pool, _ = make_pool(p("A"), p("B"))
    pool.failed(by_name(pool, "A"), rate_limited(30))
    pool.failed(by_name(pool, "B"), server_error())
    answer = pool.unavailable()
    assert (answer.status, answer.retry_after) == (503, 1)


def test_count_tokens_lane_answers_from_its_own_cooldowns():
    pool, _ = make_pool(p("A"), isolate=True)
    pool.failed(by_name(pool, "A"), rate_limited(30), COUNT_TOKENS)
    assert pool.unavailable(COUNT_TOKENS).status == 429
    assert pool.unavailable(MAIN).retry_after == 1
