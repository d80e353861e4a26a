"""Real ``llamafactory-cli`` runs on the tiny models and the ``cmkp`` format: single process, two-process torchrun,
the demo recipes, and the AimKP guard rails that must stop a run before any model is loaded."""

from __future__ import annotations

import json
import subprocess
from collections import defaultdict
from pathlib import Path

import pytest
import torch

from aimkp_plugin.data.cmkp import iter_records
from aimkp_plugin.integration import rank_exit

from .helpers import REPO, TRAIN_PATCHES, read_trace, run_side_by_side, subprocess_env, tiny_train_config


pytestmark = pytest.mark.e2e  # every test here runs llamafactory-cli


def trainer_losses(output_dir: Path) -> list[float]:
    log = output_dir / "trainer_log.jsonl"
    return [entry["loss"] for entry in map(json.loads, log.read_text().splitlines()) if "loss" in entry]


def test_demo_recipes_train_and_predict_on_tiny_llava(tiny_models: dict, tmp_path: Path, llamafactory_runner) -> None:
    demo = tmp_path / "demo"
    subprocess.run(["aimkp", "data", "demo", "--out", str(demo)], check=True, env=subprocess_env())
    trace = tmp_path / "trace.jsonl"
    out = tmp_path / "adapter"
    common = [f"model_name_or_path={tiny_models['llava']}", f"dataset_dir={demo}"]
    train = llamafactory_runner(
        REPO / "recipes/demo/demo_llava_train.yaml",
        *common,
        f"output_dir={out}",
        "max_steps=12",
        "logging_steps=1",
        AIMKP_PLUGIN_TRACE=str(trace),
    )
    assert train.returncode == 0, train.stdout[-4000:]
    events = read_trace(trace)
    assert {event["patch"] for event in events} == TRAIN_PATCHES
    assert rank_exit.ENDED not in {event["outcome"] for event in events}  # one process: the normal exit
    losses = trainer_losses(out)
    assert len(losses) == 12 and sum(losses[-3:]) < sum(losses[:3])  # lm_head trains: the loss moves
    assert (out / "adapter_model.safetensors").is_file()

    predict = llamafactory_runner(
        REPO / "recipes/demo/demo_llava_predict.yaml",
        *common,
        f"adapter_name_or_path={out}",
        f"output_dir={tmp_path / 'predict'}",
        "max_samples=6",
    )
    assert predict.returncode == 0, predict.stdout[-4000:]
    rows = [json.loads(line) for line in (tmp_path / "predict" / "generated_predictions.jsonl").open()]
    gold = [", ".join(post.keyphrases) for _, post in iter_records(demo / "test_src.txt")][:6]
    assert [row["label"].strip() for row in rows] == gold
    assert all(set(row) == {"prompt", "predict", "label"} for row in rows)


def test_tiny_qwen2vl_trains_on_cmkp(tiny_models: dict, cmkp_workspace: Path, tmp_path: Path, llamafactory_runner):
    out = tmp_path / "out"
    config = tiny_train_config(
        tiny_models["qwen2_vl"], "qwen2_vl", cmkp_workspace, out, dataset="raw_train,json_valid"
    )
    result = llamafactory_runner(config)
    assert result.returncode == 0, result.stdout[-4000:]
    assert len(trainer_losses(out)) == 3 and (out / "adapter_model.safetensors").is_file()


def test_hook_fires_in_both_torchrun_ranks(
    tiny_models: dict, cmkp_workspace: Path, tmp_path: Path, llamafactory_runner
):
    trace = tmp_path / "trace.jsonl"
    out = tmp_path / "out"
    config = tiny_train_config(tiny_models["llava"], "llava", cmkp_workspace, out, aimkp_init_stride=2)
    result = llamafactory_runner(
        config,
        FORCE_TORCHRUN="1",
        NPROC_PER_NODE="2",
        AIMKP_PLUGIN_TRACE=str(trace),
        OMP_NUM_THREADS="1",
        LLAMABOARD_ENABLED="1",  # as a LlamaBoard run: its log handler's thread pool must end before the rank does
        LLAMABOARD_WORKDIR=str(out),
    )
    assert result.returncode == 0, result.stdout[-4000:]
    assert "world size: 2" in result.stdout
    patches_by_rank, ended = defaultdict(set), set()
    for event in read_trace(trace):
        if event["rank"] is not None:
            patches_by_rank[event["rank"]].add(event["patch"])
        if event["outcome"] == rank_exit.ENDED:
            ended.add(event["rank"])
    assert dict(patches_by_rank) == {"0": TRAIN_PATCHES, "1": TRAIN_PATCHES}
    # each gloo rank ends without the native teardown in which its leaked backend's threads can abort it
    assert ended == {"0", "1"}
    assert (out / "adapter_model.safetensors").is_file() and (out / "trainer_state.json").is_file()
    assert "Training completed" in (out / "running_log.txt").read_text()


