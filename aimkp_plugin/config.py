"""The plugin's YAML keys (all prefixed ``aimkp``), their defaults (the authors' run, see the spec), the checks of
each key on its own, and how the keys are taken out of a config or a command line. The checks that read other
options of the run (engines, losses, optimizers) are :mod:`.checks`'s.

Pure Python: parsing and validating a config never imports torch, transformers or LLaMA-Factory.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, field, fields
from typing import Any


KEY_PREFIX = "aimkp"
MODALITIES = ("text", "image")
IMPLEMENTATIONS = ("fast", "reference")
INPUT_SETTINGS = ("full", "text_only", "image_only")
THRESHOLD_RANGE = (-1.0, 1.0)
TRUE_STRINGS = ("true", "1", "yes", "on")
FALSE_STRINGS = ("false", "0", "no", "off")


class AimkpConfigError(ValueError):
    """An ``aimkp*`` key, or its combination with the rest of the training config, is invalid."""


@dataclass
class AimkpArguments:
    """AimKP options read from an ordinary LLaMA-Factory YAML (or ``key=value`` overrides on the command line)."""

    aimkp: bool = field(
        default=False,
        metadata={"help": "Train with AimKP (Progressive Modality Masking + Gradient-Based Filtering). SFT only."},
    )
    aimkp_text_threshold: float = field(
        default=0.1,
        metadata={
            "help": "tau_text in [-1, 1]: a text-masked copy whose gradient has cosine < tau_text with the original's "
            "gradient is dropped, and the sample's text stride stops growing."
        },
    )
    aimkp_image_threshold: float = field(
        default=0.4,
        metadata={"help": "tau_image in [-1, 1]: the same rule for the image-masked copy."},
    )
    aimkp_init_stride: int = field(
        default=1,
        metadata={
            "help": "Initial masking stride gamma (>= 1) of every sample and modality. With 1 a sample is not masked "
            "in its first epoch, then stride 2, 4, 8, ... while its masked copies agree with the original."
        },
    )
    aimkp_modalities: list[str] = field(
        default_factory=lambda: list(MODALITIES),
        metadata={
            "help": "Which modalities get masked copies: a list or comma-separated string of "
            f"{', '.join(MODALITIES)}. Use one of them alone for ablations."
        },
    )
    aimkp_filter: bool = field(
        default=True,
        metadata={"help": "Gradient-Based Filtering. False keeps every masked copy (masking without filtering)."},
    )
    aimkp_progressive: bool = field(
        default=True,
        metadata={"help": "Progressive strides. False keeps every stride fixed at aimkp_init_stride."},
    )
    aimkp_impl: str = field(
        default="fast",
        metadata={
            "help": f"How the AimKP step is computed: one of {', '.join(IMPLEMENTATIONS)}; both give the same "
            "updates. 'fast' encodes each image once, drops masked tokens, runs all variants of a micro-batch "
            "together and gets every variant's gradient from one backward pass (the families whose row in `aimkp "
            "models families` says fast, training LoRA and/or the projector; a model or trained parameter it does "
            "not cover runs 'reference', with a warning that says why). 'reference' runs every sample and variant "
            "one at a time, exactly as the spec states it."
        },
    )
    aimkp_fast_max_tokens: int = field(
        default=0,
        metadata={
            "help": "For aimkp_impl: fast, the most padded tokens one forward pass may hold. 0: the micro-batch's own "
            "padded size (per_device_train_batch_size × its longest sequence, as plain SFT's forward), and on a GPU "
            "at least one sample's three rows at that length (batch 1 and 2 then run a sample's original and copies "
            "as one pass); cutoff_len caps activations at the reference's one-sequence passes, more runs faster."
        },
    )
    aimkp_fast_buffer_mb: int | str = field(
        default="auto",
        metadata={
            "help": "For aimkp_impl: fast, the most memory in MiB the per-copy gradient buffer may take (one float32 "
            "row of all trained parameters per copy). The micro-batch is trained in groups of samples whose copies "
            "fit, each group's share added before the next (exact); a sample whose copies alone need more forms a "
            "group of its own. auto: on a GPU, half the free device memory, and at most half of what the model, "
            "its gradients and optimizer state hold when the step starts; elsewhere 1024. 0: no limit."
        },
    )
    aimkp_fast_share_prefix: str | bool = field(
        default="auto",
        metadata={
            "help": "For aimkp_impl: fast, compute the prefix that a sample's text copy shares with its original (the "
            "tokens before the first hidden text token: system prompt, image, post text before it) once per decoder "
            "layer, with each copy's gradient still kept apart (exact). auto: on a CPU only (measured faster there; "
            "on a GPU not measured yet), for the pairs whose prefix is a large enough share of their tokens to pay "
            "(the threshold is in docs/fast-step.md), and never with dropout in the decoder layers (the copies "
            "would share the prefix's dropout masks); true: every pair (refused with dropout); false: never."
        },
    )
    aimkp_projector_lr: float | None = field(
        default=None,
        metadata={
            "help": "Learning rate of the projector's trained parameters, in their own optimizer parameter group "
            "(the authors used 2e-5 with 2e-4 for LoRA); everything else keeps learning_rate, and the scheduler "
            "scales both. Unset: one learning rate. Works with aimkp: false too."
        },
    )
    aimkp_input_setting: str = field(
        default="full",
        metadata={
            "help": f"Which modalities cmkp prompts carry: one of {', '.join(INPUT_SETTINGS)}. text_only removes the "
            "image and its placeholder; image_only removes the post text and keeps the instruction (the paper's "
            "robustness protocol). Applies to every cmkp dataset of the run."
        },
    )
    aimkp_skip_bad_records: bool = field(
        default=False,
        metadata={
            "help": "For cmkp datasets: skip unusable records (missing image, empty text, ...) and report them, "
            "instead of stopping with an error. Applies to plain SFT too."
        },
    )

    def __post_init__(self) -> None:
        self.aimkp = to_bool("aimkp", self.aimkp)
        self.aimkp_filter = to_bool("aimkp_filter", self.aimkp_filter)
        self.aimkp_progressive = to_bool("aimkp_progressive", self.aimkp_progressive)
        self.aimkp_skip_bad_records = to_bool("aimkp_skip_bad_records", self.aimkp_skip_bad_records)
        for name in ("aimkp_text_threshold", "aimkp_image_threshold"):
            value = _to_float(name, getattr(self, name))
            low, high = THRESHOLD_RANGE
            if not low <= value <= high:
                raise AimkpConfigError(f"{name} must be a cosine in [{low:g}, {high:g}], got {value!r}.")
            setattr(self, name, value)
        self.aimkp_init_stride = _to_int("aimkp_init_stride", self.aimkp_init_stride)
        if self.aimkp_init_stride < 1:
            raise AimkpConfigError(f"aimkp_init_stride must be an integer >= 1, got {self.aimkp_init_stride}.")
        self.aimkp_fast_max_tokens = _to_int("aimkp_fast_max_tokens", self.aimkp_fast_max_tokens)
        if self.aimkp_fast_max_tokens < 0:
            value = self.aimkp_fast_max_tokens
            raise AimkpConfigError(f"aimkp_fast_max_tokens must be an integer >= 0 (0: automatic), got {value}.")
        value = self.aimkp_fast_buffer_mb
        if isinstance(value, str) and value.strip() == "auto":
            self.aimkp_fast_buffer_mb = "auto"
        else:
            wrong = AimkpConfigError(
                f"aimkp_fast_buffer_mb must be auto or an integer >= 0 (MiB; 0: no limit), got {value!r}."
            )
            try:
                self.aimkp_fast_buffer_mb = _to_int("aimkp_fast_buffer_mb", value)
            except AimkpConfigError:
                raise wrong from None
            if self.aimkp_fast_buffer_mb < 0:
                raise wrong
        if not (isinstance(self.aimkp_fast_share_prefix, str) and self.aimkp_fast_share_prefix.strip() == "auto"):
            try:
                self.aimkp_fast_share_prefix = to_bool("aimkp_fast_share_prefix", self.aimkp_fast_share_prefix)
            except AimkpConfigError:
                value = self.aimkp_fast_share_prefix
                raise AimkpConfigError(
                    f"aimkp_fast_share_prefix must be auto, true or false, got {value!r}."
                ) from None
        if self.aimkp_projector_lr is not None:
            self.aimkp_projector_lr = _to_float("aimkp_projector_lr", self.aimkp_projector_lr)
            if self.aimkp_projector_lr < 0:
                raise AimkpConfigError(
                    f"aimkp_projector_lr must be a learning rate >= 0, got {self.aimkp_projector_lr}."
                )
        self.aimkp_modalities = _to_modalities(self.aimkp_modalities)
        if self.aimkp_input_setting not in INPUT_SETTINGS:
            allowed = ", ".join(INPUT_SETTINGS)
            raise AimkpConfigError(f"aimkp_input_setting must be one of: {allowed}; got {self.aimkp_input_setting!r}.")
        if self.aimkp_impl not in IMPLEMENTATIONS:
            allowed = ", ".join(IMPLEMENTATIONS)
            raise AimkpConfigError(f"aimkp_impl must be one of: {allowed}; got {self.aimkp_impl!r}.")

    @property
    def share_prefix(self) -> bool | None:
        """``aimkp_fast_share_prefix`` for the fast step: None for auto."""
        return None if isinstance(self.aimkp_fast_share_prefix, str) else self.aimkp_fast_share_prefix

    @property
    def threshold(self) -> dict[str, float]:
        return {"text": self.aimkp_text_threshold, "image": self.aimkp_image_threshold}

    def to_dict(self) -> dict[str, Any]:
        return {item.name: getattr(self, item.name) for item in fields(self)}


KNOWN_KEYS = tuple(item.name for item in fields(AimkpArguments))


def is_aimkp_key(key: object) -> bool:
    return isinstance(key, str) and (key == KEY_PREFIX or key.startswith(KEY_PREFIX + "_"))


def is_true(value: Any) -> bool:
    """Whether a YAML or command-line flag is on: ``True``, or one of ``TRUE_STRINGS`` in any case."""
    return str(value).strip().lower() in TRUE_STRINGS


def to_bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in TRUE_STRINGS + FALSE_STRINGS:
        return value.strip().lower() in TRUE_STRINGS
    raise AimkpConfigError(f"{name} must be true or false, got {value!r}.")


def _to_float(name: str, value: Any) -> float:
    if isinstance(value, bool):
        raise AimkpConfigError(f"{name} must be a number, got {value!r}.")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise AimkpConfigError(f"{name} must be a number, got {value!r}.") from None


def _to_int(name: str, value: Any) -> int:
    if isinstance(value, bool):
        raise AimkpConfigError(f"{name} must be an integer, got {value!r}.")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise AimkpConfigError(f"{name} must be an integer, got {value!r}.") from None
    if not number.is_integer():
        raise AimkpConfigError(f"{name} must be an integer, got {value!r}.")
    return int(number)


def _to_modalities(value: Any) -> list[str]:
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)):
        raise AimkpConfigError(
            f"aimkp_modalities must be a list or a comma-separated string of {', '.join(MODALITIES)}; got {value!r}."
        )
    chosen = [str(item).strip().lower() for item in items if str(item).strip()]
    unknown = [item for item in chosen if item not in MODALITIES]
    if unknown or not chosen:
        raise AimkpConfigError(f"aimkp_modalities must name one or more of: {', '.join(MODALITIES)}; got {value!r}.")
    return [modality for modality in MODALITIES if modality in chosen]  # canonical order, no duplicates


def parse_aimkp_arguments(raw: dict[str, Any]) -> AimkpArguments:
    """Build ``AimkpArguments`` from the ``aimkp*`` keys of a config; unknown ``aimkp_`` keys get a suggestion."""
    for key in raw:
        if key not in KNOWN_KEYS:
            close = difflib.get_close_matches(key, KNOWN_KEYS, n=1, cutoff=0.6)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise AimkpConfigError(f"Unknown key {key!r}.{hint} Known aimkp keys: {', '.join(KNOWN_KEYS)}.")
    return AimkpArguments(**raw)


def split_aimkp_keys(config: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split a config dict into (the ``aimkp*`` keys, everything else)."""
    ours = {key: value for key, value in config.items() if is_aimkp_key(key)}
    rest = {key: value for key, value in config.items() if not is_aimkp_key(key)}
    return ours, rest


