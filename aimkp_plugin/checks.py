"""The checks of a training config that read more than the ``aimkp*`` keys: the stage, the engines (DDP,
DeepSpeed's JSON), losses and options the AimKP step would bypass, optimizers that build their own parameter groups,
and whether the model takes images. Called before any model loads.

Pure Python, as :mod:`.config`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from .config import FALSE_STRINGS, AimkpArguments, AimkpConfigError, to_bool


SUPPORTED_STAGES = ("sft",)


# Options whose effect the AimKP step would bypass or break: (key, why). The step computes its own plain
# cross-entropy, writes .grad itself and needs prompt tokens without loss.
UNSUPPORTED_OPTIONS = (
    ("fp16", "its loss scaling does not reach the gradients the step writes; use bf16 or float32"),
    ("train_on_prompt", "prompt tokens must carry no loss (the spans are found before the first answer token)"),
    ("use_dft_loss", "the step uses the plain cross-entropy of the spec"),
    ("use_eaft_loss", "the step uses the plain cross-entropy of the spec"),
    ("use_asft_loss", "the step uses the plain cross-entropy of the spec"),
    ("galore_layerwise", "layer-wise optimizer steps would run inside each copy's backward pass"),
    ("apollo_layerwise", "layer-wise optimizer steps would run inside each copy's backward pass"),
    ("enable_liger_kernel", "Liger's fused cross-entropy returns no logits, and the step needs each copy's own loss"),
    ("use_unsloth", "Unsloth replaces the model's forward and attention, which the step calls with its own masks"),
)
# LLaMA-Factory options that build their own optimizer (or parameter groups): aimkp_projector_lr cannot add a group.
OWN_OPTIMIZER_KEYS = (
    "loraplus_lr_ratio",
    "use_galore",
    "use_apollo",
    "use_badam",
    "use_adam_mini",
    "use_muon",
    "fsdp",
)
# Training paths that leave LLaMA-Factory's SFT workflow, whose trainer runs the AimKP step (or change what the step's
# passes compute): (key, why). LLaMA-Factory's train/tuner.py sends use_hyper_parallel to a trainer of its own; use_kt
# keeps the SFT trainer but runs the MoE experts in KTransformers' kernels.
OTHER_TRAINER_KEYS = (
    ("use_hyper_parallel", "HyperParallel trains with a trainer of its own, so the AimKP step would not run"),
    ("use_kt", "KTransformers runs the MoE experts in kernels of its own, which the AimKP step is not tested with"),
)
FSDP_WHY = (
    "FSDP shards the parameters and reduces the gradients in hooks of its own, and the AimKP step's hand-off to FSDP "
    "is not built: FSDP cannot run on the CPU-only machines the plugin is tested on (accelerate stops with 'no "
    "available devices'). Use DeepSpeed ZeRO-3 (recipes/deepspeed/ds_z3_config.json) for models that need sharding"
)
# The same, switched on by an environment variable (LLaMA-Factory reads "true", "y" or "1", any case): USE_MCA
# (Megatron-Core, since 0.9.4) and USE_MEGATRON_BRIDGE (Megatron-Bridge, LLaMA-Factory main) make train/tuner.py run
# their own SFT; ACCELERATE_USE_FSDP (accelerate launch with an FSDP config) makes the trainer wrap the model in FSDP.
OTHER_TRAINER_ENVIRONMENT = (
    ("ACCELERATE_USE_FSDP", "set by accelerate launch with an FSDP config: " + FSDP_WHY),
    ("USE_MCA", "Megatron-Core (mcore_adapter) trains with a trainer of its own, so the AimKP step would not run"),
    ("USE_MEGATRON_BRIDGE", "Megatron-Bridge trains with a trainer of its own, so the AimKP step would not run"),
)
SETUP_KEYS = tuple(
    dict.fromkeys(
        ("stage", "packing", "neat_packing", "use_ray", "streaming", "deepspeed", "fsdp", "flash_attn")
        + tuple(key for key, _ in OTHER_TRAINER_KEYS)
        + ("quantization_bit", "quantization_method")
        + tuple(key for key, _ in UNSUPPORTED_OPTIONS)
        + ("label_smoothing_factor", "neftune_noise_alpha", "lora_dropout")
        + OWN_OPTIMIZER_KEYS
    )
)  # the config values the checks read, each once
ATTENTION_WITHOUT_MASKS = ("fa2", "fa3")  # FlashAttention takes no custom attention mask
# QLoRA backends with which the steps are tested exact: LLaMA-Factory's quantization_method, and the quant_method of a
# checkpoint's own quantization_config
TESTED_QUANTIZATION = ("bnb",)
TESTED_CHECKPOINT_QUANTIZATION = ("bitsandbytes",)
SUPPORTED_ENGINES = (
    "single process, DDP through torchrun (FORCE_TORCHRUN=1 / several GPUs), or DeepSpeed ZeRO-0, ZeRO-1, ZeRO-2 and "
    "ZeRO-3"
)
DEEPSPEED_STAGES = (0, 1, 2, 3)


def is_set(value: Any) -> bool:
    """Whether a config value turns its option on: not None, False, 0, an empty string, list or dict, nor a string
    such as "false", "0", "no", "off" or "none" (any case)."""
    if value is None or isinstance(value, bool):
        return bool(value)
    if isinstance(value, (int, float)):
        return value != 0
    if isinstance(value, str):
        return value.strip().lower() not in ("", "none", *FALSE_STRINGS)
    if isinstance(value, (list, tuple, dict)):
        return len(value) > 0
    return True


def read_deepspeed_config(value: Any) -> dict[str, Any]:
    """The DeepSpeed config a ``deepspeed:`` value names: a JSON file (as LLaMA-Factory's examples), inline JSON, or a
    dict; stops with the file and the reason when it cannot be read."""
    if isinstance(value, dict):
        return value
    text = str(value).strip()
    source = "the inline deepspeed JSON" if text.startswith("{") else f"deepspeed: {text}"
    try:
        config = json.loads(text if text.startswith("{") else open(text, encoding="utf-8").read())
    except OSError as err:
        raise AimkpConfigError(f"{source}: cannot read the DeepSpeed config ({err.strerror}).") from err
    except json.JSONDecodeError as err:
        raise AimkpConfigError(f"{source}: not valid JSON (line {err.lineno}: {err.msg}).") from err
    if not isinstance(config, dict):
        raise AimkpConfigError(f"{source}: a DeepSpeed config is a JSON object.")
    return config


def deepspeed_config_name(value: Any) -> str:
    """How an error names a ``deepspeed:`` value: its file, or the inline JSON."""
    return "the inline deepspeed JSON" if isinstance(value, dict) or str(value).strip().startswith("{") else value


def zero_stage(config: dict[str, Any]) -> Any:
    """The ZeRO stage of a DeepSpeed config (0 when it has none): an int, or the value as written if not a number."""
    zero = config.get("zero_optimization") or {}
    stage = zero.get("stage", 0) if isinstance(zero, dict) else 0
    return int(stage) if str(stage).strip().isdigit() else stage


def check_deepspeed_config(value: Any, aimkp: bool, projector_lr: bool) -> None:
    """Reject DeepSpeed settings the AimKP step (``aimkp``) or ``aimkp_projector_lr`` cannot be exact with.

    The step hands its gradient to DeepSpeed's own backward, so ZeRO-0 to ZeRO-3 reduce, partition, accumulate and clip
    it as they would a loss's (under ZeRO-3 the step runs on the gathered model). NVMe offload swaps tensors only
    around the engine's own passes; an ``optimizer`` section makes DeepSpeed build the optimizer, so the projector's
    parameter group could not be added.
    """
    config = read_deepspeed_config(value)
    name = deepspeed_config_name(value)
    zero = config.get("zero_optimization") or {}
    stage = zero_stage(config)
    if aimkp and stage not in DEEPSPEED_STAGES:
        raise AimkpConfigError(
            f"aimkp: true supports DeepSpeed ZeRO stages 0, 1, 2 and 3, but {name} sets zero_optimization.stage: "
            f"{stage}. Set stage 2 (or 3), or train with DDP without deepspeed."
        )
    for section in ("offload_param", "offload_optimizer"):
        offload = zero.get(section) if isinstance(zero, dict) else None
        if aimkp and isinstance(offload, dict) and str(offload.get("device", "")).lower() == "nvme":
            raise AimkpConfigError(
                f"aimkp: true cannot use {section} to NVMe ({name}): DeepSpeed swaps NVMe-held tensors only around "
                "its own forward passes, which the AimKP step does not use. Use device: cpu, or remove the section."
            )
    types = config.get("data_types") or {}
    accumulation = str(types.get("grad_accum_dtype", "")).lower() if isinstance(types, dict) else ""
    optimizer_offload = zero.get("offload_optimizer") if isinstance(zero, dict) else None
    cpu_offload = isinstance(optimizer_offload, dict) and optimizer_offload.get("device") == "cpu"
    if aimkp and stage == 1 and accumulation in ("fp32", "float32", "float") and not cpu_offload:
        raise AimkpConfigError(
            f"aimkp: true cannot use ZeRO-1 with data_types.grad_accum_dtype: fp32 ({name}): with bf16 DeepSpeed then "
            "trains with its BF16_Optimizer, which collects gradients only from the engine's own forward passes. "
            "Use ZeRO-2, or remove data_types.grad_accum_dtype."
        )
    fp16 = config.get("fp16") or {}
    if aimkp and isinstance(fp16, dict) and fp16.get("enabled") is True:
        raise AimkpConfigError(
            f"aimkp: true is not tested with fp16 ({name} sets fp16.enabled: true). Use bf16 (bf16.enabled, or "
            "bf16: true in the YAML), or float32."
        )
    if projector_lr and "optimizer" in config:
        raise AimkpConfigError(
            f"aimkp_projector_lr cannot be combined with the optimizer section of {name}: DeepSpeed then builds the "
            "optimizer itself, and the projector's parameter group could not be added. Remove the optimizer section "
            "(LLaMA-Factory's optimizer is used), or aimkp_projector_lr."
        )


def check_projector_lr_config(setup: dict[str, Any]) -> None:
    """Reject ``aimkp_projector_lr`` with options that make their own optimizer; ``setup`` maps ``SETUP_KEYS``."""
    if is_set(setup.get("deepspeed")):
        check_deepspeed_config(setup["deepspeed"], aimkp=False, projector_lr=True)
    for name in OWN_OPTIMIZER_KEYS:
        value = setup.get(name)
        if not is_set(value):
            continue
        raise AimkpConfigError(
            f"aimkp_projector_lr cannot be combined with {name}: {value} ({name} builds its own optimizer or "
            f"parameter groups, so the projector's group could not be added). Remove {name}, or aimkp_projector_lr."
        )


def check_training_config(args: AimkpArguments, setup: dict[str, Any]) -> None:
    """Reject training setups AimKP cannot run with; ``setup`` maps ``SETUP_KEYS`` to the config's values.

    Called only when ``aimkp: true``.
    """
    stage = setup.get("stage") or "sft"
    if stage not in SUPPORTED_STAGES:
        raise AimkpConfigError(
            f"aimkp: true needs stage one of: {', '.join(SUPPORTED_STAGES)}; got stage: {stage}. "
            "Set stage: sft, or remove aimkp."
        )
    for name in ("packing", "neat_packing", "streaming"):
        value = setup.get(name)
        if value is not None and to_bool(name, value):
            reason = "masking needs one sample per sequence" if "packing" in name else "samples need a stable index"
            raise AimkpConfigError(f"aimkp: true cannot be combined with {name}: true ({reason}). Set {name}: false.")
    if is_set(setup.get("deepspeed")):
        check_deepspeed_config(setup["deepspeed"], aimkp=True, projector_lr=False)
    if is_set(setup.get("fsdp")):
        raise AimkpConfigError(f"aimkp: true does not support fsdp: {setup['fsdp']} ({FSDP_WHY}). Remove fsdp.")
    if is_set(setup.get("use_ray")):
        raise AimkpConfigError(
            f"aimkp: true does not support use_ray yet; supported engines: {SUPPORTED_ENGINES}. Remove use_ray."
        )
    for name, why in OTHER_TRAINER_KEYS:
        value = setup.get(name)
        if is_set(value):
            raise AimkpConfigError(
                f"aimkp: true does not support {name}: {value} yet ({why}); supported engines: {SUPPORTED_ENGINES}. "
                f"Remove {name}."
            )
    for name, why in UNSUPPORTED_OPTIONS:
        value = setup.get(name)
        if value is not None and to_bool(name, value):
            raise AimkpConfigError(f"aimkp: true cannot be combined with {name}: true ({why}). Set {name}: false.")
    if float(setup.get("label_smoothing_factor") or 0) != 0:
        raise AimkpConfigError(
            "aimkp: true cannot be combined with label_smoothing_factor (the step uses the plain cross-entropy of "
            "the spec). Set label_smoothing_factor: 0."
        )
    if float(setup.get("neftune_noise_alpha") or 0) != 0:
        raise AimkpConfigError(
            "aimkp: true cannot be combined with neftune_noise_alpha: NEFTune draws fresh noise for every forward "
            "pass, so the original and its masked copies would see different inputs and the cosines would measure "
            "the noise. Remove neftune_noise_alpha (or set it to 0)."
        )
    if args.aimkp_fast_share_prefix is True and float(setup.get("lora_dropout") or 0) > 0:
        raise AimkpConfigError(
            f"aimkp_fast_share_prefix: true cannot be combined with lora_dropout: {setup['lora_dropout']}: the "
            "original and its text copy would share the prefix's dropout masks, where each forward pass should draw "
            "its own. Set lora_dropout: 0, or aimkp_fast_share_prefix: auto (it then keeps the copies apart)."
        )
    attention = str(setup.get("flash_attn") or "auto")
    if attention in ATTENTION_WITHOUT_MASKS:
        raise AimkpConfigError(
            f"aimkp: true masks tokens with a custom attention mask, which flash_attn: {attention} cannot take. "
            "Use flash_attn: sdpa (or auto / disabled)."
        )
    check_quantization(setup)


def check_quantization(setup: dict[str, Any]) -> None:
    """QLoRA (``quantization_bit``) only through bitsandbytes: the base weights stay frozen and quantized in both
    steps, and the fast step's per-copy gradients (LoRA's own Linear layers) are checked against the reference there.
    Other backends' kernels are not, and a backward that varies from pass to pass would reach the cosines."""
    if not is_set(setup.get("quantization_bit")):
        return
    if is_set(setup.get("deepspeed")) and zero_stage(read_deepspeed_config(setup["deepspeed"])) == 3:
        raise AimkpConfigError(
            f"aimkp: true with quantization_bit is not tested under DeepSpeed ZeRO-3 "
            f"({deepspeed_config_name(setup['deepspeed'])}; LLaMA-Factory itself takes only 4-bit there). Use ZeRO-2 "
            "or DDP for QLoRA, or remove quantization_bit."
        )
    method = str(setup.get("quantization_method") or "bnb").strip().lower()
    if method not in TESTED_QUANTIZATION:
        raise AimkpConfigError(
            f"aimkp: true with quantization_bit is tested exact with quantization_method: bnb (bitsandbytes) only, "
            f"not {method}: its kernels' backward has not been checked against the reference step. Set "
            "quantization_method: bnb, or remove quantization_bit."
        )