def test_aimkp_true_rejects_a_model_without_image_input(cmkp_workspace: Path, tmp_path: Path, llamafactory_runner):
    text_only = tmp_path / "text-only"
    text_only.mkdir()
    (text_only / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    config = tiny_train_config(text_only, "default", cmkp_workspace, tmp_path / "out", aimkp=True)
    result = llamafactory_runner(config)
    assert result.returncode != 0
    assert "AimkpConfigError" in result.stdout and "needs a model with image input" in result.stdout
    assert "model_type llama" in result.stdout


def test_aimkp_true_refuses_an_image_model_type_outside_the_family_table_before_loading(
    cmkp_workspace: Path, tmp_path: Path, llamafactory_runner
):
    """An image-text model no family module describes (here a config-only Idefics3 folder, with no weights to load)
    stops before loading, naming the model type, the supported ones and the reason."""
    folder = tmp_path / "idefics3"
    folder.mkdir()
    config_json = {
        "model_type": "idefics3",
        "architectures": ["Idefics3ForConditionalGeneration"],
        "vision_config": {},
    }
    (folder / "config.json").write_text(json.dumps(config_json))
    config = tiny_train_config(folder, "default", cmkp_workspace, tmp_path / "out", aimkp=True)
    result = llamafactory_runner(config)
    assert result.returncode != 0
    assert "AimkpConfigError" in result.stdout and "does not support model_type idefics3" in result.stdout
    assert "Supported model types: llava, qwen2_vl" in result.stdout and "qwen3_5" in result.stdout
    assert "whether its layers mix tokens outside attention" in result.stdout


def test_bad_value_on_the_command_line_is_rejected(
    tiny_models: dict, cmkp_workspace: Path, tmp_path: Path, llamafactory_runner
):
    config = tiny_train_config(tiny_models["llava"], "llava", cmkp_workspace, tmp_path / "out")
    result = llamafactory_runner(config, "aimkp_image_threshold=1.5")
    assert result.returncode != 0
    assert "aimkp_image_threshold must be a cosine in [-1, 1], got 1.5" in result.stdout


def test_aimkp_with_packing_is_rejected_before_loading(
    tiny_models: dict, cmkp_workspace: Path, tmp_path: Path, llamafactory_runner
):
    config = tiny_train_config(
        tiny_models["llava"], "llava", cmkp_workspace, tmp_path / "out", aimkp=True, packing=True
    )
    result = llamafactory_runner(config)
    assert result.returncode != 0 and "cannot be combined with packing: true" in result.stdout
    assert "Loading dataset" not in result.stdout


def test_aimkp_with_neftune_is_rejected_before_loading(
    tiny_models: dict, cmkp_workspace: Path, tmp_path: Path, llamafactory_runner
):
    config = tiny_train_config(tiny_models["llava"], "llava", cmkp_workspace, tmp_path / "out", aimkp=True)
    result = llamafactory_runner(config, "neftune_noise_alpha=5")
    assert result.returncode != 0 and "cannot be combined with neftune_noise_alpha" in result.stdout
    assert "Loading dataset" not in result.stdout


def test_gemma3_with_a_template_that_drops_its_image_blocks_is_rejected_before_loading(
    tiny_models: dict, cmkp_workspace: Path, tmp_path: Path, llamafactory_runner
):
    config = tiny_train_config(tiny_models["gemma3"], "llava", cmkp_workspace, tmp_path / "out", aimkp=True)
    result = llamafactory_runner(config)
    assert result.returncode != 0
    assert "aimkp: true with a gemma3 model: template: llava does not mark Gemma 3's image tokens" in result.stdout
    assert "Set template: gemma3." in result.stdout and "Loading dataset" not in result.stdout


def test_gemma4_with_the_audio_template_is_rejected_before_loading(
    tiny_models: dict, cmkp_workspace: Path, tmp_path: Path, llamafactory_runner
):
    """``gemma4n`` makes LLaMA-Factory's collator add a dummy audio clip to every batch without audio, which no sample
    owns: refused before loading, with ``gemma4`` as the fix."""
    config = tiny_train_config(tiny_models["gemma4"], "gemma4n", cmkp_workspace, tmp_path / "out", aimkp=True)
    result = llamafactory_runner(config)
    assert result.returncode != 0
    assert "aimkp: true does not support template: gemma4n: gemma4n adds a dummy audio clip" in result.stdout
    assert "gemma4" in result.stdout and "Loading dataset" not in result.stdout


def test_llama4_with_a_cutoff_past_the_temperature_floor_is_rejected_before_loading(
    tiny_models: dict, cmkp_workspace: Path, tmp_path: Path, llamafactory_runner
):
    """Llama 4 scales its NoPE layers' queries by each token's index in the sequence run (attention temperature
    tuning), which a copy's dropped tokens and a packed prefix change once an index reaches ``floor_scale``: a
    ``cutoff_len`` that allows it is refused before loading, with the bound as the fix."""
    config = tiny_train_config(
        tiny_models["llama4"], "llama4", cmkp_workspace, tmp_path / "out", aimkp=True, cutoff_len=4096
    )
    result = llamafactory_runner(config)
    assert result.returncode != 0
    assert "aimkp: true with a llama4 model: cutoff_len: 4096 with attn_temperature_tuning" in result.stdout
    assert "Set cutoff_len to at most 4095." in result.stdout and "Loading dataset" not in result.stdout


def test_qwen2vl_training_with_generation_is_rejected_before_loading(
    tiny_models: dict, cmkp_workspace: Path, tmp_path: Path, llamafactory_runner
):
    """LLaMA-Factory builds the training collator without the model under predict_with_generate: no m-rope."""
    config = tiny_train_config(
        tiny_models["qwen2_vl"],
        "qwen2_vl",
        cmkp_workspace,
        tmp_path / "out",
        aimkp=True,
        eval_dataset="raw_test",
        predict_with_generate=True,
    )
    result = llamafactory_runner(config)
    assert result.returncode != 0
    assert "aimkp: true with a qwen2_vl model: predict_with_generate: true in a training run" in result.stdout
    assert "Loading dataset" not in result.stdout


def projector_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """The projector's tensors of a saved adapter, or of a model's own weights, by their name after the projector."""
    from safetensors.torch import load_file

    path = folder / (
        "adapter_model.safetensors" if (folder / "adapter_model.safetensors").is_file() else "model.safetensors"
    )
    marker = "multi_modal_projector."
    return {name.split(marker)[1]: tensor for name, tensor in load_file(path).items() if marker in name}


@pytest.mark.parametrize("aimkp", [False, True])
def test_projector_learning_rate_zero_keeps_the_projector_and_trains_the_rest(
    aimkp: bool, tiny_models: dict, cmkp_workspace: Path, tmp_path: Path, llamafactory_runner
):
    """aimkp_projector_lr: 0 leaves the projector bit-identical to the base model while LoRA trains; the projector
    lr equal to learning_rate gives the run without the key (plain SFT and AimKP alike)."""
    from safetensors.torch import load_file

    from .helpers import assert_same_adapter

    # SGD: Adam turns float32 rounding into whole-lr steps for elements whose gradient is near its epsilon. No
    # filter: the two runs differ by float32 rounding (BLAS may pick its threads by the machine's load), and a cosine
    # that close to a threshold would flip a keep decision, a jump in the update that is not what this test is about
    common = {"additional_target": "multi_modal_projector,lm_head", "max_steps": 2, "aimkp": aimkp, "optim": "sgd"}
    common |= {"aimkp_filter": False} if aimkp else {}
    outputs = {name: tmp_path / name for name in ("zero", "same", "none")}
    extras = {"zero": {"aimkp_projector_lr": 0}, "same": {"aimkp_projector_lr": 1.0e-3}, "none": {}}
    configs = {
        name: tiny_train_config(tiny_models["llava"], "llava", cmkp_workspace, outputs[name], **common, **extra)
        for name, extra in extras.items()
    }
    for name, result in run_side_by_side(configs, tmp_path).items():
        assert result.returncode == 0, result.stdout[-4000:]
        if extras[name]:
            assert "projector tensors train at lr" in result.stdout
    base = projector_tensors(tiny_models["llava"])
    trained = projector_tensors(outputs["zero"])
    assert trained.keys() == base.keys() and len(base) == 4
    for name, tensor in base.items():
        assert torch.equal(trained[name], tensor), name
    assert_same_adapter(outputs["none"], outputs["same"], rtol=1e-6)

    zero, none = (
        load_file(outputs["zero"] / "adapter_model.safetensors"),
        load_file(outputs["none"] / "adapter_model.safetensors"),
    )
    lora = [name for name in zero if "lora_B" in name]
    assert lora and all(not torch.equal(zero[name], none[name]) or zero[name].abs().sum() > 0 for name in lora)
    assert any(zero[name].abs().sum() > 0 for name in lora)  # LoRA B starts at zero: it moved


def test_projector_learning_rate_with_loraplus_is_rejected(
    tiny_models: dict, cmkp_workspace: Path, tmp_path: Path, llamafactory_runner
):
    config = tiny_train_config(
        tiny_models["llava"], "llava", cmkp_workspace, tmp_path / "out", aimkp_projector_lr=2e-5, loraplus_lr_ratio=16
    )
    result = llamafactory_runner(config)
    assert result.returncode != 0
    assert "aimkp_projector_lr cannot be combined with loraplus_lr_ratio: 16" in result.stdout
    assert "Loading dataset" not in result.stdout
