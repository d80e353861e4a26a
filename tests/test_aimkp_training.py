"""``llamafactory-cli train`` with ``aimkp: true`` on the tiny models: the curriculum file, logged metrics, the plot,
resume, gradient accumulation against one big batch, and two-process DDP."""

from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from aimkp_plugin.integration.callback import PLOT_FILE

from .helpers import (
    FAMILY_BY_NAME,
    FAMILY_NAMES,
    aimkp_config,
    assert_same_adapter,
    images_of,
    read_state,
    run_llamafactory,
    run_side_by_side,
    template_of,
)


pytestmark = pytest.mark.e2e  # every test here runs llamafactory-cli

# Qwen2.5-VL differs from Qwen2-VL only in its vision tower's config: its runs are left to the step tests
TRAINED_FAMILIES = [family for family in FAMILY_NAMES if family != "qwen2_5_vl"]
QLORA_RUN = "llava+qlora4"  # LLaVA with its base weights quantized to 4 bits by bitsandbytes
THREE_EPOCH_RUNS = [*TRAINED_FAMILIES, QLORA_RUN]
MODALITIES = ("text", "image")
ALWAYS_LOGGED = {f"aimkp_{m}_{name}" for m in MODALITIES for name in ("mean_stride", "frozen_fraction", "copies")}
LOGGED_WITH_COPIES = {f"aimkp_{m}_{name}" for m in MODALITIES for name in ("keep_rate", "mean_cosine")}


def is_power_of_two(value: int) -> bool:
    return value >= 1 and value & (value - 1) == 0


@pytest.fixture(scope="module")
def three_epoch_runs(tiny_models: dict, cmkp_workspace: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Every family's 3-epoch run, two side by side (one thread each): family -> (result, output folder)."""
    root = tmp_path_factory.mktemp("three_epochs")

    def train(run: str) -> tuple:
        family = run.split("+")[0]
        out = root / run / "out"
        config = aimkp_config(
            tiny_models[family],
            template_of(family),
            cmkp_workspace,
            out,
            dataloader_num_workers=2,
            media_dir=str(cmkp_workspace / images_of(family)),
        )
        if run == QLORA_RUN:
            config["quantization_bit"] = 4
        return run_llamafactory(config, root / run, OMP_NUM_THREADS="1"), out

    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip(THREE_EPOCH_RUNS, pool.map(train, THREE_EPOCH_RUNS), strict=True))


@pytest.mark.parametrize("run", THREE_EPOCH_RUNS)
def test_three_epochs_with_aimkp(run: str, three_epoch_runs: dict):
    result, out = three_epoch_runs[run]
    family = run.split("+")[0]
    assert result.returncode == 0, result.stdout[-4000:]
    if run == QLORA_RUN:
        assert "Quantizing model to 4 bit with bitsandbytes." in result.stdout
    assert "AimKP curriculum: text mean stride" in result.stdout
    assert f"the fast AimKP step runs for the {family} family" in result.stdout
    apart = FAMILY_BY_NAME[family].removes_hidden_tokens or FAMILY_BY_NAME[family].cross_attention_images
    sharing = "computed per copy" if apart else "computed once where over 0.4"
    assert f"the text copies' shared prefix {sharing}" in result.stdout
    assert "fallback" not in result.stdout and "reference step runs instead" not in result.stdout

    after_epoch_one = read_state(out / "checkpoint-4")
    assert after_epoch_one["num_samples"] == 8
    for modality in ("text", "image"):  # the workers never see the state: the main process updated every sample
        strides, frozen = after_epoch_one[f"{modality}_stride"], after_epoch_one[f"{modality}_frozen"]
        assert all(stride >= 2 for stride, is_frozen in zip(strides, frozen, strict=True) if not is_frozen)
    final = read_state(out)
    for modality in ("text", "image"):
        assert all(is_power_of_two(stride) for stride in final[f"{modality}_stride"])
        assert all(stride >= 2 for stride in final[f"{modality}_stride"])
    assert final == read_state(out / "checkpoint-12")

    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    logged = [entry for entry in history if "loss" in entry]
    assert logged and all(ALWAYS_LOGGED <= set(entry) for entry in logged)
    with_copies = [entry for entry in logged if entry["aimkp_text_copies"] and entry["aimkp_image_copies"]]
    assert with_copies and all(LOGGED_WITH_COPIES <= set(entry) for entry in with_copies)
    assert (out / PLOT_FILE).stat().st_size > 1000


def test_three_epochs_with_a_qwen3_5_of_another_size_and_layer_pattern(
    tiny_models: dict, cmkp_workspace: Path, tmp_path: Path, llamafactory_runner
):
    """A Qwen3.5 built here from transformers' own classes, not by the plugin's builder: other widths, a full-attention
    layer first and two Gated DeltaNet layers after it, another convolution size. It trains three epochs with the fast
    step, no fallback, and growing strides."""
    import torch
    from transformers import AutoConfig, Qwen3_5ForConditionalGeneration

    folder = tmp_path / "qwen3_5-other"
    shutil.copytree(tiny_models["qwen3_5"], folder, ignore=shutil.ignore_patterns("model.safetensors", "config.json"))
    config = AutoConfig.from_pretrained(tiny_models["qwen3_5"])
    text = config.text_config
    text.hidden_size, text.intermediate_size, text.num_hidden_layers = 32, 96, 3
    text.num_attention_heads, text.num_key_value_heads, text.head_dim = 2, 1, 16
    text.layer_types = ["full_attention", "linear_attention", "linear_attention"]
    text.linear_num_key_heads, text.linear_num_value_heads, text.linear_conv_kernel_dim = 1, 2, 3
    config.vision_config.out_hidden_size = 32
    torch.manual_seed(3)
    Qwen3_5ForConditionalGeneration(config).save_pretrained(folder)

    out = tmp_path / "out"
    config = aimkp_config(folder, "qwen3_5_nothink", cmkp_workspace, out, media_dir=str(cmkp_workspace / "images"))
    result = llamafactory_runner(config)
    assert result.returncode == 0, result.stdout[-4000:]
    assert "the fast AimKP step runs for the qwen3_5 family" in result.stdout
    assert "fallback" not in result.stdout and "reference step runs instead" not in result.stdout
    final = read_state(out)
    for modality in ("text", "image"):
        assert all(is_power_of_two(stride) and stride >= 2 for stride in final[f"{modality}_stride"])


