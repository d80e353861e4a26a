"""Touch point: LLaMA-Factory's argument reading (``hparams.parser.read_args``) and training entry (``tuner``).

The ``aimkp*`` keys are taken out of the config before LLaMA-Factory's ``HfArgumentParser`` sees them (it rejects
unknown keys), validated, and kept for this process in :func:`active_arguments`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import ModuleType
from typing import Any

from ..checks import (
    SETUP_KEYS,
    check_checkpoint_quantization,
    check_engine_environment,
    check_model_has_image_input,
    check_projector_lr_config,
    check_training_config,
)
from ..config import (
    AimkpArguments,
    AimkpConfigError,
    argv_value,
    is_true,
    parse_aimkp_arguments,
    split_aimkp_argv,
    split_aimkp_keys,
)
from . import patching
from .evaluation import set_keyphrase_evaluation


_active_arguments: AimkpArguments | None = None


def active_arguments() -> AimkpArguments | None:
    """The AimKP options of the run in this process, or None when its config had no ``aimkp*`` key."""
    return _active_arguments


def set_active_arguments(arguments: AimkpArguments | None) -> None:
    global _active_arguments
    _active_arguments = arguments


def _config_value(config: dict[str, Any] | list[str], name: str) -> Any:
    return config.get(name) if isinstance(config, dict) else argv_value(config, name)


def extract_aimkp_arguments(config: Any) -> tuple[Any, AimkpArguments | None]:
    """Split a ``read_args`` result (dict or argv list) into (the config LLaMA-Factory parses, our options).

    Raises :class:`AimkpConfigError` for bad values or for ``aimkp: true`` with an unsupported training setup.
    """
    if isinstance(config, dict):
        ours, rest = split_aimkp_keys(config)
    elif isinstance(config, list):
        ours, rest = split_aimkp_argv(config)
    else:
        return config, None
    if not ours:
        return config, None
    arguments = parse_aimkp_arguments(ours)
    setup = {key: _config_value(rest, key) for key in SETUP_KEYS}
    if arguments.aimkp:
        check_training_config(arguments, setup)
        check_engine_environment(os.environ)
    if arguments.aimkp_projector_lr is not None:
        check_projector_lr_config(setup)
    return rest, arguments


class _ParsedConfig(dict):
    """A config dict whose ``aimkp*`` keys were already taken out; ``read_args`` passes it through unchanged."""


class _ParsedArgv(list):
    """The argv-list counterpart of :class:`_ParsedConfig`."""


def _patch_hparams_parser_read_args(module: ModuleType) -> None:
    """Replace ``llamafactory.hparams.parser.read_args`` by a version that removes and validates ``aimkp*`` keys.

    Why: every LLaMA-Factory entry point (train, chat, export, web UI) reads its YAML or argv through ``read_args``
    before ``HfArgumentParser``, which rejects unknown keys. LLaMA-Factory calls ``read_args`` again on the config it
    got back, so the result is marked as parsed; every other config (a new YAML, a dict from Python) sets the process's
    :func:`active_arguments` afresh. Tested on llamafactory 0.9.5 and main (0.9.6.dev0). It can go once LLaMA-Factory
    offers a plugin argument API.
    """

    def read_args(original: Any, args: Any = None) -> Any:
        if isinstance(args, (_ParsedConfig, _ParsedArgv)):
            return args
        config, arguments = extract_aimkp_arguments(original(args))
        if arguments is not None and arguments.aimkp:
            patching.require_active()
        set_active_arguments(arguments)
        if isinstance(config, dict):
            return _ParsedConfig(config)
        return _ParsedArgv(config) if isinstance(config, list) else config

    patching.wrap_function(module, "read_args", "read_args", read_args)


def _patch_hparams_parser_refuse_aimkp(module: ModuleType) -> None:
    """While the plugin is inactive, make ``read_args`` refuse configs with ``aimkp: true``.

    Why: with ``ALLOW_EXTRA_ARGS=1`` LLaMA-Factory would otherwise ignore the key and quietly train plain SFT.
    Tested on llamafactory 0.9.5 and main (0.9.6.dev0).
    """

    def read_args(original: Any, args: Any = None) -> Any:
        config = original(args)
        ours, _ = split_aimkp_keys(config) if isinstance(config, dict) else split_aimkp_argv(list(config))
        if is_true(ours.get("aimkp", False)):
            patching.require_active()
        return config

    patching.wrap_function(module, "read_args", "read_args_refuse_aimkp", read_args)


def load_model_config(model_name_or_path: str, trust_remote_code: bool = False) -> dict[str, Any]:
    """A model's config as a dict, from a local ``config.json`` or through ``AutoConfig`` (no weights loaded)."""
    config_file = Path(model_name_or_path) / "config.json"
    if config_file.is_file():
        return json.loads(config_file.read_text(encoding="utf-8"))
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(model_name_or_path, trust_remote_code=trust_remote_code).to_dict()
    except (OSError, ValueError) as err:
        raise AimkpConfigError(
            f"Cannot read the config of {model_name_or_path} to check that it takes images: {err}"
        ) from err


