"""AimKP under DeepSpeed on 2 CPU processes (gloo): the same curriculum and adapter as DDP, resume, refusals.

The shipped ``recipes/deepspeed/ds_z{0,1,2,3}_config.json`` are the configs under test; every run starts from the
same adapter. Every run uses SGD so that float32 rounding stays at its own size (see ``assert_same_adapter``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest

from .helpers import REPO, aimkp_config, assert_same_adapter, read_state


pytestmark = pytest.mark.e2e  # every test here runs llamafactory-cli, most on 2 ranks

DEEPSPEED = REPO / "recipes" / "deepspeed"
EARLY_INIT = Path(__file__).with_name("ds_early_init")  # the bf16 ZeRO-3 runs' rank start-up (a sitecustomize)
TWO_RANKS = {"FORCE_TORCHRUN": "1", "NPROC_PER_NODE": "2", "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}


def two_rank_config(tiny_models: dict, workspace: Path, out: Path, **overrides) -> dict:
    """7 posts (odd: the sampler repeats one), batch 1 per rank, accumulation 2, the projector at its own lr."""
    settings = {
        "adapter_name_or_path": str(START_ADAPTER[0]),
        "per_device_train_batch_size": 1,
        "gradient_accumulation_steps": 2,
        "max_samples": 7,
        "optim": "sgd",
        "learning_rate": 0.05,
        "additional_target": "multi_modal_projector,lm_head",
        "aimkp_projector_lr": 0.02,
        "save_strategy": "no",
        "logging_steps": 1,
    }
    settings.update(overrides)
    return aimkp_config(tiny_models["llava"], "llava", workspace, out, **settings)


START_ADAPTER: list[Path] = []  # set by the start_adapter fixture, which every run here uses
LORA_ONLY = ("additional_target", "aimkp_projector_lr")  # the keys without which a run trains LoRA alone


def start_adapter_config(tiny_models: dict, workspace: Path, out: Path, *dropped: str) -> dict:
    """A one-step run at learning rate 0, without AimKP, that saves the adapter other runs start from, with the
    settings of :func:`two_rank_config` but ``dropped``."""
    config = two_rank_config(tiny_models, workspace, out, aimkp=False, learning_rate=0.0, max_steps=1)
    for key in ("adapter_name_or_path", "aimkp_projector_lr", *dropped):
        config.pop(key)
    return config


@pytest.fixture(scope="module", autouse=True)
def start_adapter(tiny_models: dict, cmkp_workspace: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The adapter (LoRA, projector and lm_head) every run here starts from. Under ZeRO-3 the model loads
    partitioned, so a new adapter's random initial weights would be drawn differently from a DDP run's."""
    from .helpers import run_llamafactory

    out = tmp_path_factory.mktemp("start") / "adapter"
    START_ADAPTER[:] = [out]
    result = run_llamafactory(start_adapter_config(tiny_models, cmkp_workspace, out), out.parent)
    assert result.returncode == 0, result.stdout[-4000:]
    return out


