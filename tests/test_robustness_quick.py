"""The toy robustness benchmark's pipeline in ``--quick`` mode: generation, SFT and AimKP training through
``llamafactory-cli``, prediction in three settings, scoring and the report. Nothing is asserted about who wins."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from .helpers import REPO, subprocess_env


def test_generator_is_deterministic_and_mixes_signals(tmp_path: Path) -> None:
    sys.path.insert(0, str(REPO / "benchmarks" / "robustness"))
    from generate import generate

    first = generate(tmp_path / "a", seed=3, train=200, test=10, redundant=0.5, classes=4, filler_vocab=50)
    generate(tmp_path / "b", seed=3, train=200, test=10, redundant=0.5, classes=4, filler_vocab=50)
    assert (tmp_path / "a" / "train_src.txt").read_text() == (tmp_path / "b" / "train_src.txt").read_text()
    assert (tmp_path / "a" / "images" / "train_00007.png").read_bytes() == (
        tmp_path / "b" / "images" / "train_00007.png"
    ).read_bytes()
    assert sum(first.values()) == 200 and min(first.values()) > 20  # all three signal kinds occur
    lines = (tmp_path / "a" / "test_src.txt").read_text().splitlines()
    assert len(lines) == 10 and all(line.count("<sep>") == 2 for line in lines)


@pytest.mark.e2e
def test_quick_benchmark_runs_end_to_end(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "robustness" / "run.py"), "--quick", "--out", str(tmp_path)],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((tmp_path / "results.json").read_text())
    assert {(row["method"], row["setting"]) for row in report["summary"]} == {
        (method, setting) for method in ("sft", "aimkp") for setting in ("full", "text_only", "image_only")
    }
    assert all(row["seeds"] == 1 for row in report["summary"])
    assert (tmp_path / "results.png").stat().st_size > 5000 and "| aimkp | image_only |" in result.stdout
    assert (tmp_path / "seed0" / "aimkp" / "aimkp_state.json").is_file()  # the AimKP run really ran AimKP
