"""bench/interleaved_step_time.py's spread: the interquartile range it reports lies within the measured times."""

import interleaved_step_time as bench


def test_interquartile_range_within_the_measured_times():
    # statistics.quantiles' default ("exclusive") extrapolates beyond the data for few rounds: 2 rounds of 14 and
    # 52 ms were reported with an IQR of 5-62 ms
    for times in ([0.014, 0.052], [0.01, 0.02, 0.09], [0.3, 0.1, 0.2, 0.5, 0.4]):
        lo, hi = bench._quartiles(times)
        assert min(times) <= lo <= hi <= max(times)
    assert bench._quartiles([0.1, 0.2, 0.3, 0.4, 0.5]) == (0.2, 0.4)
