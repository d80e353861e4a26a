"""Test-only start-up of each torchrun rank of the bf16 ZeRO-3 tests: DeepSpeed's communication is set up before
anything else, as transformers does on an accelerator.

On a CPU, transformers takes bf16 only with ``use_cpu``, and ``use_cpu`` skips ``deepspeed.init_distributed``: the
model's ``deepspeed.zero.Init`` then builds its config before DeepSpeed knows the ranks, counts one rank and stops
("train_batch_size is not equal to micro_batch_per_gpu * gradient_acc_step * world_size 4 != 1 * 2 * 1"), without
AimKP as with it. The tests put this folder on ``PYTHONPATH`` and set ``AIMKP_TESTS_EARLY_DEEPSPEED=1`` for those runs
only; it acts in a torchrun rank (the launcher and torchrun pass the variable on), once: the rank takes the
variable out, so that no process it starts does it again.
"""

import os


if os.environ.get("LOCAL_RANK") is not None and os.environ.pop("AIMKP_TESTS_EARLY_DEEPSPEED", None) == "1":
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
