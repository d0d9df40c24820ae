"""Repetitions and spreads for the benchmarks: run configurations interleaved, report noise.

A benchmark that compares configurations A and B runs them A B A B ... (``interleave``),
so slow changes in the machine's load hit both alike, and computes each ratio per
repetition from the adjacent A and B runs (``paired_ratios``). A figure is then reported
as its median with its spread, ``median [min-max] IQR q1-q3`` (``Spread``, ``table``), and
a ratio's spread can be checked against a target (``Spread.within``).

Quartiles are numpy's default (linear interpolation between order statistics), so the
figures here match ``np.percentile``. No dependency beyond the standard library.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

MIN_REPETITIONS = 5


def quantile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1) by linear interpolation, as ``np.percentile(values, 100 q)``."""
    if not values:
        return math.nan
    ordered = sorted(values)
    position = (len(ordered) - 1) * q
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


@dataclass(frozen=True)
class Spread:
    """One figure over its repetitions: median, min-max and the interquartile range."""

    values: tuple[float, ...]

    @classmethod
    def of(cls, values: Iterable[float]) -> Spread:
        return cls(tuple(float(v) for v in values))

    @property
    def median(self) -> float:
        return statistics.median(self.values) if self.values else math.nan

    @property
    def min(self) -> float:
        return min(self.values) if self.values else math.nan

    @property
    def max(self) -> float:
        return max(self.values) if self.values else math.nan

    @property
    def q1(self) -> float:
        return quantile(self.values, 0.25)

    @property
    def q3(self) -> float:
        return quantile(self.values, 0.75)

    @property
    def iqr(self) -> float:
        return self.q3 - self.q1

    def within(self, tolerance: float) -> dict[str, bool]:
        """Whether every repetition (``minmax``) and the middle half (``iqr``) lie within
        ``median ± tolerance``."""
        m = self.median
        return {"minmax": m - self.min <= tolerance + 1e-12 and self.max - m <= tolerance + 1e-12,
                "iqr": m - self.q1 <= tolerance + 1e-12 and self.q3 - m <= tolerance + 1e-12}

    def as_dict(self) -> dict[str, object]:
        """For the benchmarks' JSON: the summary and every repetition's value."""
        return {"median": self.median, "min": self.min, "max": self.max, "q1": self.q1,
                "q3": self.q3, "iqr": self.iqr, "n": len(self.values),
                "values": list(self.values)}

    def format(self, digits: int = 2) -> str:
        """``median [min-max] IQR width`` with ``digits`` decimals."""
        f = f"{{:.{digits}f}}"
        return (f"{f.format(self.median)} [{f.format(self.min)}-{f.format(self.max)}] "
                f"IQR {f.format(self.iqr)}")


def interleave(runs: Mapping[str, Callable[[int], T]], repetitions: int,
               *, between: Callable[[str, int], None] | None = None,
               log: Callable[[str], None] | None = None) -> dict[str, list[T]]:
    """Call each of ``runs`` once per repetition, in order, repetition after repetition
    (A B A B ...); each gets the repetition's index. ``between(name, rep)`` is called
    before each run (to switch configuration, say). Returns every run's results in order."""
    if repetitions < 1:
        raise ValueError("repetitions must be at least 1")
    results: dict[str, list[T]] = {name: [] for name in runs}
    for rep in range(repetitions):
        for name, run in runs.items():
            if between is not None:
                between(name, rep)
            started = time.monotonic()
            results[name].append(run(rep))
            if log is not None:
                log(f"[rep {rep + 1}/{repetitions}] {name}: {time.monotonic() - started:.1f} s")
    return results


def machine_busy_cores(window_s: float) -> float:
    """Cores the whole machine kept busy (every process) over the next ``window_s``."""
    import psutil  # a dependency of Ray

    return psutil.cpu_percent(interval=window_s) / 100.0 * (os.cpu_count() or 1)


def wait_until_quiet(*, below_cores: float, window_s: float, timeout_s: float,
                     busy_cores: Callable[[float], float] = machine_busy_cores) -> float:
    """Wait until the machine was busy below ``below_cores`` for one whole ``window_s``
    (the previous run's tail work, such as a service's purges and log flushes, is done), or
    ``timeout_s`` passed; returns the seconds waited. A condition, not a fixed sleep: a
    quiet machine costs one window."""
    if below_cores <= 0 or window_s < 0 or timeout_s < 0:
        raise ValueError("below_cores must be > 0, window_s and timeout_s >= 0")
    started = time.monotonic()
    while busy_cores(window_s) >= below_cores:
        if time.monotonic() - started >= timeout_s:
            break
    return time.monotonic() - started


