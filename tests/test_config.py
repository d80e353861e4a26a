"""The ``aimkp*`` YAML keys: defaults, coercion, and every rejection the foundation issue lists."""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

import pytest

from aimkp_plugin.checks import check_training_config
from aimkp_plugin.config import (
    KNOWN_KEYS,
    MODALITIES,
    AimkpArguments,
    AimkpConfigError,
    parse_aimkp_arguments,
    split_aimkp_argv,
)
from aimkp_plugin.integration.args import active_arguments, extract_aimkp_arguments


def test_defaults_are_the_authors_run() -> None:
    arguments = AimkpArguments()
    assert arguments.aimkp is False
    assert arguments.aimkp_text_threshold == 0.1
    assert arguments.aimkp_image_threshold == 0.4
    assert arguments.aimkp_init_stride == 1
    assert arguments.aimkp_modalities == ["text", "image"]
    assert arguments.aimkp_filter is True and arguments.aimkp_progressive is True


def test_every_field_has_help_and_the_prefix() -> None:
    for item in fields(AimkpArguments):
        assert item.name == "aimkp" or item.name.startswith("aimkp_")
        assert len(item.metadata.get("help", "")) > 20, item.name


@pytest.mark.parametrize("key", ["aimkp_text_threshold", "aimkp_image_threshold"])
@pytest.mark.parametrize("value", [1.5, -1.01, "high", True])
def test_threshold_outside_cosine_range_is_rejected(key: str, value: object) -> None:
    with pytest.raises(AimkpConfigError, match=key):
        parse_aimkp_arguments({key: value})


@pytest.mark.parametrize("value", [-1, 1, "0.25", 0])
def test_threshold_inside_range_is_accepted(value: object) -> None:
    assert parse_aimkp_arguments({"aimkp_text_threshold": value}).aimkp_text_threshold == float(value)


@pytest.mark.parametrize("value", [0, -2, 1.5, "two"])
def test_stride_must_be_a_positive_integer(value: object) -> None:
    with pytest.raises(AimkpConfigError, match="aimkp_init_stride must be an integer"):
        parse_aimkp_arguments({"aimkp_init_stride": value})


def test_stride_accepts_integer_strings_and_floats() -> None:
    assert parse_aimkp_arguments({"aimkp_init_stride": "4"}).aimkp_init_stride == 4
    assert parse_aimkp_arguments({"aimkp_init_stride": 2.0}).aimkp_init_stride == 2


def test_fast_max_tokens_is_a_non_negative_integer() -> None:
    assert parse_aimkp_arguments({}).aimkp_fast_max_tokens == 0
    assert parse_aimkp_arguments({"aimkp_fast_max_tokens": "4096"}).aimkp_fast_max_tokens == 4096
    with pytest.raises(AimkpConfigError, match=r"aimkp_fast_max_tokens must be an integer >= 0"):
        parse_aimkp_arguments({"aimkp_fast_max_tokens": -1})


def test_fast_share_prefix_is_auto_true_or_false() -> None:
    assert parse_aimkp_arguments({}).share_prefix is None
    assert parse_aimkp_arguments({"aimkp_fast_share_prefix": "true"}).share_prefix is True
    assert parse_aimkp_arguments({"aimkp_fast_share_prefix": False}).share_prefix is False
    with pytest.raises(
        AimkpConfigError, match=r"aimkp_fast_share_prefix must be auto, true or false, got 'sometimes'"
    ):
        parse_aimkp_arguments({"aimkp_fast_share_prefix": "sometimes"})


def test_shared_prefix_with_lora_dropout_is_refused_before_the_model_loads() -> None:
    with pytest.raises(AimkpConfigError, match=r"aimkp_fast_share_prefix: true cannot be combined with lora_dropout"):
        extract_aimkp_arguments({"aimkp": True, "aimkp_fast_share_prefix": True, "lora_dropout": 0.05})
    extract_aimkp_arguments({"aimkp": True, "lora_dropout": 0.05})  # auto: the copies stay apart
    extract_aimkp_arguments({"aimkp": True, "aimkp_fast_share_prefix": True, "lora_dropout": 0})