def check_before_training(config: dict[str, Any] | list[str], arguments: AimkpArguments) -> None:
    """Checks that need the model config; run before LLaMA-Factory loads the tokenizer or the model."""
    model = _config_value(config, "model_name_or_path")
    if model is None:
        raise AimkpConfigError("aimkp: true needs model_name_or_path.")
    if arguments.aimkp:
        check_template_is_answered(_config_value(config, "template"))
    trust = is_true(_config_value(config, "trust_remote_code"))
    model_config = load_model_config(str(model), trust)
    from ..families import family_for  # torch and the family modules: only once a run asks for AimKP

    family = family_for(model_config)
    if arguments.aimkp_projector_lr is not None and not family.projector:
        raise AimkpConfigError(
            f"aimkp_projector_lr: no projector is known for model_type {family.name} (the families of the README's "
            "Supported models table name theirs). Remove aimkp_projector_lr."
        )
    if not arguments.aimkp:
        return
    check_model_has_image_input(str(model), model_config)
    check_checkpoint_quantization(str(model), model_config)
    check_family_is_known(str(model), family)
    problems = family.run_problems(model_config, lambda name: _config_value(config, name))
    if problems:
        raise AimkpConfigError(f"aimkp: true with a {family.name} model: " + " ".join(problems))


def check_template_is_answered(template: str | None) -> None:
    """A multimodal template that ``aimkp_plugin.families.templates`` refuses stops here, before the model config is
    read: the reason names what the template's models do that AimKP cannot be exact with, and the nearest supported
    family. Text-only templates pass (an image model with one fails in LLaMA-Factory's own checks)."""
    from ..families.templates import template_answer
    from .templates import multimodal_templates

    registry = multimodal_templates()
    if template is None or template not in registry:
        return
    answer = template_answer(str(template), registry[template])
    if answer.refused:
        raise AimkpConfigError(
            f"aimkp: true does not support template: {template}: {answer.reason} (`aimkp models families "
            "--templates` lists every template's answer.)"
        )


def check_family_is_known(model: str, family: Any) -> None:
    """An image-text model whose ``model_type`` no family module describes stops here, before it loads: where its
    image tokens sit, how its positions run and whether its layers mix tokens outside attention decide what a masked
    copy is, and a guess could train something other than the method without saying so."""
    from ..families import FAMILIES, GenericFamily

    if not isinstance(family, GenericFamily):
        return
    supported = ", ".join(dict.fromkeys(model_type for known in FAMILIES for model_type in known.model_types))
    raise AimkpConfigError(
        f"aimkp: true does not support model_type {family.name} ({model}) yet: no model family of the plugin says "
        "where its image tokens sit, how its positions run and whether its layers mix tokens outside attention, "
        f"which decide what a masked copy is. Supported model types: {supported} (`aimkp models families`). Train "
        "it without aimkp, or use a supported model."
    )


def _patch_train_tuner_training_function(module: ModuleType) -> None:
    """Wrap ``llamafactory.train.tuner._training_function`` to check an AimKP run before any model is loaded.

    Why: ``_training_function`` is the first place all processes (single, torchrun ranks, the web UI's training
    process) pass through with the parsed config and before ``run_sft`` loads the model. It also decides here whether
    evaluation reports the keyphrase metrics (``cmkp`` evaluation data with generation). It is also where
    LLaMA-Factory sends a run to another trainer than the SFT workflow's (HyperParallel, Megatron-Core, and in main
    Megatron-Bridge); :func:`extract_aimkp_arguments` has refused those for ``aimkp: true`` by then (their keys and
    environment variables: ``OTHER_TRAINER_KEYS`` and ``OTHER_TRAINER_ENVIRONMENT`` in :mod:`aimkp_plugin.checks`).
    Tested on llamafactory 0.9.5 and main (0.9.6.dev0).
    """

    def _training_function(original: Any, config: dict[str, Any]) -> Any:
        arguments = active_arguments()
        run_config = config.get("args") or {}
        set_keyphrase_evaluation(lambda name: _config_value(run_config, name))
        if arguments is not None and (arguments.aimkp or arguments.aimkp_projector_lr is not None):
            patching.require_active()
            check_before_training(run_config, arguments)
        return original(config)

    patching.wrap_function(module, "_training_function", "training_function", _training_function)
