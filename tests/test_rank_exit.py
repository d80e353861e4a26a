"""Which process ends without native teardown after ``run_exp`` (``aimkp_plugin.integration.rank_exit``): only a
rank of a multi-rank AimKP run on a machine without an accelerator, whose ``__main__`` is LLaMA-Factory's launcher.
That the ranks of a real 2-rank run take this exit is checked in ``tests/test_training_runs.py``."""

from __future__ import annotations

import importlib.util
import sys
import types

import pytest
import torch

from aimkp_plugin.config import AimkpArguments
from aimkp_plugin.integration import args, rank_exit


@pytest.fixture
def launcher_rank(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """This process as a CPU torchrun rank of 2 running LLaMA-Factory's launcher with an AimKP config."""
    main = types.ModuleType("__main__")
    main.__file__ = importlib.util.find_spec("llamafactory.launcher").origin
    monkeypatch.setitem(sys.modules, "__main__", main)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv(rank_exit.FULL_TEARDOWN_ENV, raising=False)
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: False)
    monkeypatch.setattr(args, "_active_arguments", AimkpArguments(aimkp=True))
    return monkeypatch


def test_a_cpu_rank_of_the_launcher_in_an_aimkp_run_ends_without_teardown(launcher_rank: pytest.MonkeyPatch):
    assert rank_exit.launcher_is_main()
    assert rank_exit.ends_without_teardown()


@pytest.mark.parametrize(
    "change",
    ["one process", "full teardown asked for", "an accelerator", "not an AimKP run", "another main script"],
)
def test_every_other_process_keeps_the_normal_exit(change: str, launcher_rank: pytest.MonkeyPatch):
    if change == "one process":
        launcher_rank.setenv("WORLD_SIZE", "1")
    elif change == "full teardown asked for":
        launcher_rank.setenv(rank_exit.FULL_TEARDOWN_ENV, "1")
    elif change == "an accelerator":
        launcher_rank.setattr(torch.accelerator, "is_available", lambda: True)
    elif change == "not an AimKP run":
        launcher_rank.setattr(args, "_active_arguments", None)
    else:
        launcher_rank.setattr(sys.modules["__main__"], "__file__", __file__)
    assert not rank_exit.ends_without_teardown()