def test_fast_buffer_budget_is_a_non_negative_integer_in_mib() -> None:
    assert parse_aimkp_arguments({}).aimkp_fast_buffer_mb == "auto"
    assert parse_aimkp_arguments({"aimkp_fast_buffer_mb": "0"}).aimkp_fast_buffer_mb == 0
    assert parse_aimkp_arguments({"aimkp_fast_buffer_mb": 1024}).aimkp_fast_buffer_mb == 1024
    for wrong in (-5, "lots"):
        with pytest.raises(AimkpConfigError, match=r"aimkp_fast_buffer_mb must be auto or an integer >= 0"):
            parse_aimkp_arguments({"aimkp_fast_buffer_mb": wrong})


def test_projector_learning_rate_is_a_non_negative_number() -> None:
    assert parse_aimkp_arguments({}).aimkp_projector_lr is None
    assert parse_aimkp_arguments({"aimkp_projector_lr": "2e-5"}).aimkp_projector_lr == 2e-5
    with pytest.raises(AimkpConfigError, match=r"aimkp_projector_lr must be a learning rate >= 0"):
        parse_aimkp_arguments({"aimkp_projector_lr": -1})


def test_unknown_key_suggests_the_closest() -> None:
    with pytest.raises(AimkpConfigError, match="Did you mean 'aimkp_text_threshold'") as error:
        parse_aimkp_arguments({"aimkp_txt_threshold": 0.2})
    for key in KNOWN_KEYS:
        assert key in str(error.value)


def test_unknown_key_far_from_all_keys_lists_them() -> None:
    with pytest.raises(AimkpConfigError, match="Known aimkp keys") as error:
        parse_aimkp_arguments({"aimkp_qwertyuiopqwerty": 1})
    assert "Did you mean" not in str(error.value)


@pytest.mark.parametrize(
    ("value", "expected"),
    [("text", ["text"]), (["image"], ["image"]), ("image, text", ["text", "image"]), (["text", "text"], ["text"])],
)
def test_modalities_accept_lists_and_strings(value: object, expected: list[str]) -> None:
    assert parse_aimkp_arguments({"aimkp_modalities": value}).aimkp_modalities == expected


@pytest.mark.parametrize("value", ["audio", [], "", ["text", "video"], 3])
def test_modalities_reject_unknown_or_empty(value: object) -> None:
    with pytest.raises(AimkpConfigError, match="aimkp_modalities") as error:
        parse_aimkp_arguments({"aimkp_modalities": value})
    assert all(modality in str(error.value) for modality in MODALITIES)


@pytest.mark.parametrize(("value", "expected"), [("true", True), ("False", False), ("1", True), (False, False)])
def test_booleans_accept_yaml_and_cli_spellings(value: object, expected: bool) -> None:
    assert parse_aimkp_arguments({"aimkp_filter": value}).aimkp_filter is expected


