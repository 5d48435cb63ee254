"""Rate limits: per-key request and token buckets with an injected clock, in memory (RateLimiter) and in a
database (SharedRateLimiter on SQLite), which must behave the same."""

from __future__ import annotations

import pytest

from potstill.guard.ratelimit import RateLimited, RateLimiter
from potstill.guard.sharedlimit import SharedRateLimiter
from tests.limit_fixtures import admitted_by_threads


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


@pytest.fixture(params=["memory", "sqlite"])
def make(request, tmp_path):
    """A limiter factory: RateLimiter, or SharedRateLimiter on a fresh SQLite file per limiter."""
    made = []

    def build(rpm=None, tpm=None, clock=None):
        if request.param == "memory":
            return RateLimiter(rpm, tpm, clock=clock)
        from potstill.guard.db import make_engine

        made.append(make_engine(tmp_path / f"limits{len(made)}.db"))
        return SharedRateLimiter(made[-1], rpm, tpm, clock=clock)

    yield build
    for engine in made:
        engine.dispose()


def test_requests_per_minute_burst_then_refill(make):
    clock = Clock()
    lim = make(rpm=60, tpm=None, clock=clock)
    for _ in range(60):
        lim.acquire("k", tokens=10)
    with pytest.raises(RateLimited) as err:
        lim.acquire("k", tokens=10)
    assert err.value.limit == "requests" and err.value.retry_after == 1
    clock.t += 1.0  # 60/min -> one request per second
    lim.acquire("k", tokens=10)
    with pytest.raises(RateLimited):
        lim.acquire("k", tokens=10)
    lim.acquire("other", tokens=10)  # keys are independent


def test_tokens_charged_up_front_and_refunded(make):
    clock = Clock()
    lim = make(rpm=None, tpm=600, clock=clock)
    a = lim.acquire("k", tokens=400)  # prompt + max_tokens
    with pytest.raises(RateLimited) as err:
        lim.acquire("k", tokens=300)
    # 100 tokens missing at 10 tokens/s -> 10 s
    assert err.value.limit == "tokens" and err.value.retry_after == 10
    lim.settle(a, used_tokens=150)  # refund 250
    lim.settle(a, used_tokens=0)  # settling twice refunds nothing more
    lim.acquire("k", tokens=300)  # 200 + 250 refunded - 300 = 150 left
    with pytest.raises(RateLimited):
        lim.acquire("k", tokens=200)
    lim.acquire("k", tokens=150)


def test_request_larger_than_the_limit_and_retry_after_rounding(make):
    clock = Clock()
    lim = make(rpm=7, tpm=100, clock=clock)
    with pytest.raises(RateLimited, match="Request too large"):
        lim.acquire("k", tokens=101)
    for _ in range(7):
        lim.acquire("k", tokens=1)
    clock.t += 8.0  # 7/60 per s -> 0.93 request refilled
    with pytest.raises(RateLimited) as err:
        lim.acquire("k", tokens=1)
    assert err.value.retry_after == 1  # ceil(0.57 s), never 0


def test_per_key_limits_override_defaults_and_changes_apply_at_once(make):
    clock = Clock()
    lim = make(rpm=100, tpm=None, clock=clock)
    for _ in range(3):
        lim.acquire("k", tokens=1, rpm=3)
    with pytest.raises(RateLimited):
        lim.acquire("k", tokens=1, rpm=3)
    lim.acquire("k", tokens=1, rpm=None)  # raised to the default: the extra 97 are available at once
    assert lim.limits(None, 5) == (100, 5)
    lim2 = make(rpm=100, clock=clock)
    for _ in range(50):
        lim2.acquire("k", tokens=1)
    for _ in range(10):  # throttled to 10/min: the 50 left clamp to 10
        lim2.acquire("k", tokens=1, rpm=10)
    with pytest.raises(RateLimited):
        lim2.acquire("k", tokens=1, rpm=10)


def test_thread_safe_exact_admissions(make):
    assert admitted_by_threads(make(rpm=500, tpm=None, clock=Clock())) == 500


def test_unlimited(make):
    lim = make(rpm=None, tpm=None, clock=Clock())
    for _ in range(10_000):  # raises RateLimited at the first refusal
        assert lim.acquire("k", tokens=10**6).tokens == 10**6


def test_resize_charges_the_prompt_after_tokenising(make):
    """The server charges max_tokens + 1 before tokenising, then resizes to prompt + max_tokens."""
    clock = Clock()
    lim = make(rpm=None, tpm=1000, clock=clock)
    res = lim.acquire("k", tokens=101)
    lim.resize(res, 300)  # the prompt turned out to be 200 tokens
    assert lim.level("k") == 700
    with pytest.raises(RateLimited, match="Request too large"):
        lim.resize(res, 1001)
    other = lim.acquire("k", tokens=600)
    with pytest.raises(RateLimited) as err:
        lim.resize(other, 701)  # 101 more than the 100 left
    assert err.value.limit == "tokens" and err.value.retry_after >= 1 and lim.level("k") == 100
    lim.settle(other, 0)  # refused after the charge: its tokens come back, the request stays counted
    lim.resize(res, 250)  # shrinking refunds the difference
    lim.settle(res, 250)
    assert lim.level("k") == 750


def test_settling_more_than_reserved_charges_the_excess(make):
    """The gateway settles to the upstream's usage, which may exceed its estimate: the excess is charged (debt)."""
    clock = Clock()
    lim = make(rpm=None, tpm=600, clock=clock)
    res = lim.acquire("k", tokens=500)
    lim.settle(res, used_tokens=700)  # 200 more than reserved
    assert lim.level("k") == -100
    with pytest.raises(RateLimited) as err:
        lim.acquire("k", tokens=1)
    assert err.value.retry_after == 11  # 101 tokens at 10/s
