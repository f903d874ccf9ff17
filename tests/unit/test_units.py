import pytest

from proxy.units import format_duration, format_size, parse_duration, parse_size


@pytest.mark.parametrize("text, seconds", [
    ("250ms", 0.25), ("5s", 5.0), ("2m", 120.0), ("1h", 3600.0), ("1.5s", 1.5), (" 10ms ", 0.01),
])
def test_parse_duration_units(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("bad", ["fast", "5", 5, "5 sec", "-1s", "", None, "1d"])
def test_parse_duration_rejects_without_unit(bad):
    with pytest.raises(ValueError, match="expected a duration"):
        parse_duration(bad)


@pytest.mark.parametrize("text, n", [("64KiB", 65536), ("1MiB", 1 << 20), ("2GiB", 2 << 30), ("10KB", 10000),
                                     ("512", 512), (0, 0), (1024, 1024)])
def test_parse_size(text, n):
    assert parse_size(text) == n


@pytest.mark.parametrize("bad", ["big", "1.5MiB", -1, True, "1 TiB"])
def test_parse_size_rejects(bad):
    with pytest.raises(ValueError, match="expected a size"):
        parse_size(bad)


@pytest.mark.parametrize("seconds, text", [(0.25, "250ms"), (5, "5s"), (120, "2m"), (900, "15m"), (3600, "1h"),
                                           (1.5, "1500ms"), (0.0005, "0.5ms")])
def test_format_duration_round_trips(seconds, text):
    assert format_duration(seconds) == text
    assert parse_duration(text) == pytest.approx(seconds)


def test_format_size():
    assert format_size(1 << 20) == "1MiB"
    assert format_size(1000) == "1000"