def test_boolean_rejects_other_values() -> None:
    with pytest.raises(AimkpConfigError, match="aimkp must be true or false"):
        parse_aimkp_arguments({"aimkp": "maybe"})


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ({"stage": "dpo"}, "needs stage one of: sft; got stage: dpo"),
        ({"stage": "pt"}, "got stage: pt"),
        ({"packing": True}, "packing: true"),
        ({"neat_packing": "true"}, "neat_packing: true"),
        ({"use_ray": True}, "does not support use_ray yet; supported engines: single process"),
        ({"deepspeed": '{"zero_optimization": {"stage": 4}}'}, "ZeRO stages 0, 1, 2 and 3, but the inline .*stage: 4"),
        (
            {"deepspeed": {"zero_optimization": {"stage": 3, "offload_param": {"device": "nvme"}}}},
            "cannot use offload_param to NVMe",
        ),
        (
            {"deepspeed": {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "NVMe"}}}},
            "cannot use offload_optimizer to NVMe",
        ),
        ({"deepspeed": {"fp16": {"enabled": True}}}, "not tested with fp16"),
        ({"deepspeed": {"zero_optimization": {"stage": "5"}}}, "stage: 5. Set stage 2"),
        (
            {"deepspeed": {"zero_optimization": {"stage": 1}, "data_types": {"grad_accum_dtype": "fp32"}}},
            "ZeRO-1 with data_types.grad_accum_dtype: fp32",
        ),
        ({"deepspeed": "missing_ds.json"}, "deepspeed: missing_ds.json: cannot read the DeepSpeed config"),
        ({"deepspeed": '{"zero_optimization": '}, "the inline deepspeed JSON: not valid JSON"),
        (
            {"quantization_bit": 4, "deepspeed": {"zero_optimization": {"stage": 3}}},
            "quantization_bit is not tested under DeepSpeed ZeRO-3 .the inline deepspeed JSON",
        ),
        ({"fsdp": "full_shard"}, "does not support fsdp: full_shard .FSDP shards the parameters.*ZeRO-3"),
        ({"use_hyper_parallel": True}, "does not support use_hyper_parallel: True yet .HyperParallel trains with"),
        ({"use_kt": "true"}, "does not support use_kt: true yet .KTransformers runs the MoE experts"),
        ({"streaming": True}, "streaming: true"),
        ({"flash_attn": "fa2"}, "flash_attn: fa2"),
        ({"flash_attn": "fa3"}, "flash_attn: fa3 cannot take"),
        (
            {"quantization_bit": 4, "quantization_method": "hqq"},
            "quantization_method: bnb .bitsandbytes. only, not hqq",
        ),
        ({"fp16": True}, "fp16: true .its loss scaling"),
        ({"train_on_prompt": True}, "train_on_prompt: true"),
        ({"use_dft_loss": True}, "use_dft_loss: true"),
        ({"galore_layerwise": "true"}, "galore_layerwise: true"),
        ({"label_smoothing_factor": 0.1}, "label_smoothing_factor"),
        ({"neftune_noise_alpha": 5}, "neftune_noise_alpha: NEFTune draws fresh noise .* Remove neftune_noise_alpha"),
        ({"enable_liger_kernel": True}, "enable_liger_kernel: true .Liger's fused cross-entropy returns no logits"),
        ({"use_unsloth": "true"}, "use_unsloth: true .Unsloth replaces the model's forward"),
    ],
)
def test_aimkp_rejects_unsupported_training_setups(setup: dict, message: str) -> None:
    with pytest.raises(AimkpConfigError, match=message):
        extract_aimkp_arguments({"aimkp": True, "model_name_or_path": "x", **setup})


