"""Touch point: the end of a torchrun rank (``llamafactory.train.tuner.run_exp``, the last statement of LLaMA-Factory's
launcher script).

A multi-rank CPU run's gloo process group outlives LLaMA-Factory's ``dist.destroy_process_group()``: that call only
drops ``torch.distributed``'s own references, while DeepSpeed's ``groups._WORLD_GROUP``, the ``_dp_group`` of every
ZeRO-managed parameter and DDP's reducer still hold the backend. Its two worker threads and its TCP loop thread (which
wakes every 10 ms and handles the other rank's hang-up) therefore keep running through interpreter finalization and
the C++ static destructors of ``exit()``. torch 2.10's ``ProcessGroupGloo`` has no ``shutdown``/``abort`` to stop them.
In that window a rank sometimes aborts with "terminate called without an active exception" (exit -6) after training
completed and every file was saved, and torchrun reports the whole run as failed. Upstream: pytorch/pytorch#109478 (a
process group is not destroyed when the process exits), #130345 (no ``shutdown()`` for ``ProcessGroupGloo``) and the
abandoned PR #179291 (destroy the groups before interpreter finalization, since gloo's threads crash it with SIGABRT).

Such a rank, once ``run_exp`` has returned, ends here without that native teardown. It takes the Python steps of the
interpreter's own exit: ``threading._shutdown()`` (the hooks of ``threading._register_atexit``, which let idle
thread-pool workers end, then the join of the non-daemon threads), the ``atexit`` handlers (logging's flush and close,
data-loader workers, experiment trackers, ``weakref.finalize`` callbacks), the standard streams flushed; then it exits
with status 0. What it skips is the garbage collection of the remaining objects: ``__del__`` methods, and the buffers
of files a library left open without closing them. A run that fails raises before this point and keeps its exit
status and traceback.
"""

from __future__ import annotations

import atexit
import importlib.util
import os
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

from . import patching
from .args import active_arguments


FULL_TEARDOWN_ENV = "AIMKP_FULL_TEARDOWN"  # "1": keep the normal interpreter exit in every rank
ENDED = "rank ended without native teardown"  # the outcome in $AIMKP_PLUGIN_TRACE


def launcher_is_main() -> bool:
    """Whether this process's ``__main__`` is LLaMA-Factory's launcher script, which torchrun runs in each rank and
    whose last statement is ``run_exp()``: nothing of the process's own code comes after it."""
    main_file = getattr(sys.modules.get("__main__"), "__file__", None)
    spec = importlib.util.find_spec("llamafactory.launcher")
    if main_file is None or spec is None or spec.origin is None:
        return False
    return Path(main_file).resolve() == Path(spec.origin).resolve()


def ends_without_teardown() -> bool:
    """Whether this rank ends without native teardown after ``run_exp``: an AimKP run (any ``aimkp*`` key) in a
    torchrun rank of more than one process, on a machine without an accelerator (the gloo backend), with
    ``__main__`` LLaMA-Factory's launcher, unless ``AIMKP_FULL_TEARDOWN=1``. A CPU run on a machine with a GPU
    (``use_cpu``) keeps the normal exit."""
    import torch

    return (
        active_arguments() is not None
        and int(os.environ.get("WORLD_SIZE", "1")) > 1
        and os.environ.get(FULL_TEARDOWN_ENV) != "1"
        and not torch.accelerator.is_available()
        and launcher_is_main()
    )


def end_rank_without_teardown() -> None:
    """Exit the process with status 0 after the Python steps of the interpreter's own exit (this module's docstring):
    ``threading._shutdown()``, the ``atexit`` handlers, the standard streams flushed, then ``os._exit(0)``. The exit
    is recorded in ``$AIMKP_PLUGIN_TRACE`` when that is set."""
    threading._shutdown()  # what Py_FinalizeEx calls first; private, as the atexit call below
    atexit._run_exitfuncs()
    patching.trace("llamafactory.train.tuner", "_patch_train_tuner_run_exp", ENDED)
    for stream in (sys.stdout, sys.stderr):
        if stream is not None:
            stream.flush()
    os._exit(0)


def _patch_train_tuner_run_exp(module: ModuleType) -> None:
    """Wrap ``llamafactory.train.tuner.run_exp``: after it returns, a rank of a multi-rank CPU AimKP run ends without
    the interpreter's native teardown (:func:`ends_without_teardown`, :func:`end_rank_without_teardown`).

    Replaces: the finalization and C++ static destructors of a torchrun rank whose leaked gloo backend still runs its
    threads (this module's docstring). Why: a completed training must not turn into a failed run at exit.
    ``AIMKP_FULL_TEARDOWN=1`` keeps the normal exit. Tested on llamafactory 0.9.5 and main (0.9.6.dev0) with torch
    2.10.0 and deepspeed 0.19.8. It can go once ``destroy_process_group`` stops a gloo backend's threads (torch's
    ``ProcessGroupGloo`` gains the ``shutdown`` of pytorch/pytorch#130345).
    """

    def run_exp(original: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        result = original(*args, **kwargs)
        if ends_without_teardown():
            end_rank_without_teardown()
        return result

    patching.wrap_function(module, "run_exp", "run_exp", run_exp)
