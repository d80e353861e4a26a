"""The table of LLaMA-Factory touch points: which ``_patch_*`` function patches which LLaMA-Factory module.

Each entry names the hooked module and its patches as ``"<integration module>:<function>"``, resolved only when the
module is imported, so this table imports nothing: ``aimkp_plugin._bootstrap`` reads ``HOOKED_MODULES`` from it at
interpreter start, and :mod:`aimkp_plugin.integration.patching` applies the patches. Each patch lives in the
integration module of its touch point, with a docstring saying what it replaces, why, and the versions it was tested
on.
"""

from __future__ import annotations


PATCHES: dict[str, tuple[str, ...]] = {
    "llamafactory.hparams.parser": ("args:_patch_hparams_parser_read_args",),
    "llamafactory.data.parser": ("dataset:_patch_data_parser_dataset_attr_join",),
    "llamafactory.data.converter": ("dataset:_patch_data_converter_register_cmkp",),
    "llamafactory.data.loader": ("dataset:_patch_data_loader_load_single_dataset",),
    "llamafactory.train.tuner": (
        "args:_patch_train_tuner_training_function",
        "rank_exit:_patch_train_tuner_run_exp",
    ),
    "llamafactory.train.sft.workflow": ("trainer:_patch_train_sft_workflow_trainer",),
    "llamafactory.webui.common": ("webui:_patch_webui_common_clean_cmd",),
    "llamafactory.webui.locales": ("webui:_patch_webui_locales_add_aimkp",),
    "llamafactory.webui.runner": (
        "webui:_patch_webui_runner_parse_train_args",
        "webui:_patch_webui_runner_initialize",
    ),
    "llamafactory.webui.components.train": ("webui:_patch_webui_components_train_create_train_tab",),
}

# Applied instead of PATCHES while the plugin is inactive (disabled, unsupported LLaMA-Factory): refuse configs that
# ask for AimKP, and say in the web UI why it has no AimKP section.
GUARD_PATCHES: dict[str, tuple[str, ...]] = {
    "llamafactory.hparams.parser": ("args:_patch_hparams_parser_refuse_aimkp",),
    "llamafactory.webui.components.train": ("webui:_patch_webui_components_train_warn_inactive",),
}

HOOKED_MODULES = frozenset(PATCHES) | frozenset(GUARD_PATCHES)