@pytest.mark.parametrize(
    ("variable", "value", "refused"),
    [("USE_MCA", "1", True), ("USE_MEGATRON_BRIDGE", "true", True), ("USE_MEGATRON_BRIDGE", "Y", True)]
    + [("ACCELERATE_USE_FSDP", "true", True), ("ACCELERATE_USE_FSDP", "false", False)]
    + [("USE_MCA", "0", False), ("USE_MEGATRON_BRIDGE", "false", False)],
)
def test_aimkp_refuses_the_environment_of_another_trainer(
    variable: str, value: str, refused: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """LLaMA-Factory's train/tuner.py runs Megatron-Core (USE_MCA) and Megatron-Bridge (USE_MEGATRON_BRIDGE, main)
    with trainers of their own, where the AimKP step would not run; accelerate launch with an FSDP config sets
    ACCELERATE_USE_FSDP. Plain SFT keeps them."""
    monkeypatch.setenv(variable, value)
    if refused:
        with pytest.raises(AimkpConfigError, match=f"does not support {variable}={value} .* Unset {variable}"):
            extract_aimkp_arguments({"aimkp": True, "model_name_or_path": "x"})
    else:
        extract_aimkp_arguments({"aimkp": True, "model_name_or_path": "x"})
    extract_aimkp_arguments({"aimkp": False, "aimkp_init_stride": 2})


def test_qlora_through_bitsandbytes_is_accepted_and_other_quantized_checkpoints_named() -> None:
    from aimkp_plugin.checks import check_checkpoint_quantization

    extract_aimkp_arguments({"aimkp": True, "quantization_bit": 4})
    extract_aimkp_arguments({"aimkp": True, "quantization_bit": 8, "quantization_method": "bnb"})
    check_checkpoint_quantization("m", {"quantization_config": {"quant_method": "bitsandbytes", "load_in_4bit": True}})
    with pytest.raises(AimkpConfigError, match="models/awq-7b is quantized with awq"):
        check_checkpoint_quantization("models/awq-7b", {"quantization_config": {"quant_method": "awq"}})


def test_deepspeed_zero_0_to_3_files_are_accepted_and_others_named(tmp_path) -> None:
    for stage in (0, 1, 2, 3):
        path = tmp_path / f"ds_z{stage}.json"
        offload = {"offload_optimizer": {"device": "cpu"}} | (
            {"offload_param": {"device": "cpu"}} if stage == 3 else {}
        )
        path.write_text(json.dumps({"zero_optimization": {"stage": stage, **offload}}))
        extract_aimkp_arguments({"aimkp": True, "deepspeed": str(path)})
    path = tmp_path / "ds_z4.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 4}}))
    with pytest.raises(AimkpConfigError, match=f"{path} sets zero_optimization.stage: 4"):
        extract_aimkp_arguments({"aimkp": True, "deepspeed": str(path)})
    extract_aimkp_arguments({"aimkp": False, "deepspeed": str(path)})  # plain SFT: LLaMA-Factory's business


def test_projector_lr_refuses_a_deepspeed_optimizer_section() -> None:
    extract_aimkp_arguments({"aimkp_projector_lr": 2e-5, "deepspeed": {"zero_optimization": {"stage": 2}}})
    with pytest.raises(AimkpConfigError, match="optimizer section of the inline deepspeed JSON"):
        extract_aimkp_arguments({"aimkp_projector_lr": 2e-5, "deepspeed": {"optimizer": {"type": "AdamW"}}})


def test_unsupported_setups_are_fine_when_aimkp_is_off() -> None:
    config, arguments = extract_aimkp_arguments({"aimkp": False, "aimkp_init_stride": 2, "stage": "dpo"})
    assert config == {"stage": "dpo"} and arguments is not None and arguments.aimkp_init_stride == 2


def test_default_stage_is_sft() -> None:
    check_training_config(AimkpArguments(aimkp=True), {})


def test_argv_form_is_split_too() -> None:
    ours, rest = split_aimkp_argv(["--stage", "sft", "--aimkp", "--aimkp_init_stride=2", "--aimkp_filter", "false"])
    assert ours == {"aimkp": True, "aimkp_init_stride": "2", "aimkp_filter": "false"}
    assert rest == ["--stage", "sft"]
    config, arguments = extract_aimkp_arguments(["--stage", "dpo", "--aimkp_init_stride", "3"])
    assert config == ["--stage", "dpo"] and arguments.aimkp_init_stride == 3
    with pytest.raises(AimkpConfigError, match="got stage: dpo"):
        extract_aimkp_arguments(["--stage", "dpo", "--aimkp", "true"])


def test_llamafactory_parser_receives_config_without_aimkp_keys(tmp_path: Path) -> None:
    """The real ``get_train_args`` parses a config with aimkp keys (its HfArgumentParser rejects unknown keys)."""
    from llamafactory.hparams import get_train_args

    config = {
        "model_name_or_path": "not/downloaded",
        "stage": "sft",
        "do_train": True,
        "finetuning_type": "lora",
        "dataset": "anything",
        "template": "llava",
        "output_dir": str(tmp_path),
        "aimkp": False,
        "aimkp_text_threshold": 0.3,
        "aimkp_modalities": "image",
    }
    model_args, data_args, training_args, finetuning_args, _ = get_train_args(config)
    assert finetuning_args.stage == "sft" and model_args.model_name_or_path == "not/downloaded"
    assert active_arguments().aimkp_text_threshold == 0.3
    assert active_arguments().aimkp_modalities == ["image"]

    get_train_args({key: value for key, value in config.items() if not key.startswith("aimkp")})
    assert active_arguments() is None  # a new config without aimkp keys resets the process's options


def test_llamafactory_parser_reports_bad_value(tmp_path: Path) -> None:
    from llamafactory.hparams import get_train_args

    with pytest.raises(AimkpConfigError, match=r"aimkp_image_threshold must be a cosine in \[-1, 1\], got 2.0"):
        get_train_args({"model_name_or_path": "m", "output_dir": str(tmp_path), "aimkp_image_threshold": 2})


def test_help_texts_name_no_family_and_no_tuned_number() -> None:
    """Which families have the fast step and where auto shares a prefix are facts of the code (``aimkp models
    families``, ``AUTO_SHARE_FROM``); a help text that repeated them would drift, as the fast step's once did."""
    from dataclasses import fields

    from aimkp_plugin.families import FAMILIES
    from aimkp_plugin.method.pass_planning import AUTO_SHARE_FROM

    names = {model_type.lower() for family in FAMILIES for model_type in family.model_types}
    names |= {"llava", "qwen2-vl", "qwen2.5-vl", "qwen3-vl", "internvl", "gemma", "glm"}
    for item in fields(AimkpArguments):
        text = item.metadata["help"].lower()
        assert not [name for name in names if name in text], item.name
        assert f"{AUTO_SHARE_FROM:g}" not in text, item.name