def set_thread_affinity(pids: Iterable[int], cores: set[int]) -> int:
    """Allow every thread of every process in ``pids`` only ``cores`` (Linux: a process's
    affinity is per thread, and threads started later inherit their creator's). Processes
    and threads that exit meanwhile are skipped; returns the threads set."""
    count = 0
    for pid in pids:
        try:
            tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        for tid in tids:
            try:
                os.sched_setaffinity(tid, cores)
                count += 1
            except (ProcessLookupError, PermissionError):
                continue
    return count


def can_set_cores_apart() -> bool:
    """Whether ``cores_apart`` can pin here: Linux thread affinity and at least 2 cores."""
    return (hasattr(os, "sched_setaffinity") and Path("/proc/self/task").is_dir()
            and len(os.sched_getaffinity(0)) >= 2)


@contextmanager
def cores_apart(own_pids: Sequence[int], others: Callable[[], Iterable[int]]) -> Iterator[int]:
    """While inside: the calling thread and ``own_pids`` run on one core only, and every
    thread of ``others()`` (processes sharing the machine, e.g. an idle service) on the
    remaining cores, so neither side's work lands on the other's core. Yields the number of
    other threads moved. Afterwards every thread gets back the cores the calling thread
    had, ``others()`` asked again so that processes started meanwhile are restored too.
    Where thread affinity is unavailable, or on one core, it changes nothing (yields 0)."""
    if not can_set_cores_apart():
        yield 0
        return
    allowed = set(os.sched_getaffinity(0))
    mine = {max(allowed)}
    rest = allowed - mine
    try:
        os.sched_setaffinity(0, mine)  # 0: the calling thread
        set_thread_affinity(own_pids, mine)
        yield set_thread_affinity(others(), rest)
    finally:
        os.sched_setaffinity(0, allowed)
        set_thread_affinity(own_pids, allowed)
        set_thread_affinity(others(), allowed)


def paired_ratios(numerators: Sequence[float], denominators: Sequence[float]) -> list[float]:
    """Per-repetition ratios of adjacent runs: ``numerators[i] / denominators[i]``."""
    if len(numerators) != len(denominators):
        raise ValueError(f"{len(numerators)} numerators but {len(denominators)} denominators")
    return [n / d if d else math.nan for n, d in zip(numerators, denominators, strict=True)]


def table(rows: Mapping[str, Spread], *, digits: int = 2, unit: str = "") -> list[str]:
    """Lines of a table: name, median, [min-max], IQR, one row per figure."""
    f = f"{{:.{digits}f}}"
    header = ("figure", f"median{(' ' + unit) if unit else ''}", "[min-max]", "IQR", "n")
    body = [(name, f.format(s.median), f"[{f.format(s.min)}-{f.format(s.max)}]",
             f.format(s.iqr), str(len(s.values))) for name, s in rows.items()]
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]

    def line(row: tuple[str, ...]) -> str:
        return "  ".join([row[0].ljust(widths[0])]
                         + [cell.rjust(w) for cell, w in zip(row[1:], widths[1:], strict=True)])

    return [line(header), line(tuple("-" * w for w in widths)), *map(line, body)]


def target_line(name: str, spread: Spread, tolerance: float, *, digits: int = 3) -> str:
    """One honest line on whether ``spread`` meets ``median ± tolerance``, both ways (to
    ``digits`` decimals, one more than the figures, so a verdict never contradicts them)."""
    f = f"{{:.{digits}f}}"
    met = spread.within(tolerance)
    m = spread.median

    def part(label: str, low: float, high: float, ok: bool) -> str:
        return (f"{label} -{f.format(m - low)}/+{f.format(high - m)} "
                f"{'within' if ok else 'NOT within'}")

    verdict = "met" if met["minmax"] else ("met by IQR only" if met["iqr"] else "NOT met")
    return (f"spread target ±{tolerance:g} for {name}: {verdict} ("
            f"{part('min-max', spread.min, spread.max, met['minmax'])}; "
            f"{part('IQR', spread.q1, spread.q3, met['iqr'])})")


def boxplot(ax, data: Mapping[str, Sequence[float]], *, ylabel: str = "",
            title: str = "", reference: float | None = None) -> None:
    """A box per figure (median, IQR box, whiskers to min-max) with every repetition
    drawn as a dot, on a matplotlib axis."""
    names = list(data)
    ax.boxplot([list(data[n]) for n in names], whis=(0, 100), widths=0.5)
    for i, name in enumerate(names, start=1):
        values = list(data[name])
        jitter = [i + 0.08 * ((k % 5) - 2) / 2 for k in range(len(values))]
        ax.plot(jitter, values, "o", color="tab:blue", alpha=0.5, markersize=3)
    ax.set_xticks(range(1, len(names) + 1), names, rotation=15, fontsize=8)
    if reference is not None:
        ax.axhline(reference, color="grey", lw=0.8, ls="--")
    if ylabel:
        ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, axis="y")