def check_checkpoint_quantization(model_name_or_path: str, model_config: dict[str, Any]) -> None:
    """A checkpoint quantized ahead of time (its ``config.json`` has a ``quantization_config``) only with
    bitsandbytes, for the reason of :func:`check_quantization`."""
    quantization = model_config.get("quantization_config")
    if not isinstance(quantization, dict):
        return
    method = str(quantization.get("quant_method", "unknown")).lower()
    if method not in TESTED_CHECKPOINT_QUANTIZATION:
        raise AimkpConfigError(
            f"aimkp: true is tested exact on bitsandbytes-quantized models only, and {model_name_or_path} is "
            f"quantized with {method} (its config.json's quantization_config): its kernels' backward has not been "
            "checked against the reference step. Use the unquantized checkpoint with quantization_bit: 4 "
            "(bitsandbytes QLoRA)."
        )


def check_engine_environment(environ: Mapping[str, str]) -> None:
    """Reject the environment variables that make LLaMA-Factory train with another trainer than its SFT workflow's,
    where the AimKP step would not run, or with FSDP (``OTHER_TRAINER_ENVIRONMENT``). Called only when ``aimkp:
    true``."""
    for name, why in OTHER_TRAINER_ENVIRONMENT:
        value = environ.get(name, "")
        if value.strip().lower() in ("true", "y", "1"):
            raise AimkpConfigError(
                f"aimkp: true does not support {name}={value} ({why}); supported engines: {SUPPORTED_ENGINES}. "
                f"Unset {name}."
            )


IMAGE_CONFIG_KEYS = ("vision_config", "image_token_index", "image_token_id", "mm_vision_tower")


def has_image_input(model_config: dict[str, Any]) -> bool:
    """True when a model's ``config.json`` describes an image input (a vision tower or an image token)."""
    return any(key in model_config for key in IMAGE_CONFIG_KEYS)


def check_model_has_image_input(model_name_or_path: str, model_config: dict[str, Any]) -> None:
    if not has_image_input(model_config):
        model_type = model_config.get("model_type", "unknown")
        raise AimkpConfigError(
            f"aimkp: true needs a model with image input, but {model_name_or_path} (model_type {model_type}) has "
            f"none: its config has none of {', '.join(IMAGE_CONFIG_KEYS)}. Use a vision-language model such as "
            "LLaVA-1.5 or Qwen2-VL."
        )