def test_resume_gives_the_uninterrupted_result(
    tiny_models: dict, cmkp_workspace: Path, tmp_path: Path, llamafactory_runner
):
    full = tmp_path / "full"
    config = aimkp_config(tiny_models["llava"], "llava", cmkp_workspace, full, aimkp_init_stride=2)
    assert llamafactory_runner(config).returncode == 0

    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(full / "checkpoint-8", resumed / "checkpoint-8")  # as if the run had stopped after epoch 2
    config = aimkp_config(
        tiny_models["llava"], "llava", cmkp_workspace, resumed, aimkp_init_stride=2, overwrite_output_dir=False
    )
    result = llamafactory_runner(config, f"resume_from_checkpoint={resumed / 'checkpoint-8'}")
    assert result.returncode == 0, result.stdout[-4000:]
    assert "restored the curriculum of 8/8 samples" in result.stdout
    assert read_state(resumed) == read_state(full)
    assert_same_adapter(full, resumed)


def test_gradient_accumulation_equals_one_big_batch(
    tiny_models: dict, cmkp_workspace: Path, tmp_path: Path, llamafactory_runner
):
    configs = {
        name: aimkp_config(
            tiny_models["llava"],
            "llava",
            cmkp_workspace,
            tmp_path / name,
            per_device_train_batch_size=batch,
            gradient_accumulation_steps=accumulation,
            aimkp_init_stride=2,
            num_train_epochs=1,
            max_samples=4,
            save_strategy="no",
            logging_steps=1,
        )
        for name, batch, accumulation in (("big", 4, 1), ("accumulated", 2, 2), ("single", 1, 4))
    }
    for result in run_side_by_side(configs, tmp_path).values():
        assert result.returncode == 0, result.stdout[-4000:]
    for name in ("accumulated", "single"):
        assert read_state(tmp_path / name) == read_state(tmp_path / "big")
        assert_same_adapter(tmp_path / "big", tmp_path / name)


@pytest.mark.parametrize("samples", [8, 7])
def test_ddp_two_ranks_hold_the_same_state_as_one_process(
    samples: int, tiny_models: dict, cmkp_workspace: Path, tmp_path: Path, llamafactory_runner
):
    """Two ranks with batch 1 see the samples one process with batch 2 sees, step by step.

    With 7 samples the sampler repeats one sample on the last step to even out the ranks: that repeat trains but
    must not move the curriculum twice in one epoch, so the state still equals the one-process run.
    """
    single = tmp_path / "single"
    config = aimkp_config(
        tiny_models["llava"], "llava", cmkp_workspace, single, save_strategy="no", max_samples=samples
    )
    assert llamafactory_runner(config).returncode == 0

    ddp = tmp_path / "ddp"
    config = aimkp_config(
        tiny_models["llava"],
        "llava",
        cmkp_workspace,
        ddp,
        save_strategy="no",
        per_device_train_batch_size=1,
        max_samples=samples,
    )
    result = llamafactory_runner(config, FORCE_TORCHRUN="1", NPROC_PER_NODE="2", OMP_NUM_THREADS="1")
    assert result.returncode == 0, result.stdout[-4000:]
    assert "curriculum state identical on all 2 ranks" in result.stdout
    single_state, ddp_state = read_state(single), read_state(ddp)
    assert ddp_state == single_state
    assert set(single_state["text_stride"]) == {8}  # 3 epochs: 1 -> 2 -> 4 -> 8, once per epoch
    if samples % 2 == 0:  # no repeated sample: the all-reduced update equals the one-process update
        assert_same_adapter(single, ddp, rtol=1e-4)


def test_bf16_run_with_strict_thresholds_freezes(
    tiny_models: dict, cmkp_workspace: Path, tmp_path: Path, llamafactory_runner
) -> None:
    """bf16 autocast on CPU; thresholds near 1 make copies disagree, so strides freeze at max(γ/2, 2)."""
    out = tmp_path / "out"
    config = aimkp_config(
        tiny_models["llava"],
        "llava",
        cmkp_workspace,
        out,
        bf16=True,
        use_cpu=True,
        aimkp_text_threshold=0.99999,
        aimkp_image_threshold=0.99999,
        save_strategy="no",
        logging_steps=1,
    )
    result = llamafactory_runner(config)
    assert result.returncode == 0, result.stdout[-4000:]
    final = read_state(out)
    for modality in MODALITIES:
        assert all(final[f"{modality}_frozen"]) and set(final[f"{modality}_stride"]) == {2}
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    rates = [entry["aimkp_text_keep_rate"] for entry in history if "aimkp_text_keep_rate" in entry]
    cosines = [entry["aimkp_text_mean_cosine"] for entry in history if "aimkp_text_mean_cosine" in entry]
    assert rates and max(rates) < 1.0 and all(0.0 < cosine < 1.0 for cosine in cosines)
