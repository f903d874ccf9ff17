import pytest

from proxy.budget import RetryBudget
from ..conftest import FakeClock as Clock


def test_floor_allows_min_per_second_times_window_without_requests():
    clock = Clock()
    b = RetryBudget(ratio=0.0, min_per_second=0.5, window=10.0, clock=clock)
    assert [b.withdraw() for _ in range(6)] == [True] * 5 + [False]


def test_ratio_of_requests_in_window():
    clock = Clock()
    b = RetryBudget(ratio=0.2, min_per_second=0.0, window=10.0, clock=clock)
    for _ in range(10):
        b.deposit()
    assert [b.withdraw() for _ in range(3)] == [True, True, False]


def test_window_slides_and_forgets():
    clock = Clock()
    b = RetryBudget(ratio=0.5, min_per_second=0.0, window=10.0, clock=clock)
    for _ in range(4):
        b.deposit()
    assert b.withdraw() and b.withdraw() and not b.withdraw()
    clock.t += 5.0  # half a window: the old requests and retries still count
    assert not b.withdraw()
    clock.t += 5.0  # a whole window later: forgotten, and no new requests
    assert not b.withdraw()
    b.deposit()
    b.deposit()
    assert b.withdraw() and not b.withdraw()


def test_long_idle_gap_resets_everything():
    clock = Clock()
    b = RetryBudget(ratio=1.0, min_per_second=0.0, window=1.0, clock=clock)
    b.deposit()
    assert b.withdraw()
    clock.t += 3600
    assert not b.withdraw()


def test_rejects_nonsense():
    with pytest.raises(ValueError):
        RetryBudget(ratio=-1, min_per_second=0, window=1, clock=Clock())
