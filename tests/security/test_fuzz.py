"""The decoder and metadata stripper under coverage-guided fuzzing (atheris): every input
a fuzz run ever crashed on is replayed, and a short run must find no new crash.

Marker `security`. The short run is fixed (seed and number of inputs), so a red run means
a code change opened a crash; fuzz longer with `python -m tests.security.fuzz_media`.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.security.fuzz_media import CRASHERS, check_one

pytestmark = pytest.mark.security
REPO = Path(__file__).resolve().parents[2]
KEPT = sorted(p for p in CRASHERS.glob("*") if p.is_file() and p.name != "README.md")


@pytest.mark.parametrize("path", KEPT, ids=[p.name for p in KEPT])
def test_every_input_a_fuzz_run_crashed_on_is_now_refused_or_cleaned(path):
    check_one(path.read_bytes())


def test_a_short_fuzz_run_finds_no_crash(tmp_path):
    run = subprocess.run(
        [sys.executable, "-m", "tests.security.fuzz_media", "-seed=1", "-runs=12000",
         f"-artifact_prefix={tmp_path}/"],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    found = sorted(p.name for p in tmp_path.glob("crash-*"))
    assert run.returncode == 0 and not found, (
        f"the fuzzer crashed check_media ({found}); copy the file into {CRASHERS} as a "
        f"regression and fix the cause:\n{run.stderr[-3000:]}")
    assert "Done 12000 runs" in run.stderr
