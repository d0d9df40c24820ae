"""scripts/bench_stats.py: the benchmarks' interleaving, medians, spreads and table, on
known inputs."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import numpy as np
import pytest

from scripts.bench_stats import (
    Spread,
    boxplot,
    can_set_cores_apart,
    cores_apart,
    interleave,
    paired_ratios,
    quantile,
    set_thread_affinity,
    table,
    target_line,
    wait_until_quiet,
)


@pytest.mark.parametrize("values", [[1.0], [3.0, 1.0], [5.0, 1.0, 4.0, 2.0, 3.0],
                                    [0.9, 1.3, 0.7, 1.1, 1.0, 1.6, 0.95, 1.05]])
@pytest.mark.parametrize("q", [0.0, 0.25, 0.5, 0.75, 1.0])
def test_quantile_matches_numpy(values, q):
    assert quantile(values, q) == pytest.approx(float(np.percentile(values, 100 * q)))


def test_spread_of_known_values():
    s = Spread.of([5, 1, 4, 2, 3])
    assert (s.median, s.min, s.max, s.q1, s.q3, s.iqr) == (3, 1, 5, 2, 4, 2)
    assert s.format() == "3.00 [1.00-5.00] IQR 2.00"
    even = Spread.of([1.0, 2.0, 3.0, 10.0])
    assert even.median == 2.5 and even.q1 == 1.75 and even.q3 == 4.75
    d = even.as_dict()
    assert d["values"] == [1.0, 2.0, 3.0, 10.0] and d["n"] == 4 and d["iqr"] == 3.0


def test_empty_spread_is_nan_not_an_error():
    s = Spread.of([])
    assert math.isnan(s.median) and math.isnan(s.iqr) and math.isnan(s.min)


def test_within_checks_both_ends_against_the_median():
    tight = Spread.of([0.90, 0.92, 0.93, 0.94, 0.96])  # median 0.93, min-max -0.03/+0.03
    assert tight.within(0.05) == {"minmax": True, "iqr": True}
    one_outlier = Spread.of([0.80, 0.92, 0.93, 0.94, 0.96])  # min is 0.13 below
    assert one_outlier.within(0.05) == {"minmax": False, "iqr": True}
    wide = Spread.of([0.70, 0.80, 0.93, 1.05, 1.20])
    assert wide.within(0.05) == {"minmax": False, "iqr": False}
    assert Spread.of([1.0, 1.05]).within(0.025) == {"minmax": True, "iqr": True}  # edge


def test_target_line_says_which_spread_is_within():
    assert target_line("r", Spread.of([0.90, 0.92, 0.93, 0.94, 0.96]), 0.05) == (
        "spread target ±0.05 for r: met (min-max -0.030/+0.030 within; IQR -0.010/+0.010 within)")
    line = target_line("r", Spread.of([0.80, 0.92, 0.93, 0.94, 0.96]), 0.05)
    assert "met by IQR only" in line and "min-max -0.130/+0.030 NOT within" in line
    # just over the edge: three decimals show why it is not within
    assert "min-max -0.051/+0.010 NOT within" in target_line(
        "r", Spread.of([0.549, 0.6, 0.6, 0.61, 0.61]), 0.05)
    assert "NOT met" in target_line("r", Spread.of([0.7, 0.8, 0.93, 1.05, 1.2]), 0.05)


def test_interleave_runs_a_b_a_b_and_keeps_each_runs_results():
    calls = []
    switches = []

    def run(name):
        def go(rep):
            calls.append((name, rep))
            return f"{name}{rep}"
        return go

    out = interleave({"A": run("A"), "B": run("B")}, 3,
                     between=lambda name, rep: switches.append((name, rep)))
    assert calls == [("A", 0), ("B", 0), ("A", 1), ("B", 1), ("A", 2), ("B", 2)]
    assert switches == calls
    assert out == {"A": ["A0", "A1", "A2"], "B": ["B0", "B1", "B2"]}
    with pytest.raises(ValueError):
        interleave({"A": run("A")}, 0)


def test_paired_ratios_pair_the_same_repetition():
    a, b = [2.0, 3.0, 4.0], [1.0, 2.0, 8.0]
    assert paired_ratios(a, b) == [2.0, 1.5, 0.5]
    # the median of per-repetition ratios, not the ratio of medians
    assert Spread.of(paired_ratios(a, b)).median == 1.5
    assert np.median(a) / np.median(b) == 1.5  # equal here by chance; differ below
    assert Spread.of(paired_ratios([1.0, 10.0, 3.0], [1.0, 2.0, 6.0])).median == 1.0
    assert math.isnan(paired_ratios([1.0], [0.0])[0])
    with pytest.raises(ValueError):
        paired_ratios([1.0], [1.0, 2.0])


def test_table_aligns_median_min_max_and_iqr():
    lines = table({"service/raw": Spread.of([0.9, 1.0, 1.1]),
                   "b8/b1": Spread.of([1.25, 1.5, 1.3, 1.4, 1.45])})
    assert lines[0].split() == ["figure", "median", "[min-max]", "IQR", "n"]
    assert lines[2].split() == ["service/raw", "1.00", "[0.90-1.10]", "0.10", "3"]
    assert lines[3].split() == ["b8/b1", "1.40", "[1.25-1.50]", "0.15", "5"]
    assert len({len(line) for line in lines}) == 1  # columns line up


def test_boxplot_draws_one_box_per_figure():
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    boxplot(ax, {"a": [1, 2, 3], "b": [2, 3, 4, 5, 6]}, ylabel="x", reference=1.0)
    assert [t.get_text() for t in ax.get_xticklabels()] == ["a", "b"]
    plt.close(fig)


def test_wait_until_quiet_returns_after_the_first_quiet_window_or_the_timeout():
    samples = iter([1.5, 0.9, 0.1, 2.0])
    seen: list[float] = []

    def busy(window_s: float) -> float:
        seen.append(window_s)
        return next(samples)

    waited = wait_until_quiet(below_cores=0.3, window_s=0.0, timeout_s=60.0, busy_cores=busy)
    assert seen == [0.0, 0.0, 0.0]  # stopped at the first quiet window (0.1 cores)
    assert 0.0 <= waited < 60.0
    always_busy = wait_until_quiet(below_cores=0.3, window_s=0.0, timeout_s=0.05,
                                   busy_cores=lambda _: 2.0)
    assert always_busy >= 0.05  # gave up at the timeout instead of waiting for ever
    with pytest.raises(ValueError):
        wait_until_quiet(below_cores=0.0, window_s=0.1, timeout_s=1.0)


def _thread_cores(pid: int) -> list[set[int]]:
    return [os.sched_getaffinity(int(tid)) for tid in os.listdir(f"/proc/{pid}/task")]


@pytest.mark.skipif(not can_set_cores_apart(), reason="needs Linux thread affinity, 2+ cores")
def test_cores_apart_gives_the_caller_one_core_and_every_thread_of_the_others_the_rest():
    # real processes: a neighbour with 4 threads (the idle service's stand-in) and a helper
    # of the caller (its Redis's stand-in)
    code = ("import threading, time\n"
            "for _ in range(3): threading.Thread(target=time.sleep, args=(60,), daemon=True).start()\n"
            "print('ready', flush=True); time.sleep(60)\n")
    neighbour = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    helper = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert neighbour.stdout.readline().strip() == "ready"
        assert helper.stdout.readline().strip() == "ready"
        allowed = os.sched_getaffinity(0)
        with cores_apart([helper.pid], lambda: [neighbour.pid]) as moved:
            mine = os.sched_getaffinity(0)
            assert len(mine) == 1 and mine < allowed
            assert moved == 4 and _thread_cores(neighbour.pid) == [allowed - mine] * 4
            assert _thread_cores(helper.pid) == [mine] * 4
        assert os.sched_getaffinity(0) == allowed
        assert _thread_cores(neighbour.pid) == [allowed] * 4
        assert _thread_cores(helper.pid) == [allowed] * 4
    finally:
        for process in (neighbour, helper):
            process.kill()
            process.wait()


def test_set_thread_affinity_skips_processes_that_are_gone():
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    assert set_thread_affinity([gone.pid], {0}) == 0