@pytest.fixture(scope="module")
def ddp_run(tiny_models: dict, cmkp_workspace: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from .helpers import run_llamafactory

    out = tmp_path_factory.mktemp("ddp") / "run"
    result = run_llamafactory(two_rank_config(tiny_models, cmkp_workspace, out), out.parent, **TWO_RANKS)
    assert result.returncode == 0, result.stdout[-4000:]
    return out


def deepspeed_config(stage: int, folder: Path, offload_param: bool = False) -> str:
    """The shipped ZeRO config of ``stage``; with ``offload_param``, a copy that keeps the parameters on the CPU."""
    shipped = DEEPSPEED / f"ds_z{stage}_config.json"
    if not offload_param:
        return str(shipped)
    config = json.loads(shipped.read_text())
    config["zero_optimization"]["offload_param"] = {"device": "cpu", "pin_memory": True}
    path = folder / f"ds_z{stage}_offload_param_config.json"
    path.write_text(json.dumps(config))
    return str(path)


@pytest.mark.parametrize(
    ("stage", "offload_param", "impl"),
    [
        pytest.param(2, False, "fast", marks=pytest.mark.compat),
        pytest.param(3, False, "fast", marks=pytest.mark.compat),
        (3, True, "fast"),
        (3, False, "reference"),
        (1, False, "fast"),
        (0, False, "fast"),
    ],
)
def test_zero_stage_trains_as_ddp(
    stage: int,
    offload_param: bool,
    impl: str,
    ddp_run: Path,
    tiny_models: dict,
    cmkp_workspace: Path,
    tmp_path: Path,
    llamafactory_runner,
):
    """The step's gradient handed to DeepSpeed's backward gives DDP's curriculum and adapter (1e-5, SGD; the DDP run
    takes the fast step); under ZeRO-3 the step runs on the gathered model, the parameters kept on the CPU or not,
    the fast step or the reference step."""
    out = tmp_path / f"zero{stage}"
    config = two_rank_config(
        tiny_models, cmkp_workspace, out, deepspeed=deepspeed_config(stage, tmp_path, offload_param), aimkp_impl=impl
    )
    result = llamafactory_runner(config, **TWO_RANKS)
    assert result.returncode == 0, result.stdout[-4000:]
    assert "curriculum state identical on all 2 ranks" in result.stdout
    assert ("the fast AimKP step runs for the llava family" in result.stdout) == (impl == "fast")
    gathering = re.search(
        r"under ZeRO-3 the AimKP step gathers the whole model on each rank \(\d+\.\d MiB\)", result.stdout
    )
    assert (gathering is not None) == (stage == 3)
    state = read_state(out)
    assert state == read_state(ddp_run)
    assert set(state["text_stride"]) == {8}  # the curriculum moved: 1 -> 2 -> 4 -> 8
    assert_same_adapter(ddp_run, out, rtol=1e-5)


@pytest.fixture(scope="module")
def ddp_bf16_run(tiny_models: dict, cmkp_workspace: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from .helpers import run_llamafactory

    out = tmp_path_factory.mktemp("ddp_bf16") / "run"
    config = two_rank_config(tiny_models, cmkp_workspace, out, bf16=True, use_cpu=True)
    result = run_llamafactory(config, out.parent, **TWO_RANKS)
    assert result.returncode == 0, result.stdout[-4000:]
    return out


def early_deepspeed_init() -> dict[str, str]:
    """The environment of a bf16 ZeRO-3 run on a CPU. transformers takes bf16 there only with ``use_cpu``, which
    skips ``deepspeed.init_distributed``, and ``deepspeed.zero.Init`` would then count one rank at model load
    ("train_batch_size is not equal to micro_batch_per_gpu * gradient_acc_step * world_size 4 != 1 * 2 * 1"),
    without AimKP as with it. Each rank therefore starts DeepSpeed's communication first, as transformers does on an
    accelerator (``tests/ds_early_init/sitecustomize.py``)."""
    return {
        "PYTHONPATH": os.pathsep.join(filter(None, [str(EARLY_INIT), os.environ.get("PYTHONPATH")])),
        "AIMKP_TESTS_EARLY_DEEPSPEED": "1",
    }


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_in_bf16_keeps_the_ddp_curriculum(
    stage: int, ddp_bf16_run: Path, tiny_models: dict, cmkp_workspace: Path, tmp_path: Path, llamafactory_runner
):
    """bf16, the recipes' precision, with the projector trained at its own lr. DeepSpeed computes with bf16 weights
    (float32 master copies), where LLaMA-Factory's DDP run keeps trained weights in float32 under autocast, so the
    adapters differ by bf16 rounding (about 1% after these 12 SGD steps); the curriculum decisions are the same.
    Under ZeRO-3 the run casts LoRA's float32 weights to the trained projector's bf16: without it DeepSpeed's
    stage-3 optimizer stops on trained parameters of two dtypes."""
    out = tmp_path / f"zero{stage}"
    config = two_rank_config(
        tiny_models, cmkp_workspace, out, bf16=True, use_cpu=True, deepspeed=deepspeed_config(stage, tmp_path)
    )
    result = llamafactory_runner(config, **TWO_RANKS, **(early_deepspeed_init() if stage == 3 else {}))
    assert result.returncode == 0, result.stdout[-4000:]
    if stage == 3:
        assert "under ZeRO-3 the AimKP step gathers the whole model" in result.stdout
        assert re.search(r"under ZeRO-3 \d+ trained parameters \(the adapter's\) are cast", result.stdout)
    state = read_state(out)
    assert state == read_state(ddp_bf16_run)
    assert set(state["text_stride"]) == {8}  # the curriculum moved: 1 -> 2 -> 4 -> 8
    assert_same_adapter(ddp_bf16_run, out, rtol=2e-2)


def test_zero3_in_bf16_with_lora_only_keeps_the_ddp_curriculum(
    tiny_models: dict, cmkp_workspace: Path, tmp_path: Path, llamafactory_runner
):
    """ZeRO-3 in bf16 with LoRA only (LLaMA-Factory's default, no ``additional_target``): LoRA keeps its float32
    weights, nothing is cast, and the run keeps DDP's curriculum and adapter as above. Both runs start from one
    LoRA-only adapter (ZeRO-3 loads the model partitioned and would draw a new LoRA differently)."""
    start = tmp_path / "start"
    config = start_adapter_config(tiny_models, cmkp_workspace, start, "additional_target")  # LoRA only
    assert llamafactory_runner(config).returncode == 0
    runs, results = {}, {}
    zero3 = {"deepspeed": deepspeed_config(3, tmp_path)}
    for name, extra, env in (("ddp", {}, {}), ("zero3", zero3, early_deepspeed_init())):
        runs[name] = tmp_path / name
        config = two_rank_config(
            tiny_models, cmkp_workspace, runs[name], bf16=True, use_cpu=True, adapter_name_or_path=str(start), **extra
        )
        for key in LORA_ONLY:
            config.pop(key)
        results[name] = llamafactory_runner(config, **TWO_RANKS, **env)
        assert results[name].returncode == 0, results[name].stdout[-4000:]
    assert "under ZeRO-3 the AimKP step gathers the whole model" in results["zero3"].stdout
    assert "trained parameters (the adapter's) are cast" not in results["zero3"].stdout
    state = read_state(runs["zero3"])
    assert state == read_state(runs["ddp"])
    assert set(state["text_stride"]) == {8}  # the curriculum moved: 1 -> 2 -> 4 -> 8
    assert_same_adapter(runs["ddp"], runs["zero3"], rtol=2e-2)


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_resume_gives_the_uninterrupted_state(
    stage: int, tiny_models: dict, cmkp_workspace: Path, tmp_path: Path, llamafactory_runner
):
    """A ZeRO-2 or ZeRO-3 checkpoint (its DeepSpeed folder and aimkp_state.json) resumes to the uninterrupted run's
    result."""
    deepspeed = deepspeed_config(stage, tmp_path)
    full = tmp_path / "full"
    config = two_rank_config(tiny_models, cmkp_workspace, full, deepspeed=deepspeed, save_strategy="epoch")
    result = llamafactory_runner(config, **TWO_RANKS)
    assert result.returncode == 0, result.stdout[-4000:]
    checkpoints = sorted(full.glob("checkpoint-*"), key=lambda path: int(path.name.split("-")[1]))
    assert len(checkpoints) == 3 and any(checkpoints[1].glob("global_step*"))  # DeepSpeed's own folder
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(checkpoints[1], resumed / checkpoints[1].name)  # as if the run had been killed after epoch 2
    config = two_rank_config(
        tiny_models,
        cmkp_workspace,
        resumed,
        deepspeed=deepspeed,
        save_strategy="epoch",
        overwrite_output_dir=False,
        resume_from_checkpoint=str(resumed / checkpoints[1].name),
    )
    result = llamafactory_runner(config, **TWO_RANKS)
    assert result.returncode == 0, result.stdout[-4000:]
    assert "restored the curriculum of 7/7 samples" in result.stdout
    assert read_state(resumed) == read_state(full)
    assert_same_adapter(full, resumed, rtol=1e-5)


@pytest.mark.parametrize(
    ("zero", "message"),
    [
        ({"stage": 4}, "supports DeepSpeed ZeRO stages 0, 1, 2 and 3, but {path} sets zero_optimization.stage: 4"),
        (
            {"stage": 3, "offload_param": {"device": "nvme", "nvme_path": "/tmp"}},
            "aimkp: true cannot use offload_param to NVMe ({path})",
        ),
    ],
    ids=["stage4", "nvme"],
)
def test_untested_zero_settings_are_refused_before_the_model_loads(
    zero: dict, message: str, tiny_models: dict, cmkp_workspace: Path, tmp_path: Path, llamafactory_runner
):
    ds_config = json.loads((DEEPSPEED / "ds_z3_config.json").read_text())
    ds_config["zero_optimization"] = zero
    path = tmp_path / "ds_config.json"
    path.write_text(json.dumps(ds_config))
    config = two_rank_config(tiny_models, cmkp_workspace, tmp_path / "run", deepspeed=str(path))
    result = llamafactory_runner(config)
    assert result.returncode != 0
    assert message.format(path=path) in result.stdout
    assert "trainable params" not in result.stdout  # stopped before LLaMA-Factory loaded the model


def test_a_zero3_model_too_large_to_gather_is_named_with_its_sizes():
    from aimkp_plugin.integration.zero3 import check_gather_fits

    check_gather_fits(needed=3 * 2**30, free=2**30, everywhere=True)
    with pytest.raises(RuntimeError, match=r"gathers the whole model on each rank, 150.0 GiB more .* 80.0 GiB free"):
        check_gather_fits(needed=150 * 2**30, free=80 * 2**30, everywhere=False)