def split_aimkp_argv(argv: list[str]) -> tuple[dict[str, Any], list[str]]:
    """Split ``--key value`` / ``--key=value`` command-line arguments into (the ``aimkp*`` keys, the rest).

    A bare ``--aimkp_flag`` followed by another option (or nothing) means ``true``, as in HfArgumentParser.
    """
    ours: dict[str, Any] = {}
    rest: list[str] = []
    index = 0
    while index < len(argv):
        item = argv[index]
        name = item[2:].split("=", 1)[0] if item.startswith("--") else ""
        if not is_aimkp_key(name):
            rest.append(item)
            index += 1
            continue
        if "=" in item:
            ours[name] = item.split("=", 1)[1]
            index += 1
        elif index + 1 < len(argv) and not argv[index + 1].startswith("--"):
            ours[name] = argv[index + 1]
            index += 2
        else:
            ours[name] = True
            index += 1
    return ours, rest


def argv_value(argv: list[str], name: str) -> Any:
    """The value of ``--name`` in an argument list (``True`` for a bare flag), or ``None``."""
    for index, item in enumerate(argv):
        if item == f"--{name}":
            following = argv[index + 1] if index + 1 < len(argv) else None
            return True if following is None or following.startswith("--") else following
        if item.startswith(f"--{name}="):
            return item.split("=", 1)[1]
    return None


def plugin_disabled() -> bool:
    """``AIMKP_PLUGIN_DISABLE=1`` (or true/yes/on) turns the plugin off."""
    return is_true(os.environ.get("AIMKP_PLUGIN_DISABLE", ""))
