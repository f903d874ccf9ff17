import math

import pytest

from proxy.backoff import backoff_delay, parse_retry_after


@pytest.mark.parametrize("retry, ceiling", [(1, 0.5), (2, 1.0), (3, 2.0), (4, 4.0), (5, 8.0), (6, 8.0), (200, 8.0)])
def test_full_jitter_ceiling_doubles_to_the_cap(retry, ceiling):
    assert backoff_delay(retry, 0.5, 8.0, 2.0, lambda: 0.999999) == pytest.approx(ceiling, rel=1e-5)
    assert backoff_delay(retry, 0.5, 8.0, 2.0, lambda: 0.0) == 0.0
    assert backoff_delay(retry, 0.5, 8.0, 2.0, lambda: 0.5) == pytest.approx(ceiling / 2)


def test_huge_attempt_numbers_do_not_overflow():
    assert backoff_delay(10_000, 0.001, 8.0, 10.0, lambda: 0.5) == 4.0
    assert backoff_delay(10_000, 1.0, 1.0, 1.0, lambda: 0.5) == 0.5


NOW = 1_800_000_000.0


@pytest.mark.parametrize("headers, expected", [
    ({"retry-after-ms": "150", "retry-after": "9"}, (0.15, "retry-after-ms")),
    ({"retry-after-ms": "12.5"}, (0.0125, "retry-after-ms")),
    ({"retry-after": "2"}, (2.0, "retry-after")),
    ({"retry-after": "0.5"}, (0.5, "retry-after")),
    ({"retry-after-ms": "junk", "retry-after": "3"}, (3.0, "retry-after")),
    ({"retry-after": "-1"}, None),
    ({"retry-after": "nan"}, None),
    ({"retry-after": "inf"}, None),
    ({"retry-after": "soon"}, None),
    ({}, None),
])
def test_parse_retry_after_precedence(headers, expected):
    got = parse_retry_after(headers, NOW)
    if expected is None:
        assert got is None
    else:
        assert got is not None and got[1] == expected[1] and math.isclose(got[0], expected[0])


def test_parse_retry_after_http_date():
    from email.utils import formatdate
    assert parse_retry_after({"retry-after": formatdate(NOW + 7, usegmt=True)}, NOW) == (7.0, "retry-after")
    assert parse_retry_after({"retry-after": formatdate(NOW - 7, usegmt=True)}, NOW) == (0.0, "retry-after")
