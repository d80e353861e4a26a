"""Touch point: LlamaBoard, LLaMA-Factory's web UI (``llamafactory-cli webui``).

Adds an "AimKP" section to the Train tab, right after the other method sections (BAdam is the last in 0.9.5 and
main). Its inputs are bound to "Preview command", "Start", "Save arguments" and "Load arguments" like LLaMA-Factory's
own, and with "Use AimKP" ticked the training arguments get the ``aimkp*`` keys with the section's values (none
otherwise). Start writes them into ``training_args.yaml`` and runs ``llamafactory-cli train`` as a separate process,
where the ``.pth`` hook activates the plugin as in any other run (main writes that process's output to
``<output_dir>/webui_subprocess.log``; 0.9.5 reads its stderr). When the plugin is inactive or one of its patches
failed, the Train tab shows a warning instead of the section.

Element names equal the YAML keys (ids ``train.aimkp``, ``train.aimkp_text_threshold``, ...). Nothing here imports
gradio or LLaMA-Factory at module level: training processes import this module with the patch registry.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType
from typing import TYPE_CHECKING, Any

from ..config import IMPLEMENTATIONS, MODALITIES, THRESHOLD_RANGE, AimkpArguments, AimkpConfigError, is_aimkp_key
from . import patching
from .args import extract_aimkp_arguments


if TYPE_CHECKING:
    from gradio.components import Component


TAB = "aimkp_tab"
WARNING = "aimkp_warning"
ENABLE = "aimkp"
INPUTS = (
    ENABLE,
    "aimkp_impl",
    "aimkp_init_stride",
    "aimkp_text_threshold",
    "aimkp_image_threshold",
    "aimkp_modalities",
    "aimkp_filter",
    "aimkp_progressive",
    "aimkp_projector_lr",
)
ANCHOR = "badam_tab"  # the last method section of the Train tab in 0.9.5 and main (SwanLab, after it, is logging)
MAX_INIT_STRIDE = 64
WARNING_TEXT = "**AimKP is off in this web UI**: {reason}. Runs started here train without AimKP."

# Labels and info texts; other languages of LLaMA-Factory show the English ones (see _EnglishFallback).
TEXTS: dict[str, dict[str, dict[str, str]]] = {
    TAB: {"en": {"label": "AimKP configurations"}, "zh": {"label": "AimKP 参数设置"}},
    ENABLE: {
        "en": {
            "label": "Use AimKP",
            "info": "Progressive Modality Masking + Gradient-Based Filtering (SFT of a vision-language model).",
        },
        "zh": {"label": "使用 AimKP", "info": "渐进式模态掩码 + 基于梯度的过滤（仅 SFT，需视觉语言模型）。"},
    },
    "aimkp_impl": {
        "en": {"label": "Implementation", "info": "How the AimKP step is computed (the aimkp_impl key)."},
        "zh": {"label": "实现方式", "info": "AimKP 步骤的计算方式（aimkp_impl）。"},
    },
    "aimkp_init_stride": {
        "en": {"label": "Initial stride", "info": "Masking stride every sample starts with (1: unmasked at first)."},
        "zh": {"label": "初始步长", "info": "每个样本的初始掩码步长（1 表示起初不掩码）。"},
    },
    "aimkp_text_threshold": {
        "en": {"label": "Text threshold", "info": "Drop a text-masked copy whose gradient cosine is below it."},
        "zh": {"label": "文本阈值", "info": "文本掩码副本的梯度余弦低于此值时丢弃。"},
    },
    "aimkp_image_threshold": {
        "en": {"label": "Image threshold", "info": "Drop an image-masked copy whose gradient cosine is below it."},
        "zh": {"label": "图像阈值", "info": "图像掩码副本的梯度余弦低于此值时丢弃。"},
    },
    "aimkp_modalities": {
        "en": {"label": "Masked modalities", "info": "Which modalities get masked copies."},
        "zh": {"label": "掩码模态", "info": "哪些模态生成掩码副本。"},
    },
    "aimkp_filter": {
        "en": {"label": "Gradient filtering", "info": "Off: keep every masked copy."},
        "zh": {"label": "梯度过滤", "info": "关闭时保留所有掩码副本。"},
    },
    "aimkp_progressive": {
        "en": {"label": "Progressive strides", "info": "Off: strides stay at the initial stride."},
        "zh": {"label": "渐进步长", "info": "关闭时步长保持初始值。"},
    },
    "aimkp_projector_lr": {
        "en": {
            "label": "Projector learning rate",
            "info": "The projector's own learning rate (the authors: 2e-5). Empty: the learning rate. Also without "
            "AimKP.",
        },
        "zh": {
            "label": "投影层学习率",
            "info": "投影层单独的学习率（作者使用 2e-5）。留空则使用学习率。不启用 AimKP 时也生效。",
        },
    },
}


class _EnglishFallback(dict):
    """A ``LOCALES`` entry whose missing languages give the English texts (never a KeyError in ``change_lang``)."""

    def __missing__(self, lang: str) -> dict[str, str]:
        return self["en"]


def plugin_problem() -> str | None:
    """Why the AimKP section cannot work in this process (plugin inactive, a patch failed), or None."""
    if patching.STATUS.inactive_reason:
        return patching.STATUS.inactive_reason
    if patching.STATUS.failed:
        failures = "; ".join(f"{name} ({reason})" for name, reason in patching.STATUS.failed.items())
        return f"some aimkp-plugin patches failed: {failures}"
    return None


def _new_inputs() -> dict[str, Component]:
    """The section's inputs, unrendered (they are placed in the accordion later), with the YAML keys' defaults."""
    import gradio as gr

    defaults = AimkpArguments()
    low, high = THRESHOLD_RANGE
    threshold = {"minimum": low, "maximum": high, "step": 0.01, "render": False}
    return {
        ENABLE: gr.Checkbox(value=defaults.aimkp, render=False),
        "aimkp_impl": gr.Dropdown(choices=list(IMPLEMENTATIONS), value=defaults.aimkp_impl, render=False),
        "aimkp_init_stride": gr.Slider(
            minimum=1, maximum=MAX_INIT_STRIDE, value=defaults.aimkp_init_stride, step=1, render=False
        ),
        "aimkp_text_threshold": gr.Slider(value=defaults.aimkp_text_threshold, **threshold),
        "aimkp_image_threshold": gr.Slider(value=defaults.aimkp_image_threshold, **threshold),
        "aimkp_modalities": gr.CheckboxGroup(choices=list(MODALITIES), value=defaults.aimkp_modalities, render=False),
        "aimkp_filter": gr.Checkbox(value=defaults.aimkp_filter, render=False),
        "aimkp_progressive": gr.Checkbox(value=defaults.aimkp_progressive, render=False),
        # a text box: empty means unset (a number box would send 0, which freezes the projector)
        "aimkp_projector_lr": gr.Textbox(value="", placeholder="e.g. 2e-5", render=False),
    }


@contextmanager
def _base_elems_with(manager: Any, extra: set[Component]) -> Iterator[None]:
    """Make ``manager.get_base_elems()`` include ``extra`` for the duration (an instance attribute, then removed).

    ``create_train_tab`` starts its ``input_elems`` from that set and binds Preview/Start/Save/Load to it before it
    returns, so this is the one way to have the AimKP inputs bound without copying the function.
    """
    own = vars(manager).get("get_base_elems")
    base = manager.get_base_elems
    manager.get_base_elems = lambda: base() | extra
    try:
        yield
    finally:
        if own is None:
            del manager.get_base_elems
        else:
            manager.get_base_elems = own


def _place_after_anchor(block: Any, elems: dict[str, Any]) -> None:
    """Move ``block`` right after the ``ANCHOR`` section.

    Layout surgery: gradio lays out a container's ``children`` in list order, and ``create_train_tab`` has no
    insertion point, so the block is built after it returned (it lands at the end of the Train tab, below the buttons
    and the log) and then moved within the same parent. Without the anchor it stays at the end.
    """
    anchor = elems.get(ANCHOR)
    parent = getattr(anchor, "parent", None)
    if parent is None or block.parent is not parent:
        return
    parent.children.remove(block)
    parent.children.insert(parent.children.index(anchor) + 1, block)


def _add_warning(elems: dict[str, Any], problem: str) -> dict[str, Any]:
    import gradio as gr

    warning = gr.Markdown(WARNING_TEXT.format(reason=problem))
    _place_after_anchor(warning, elems)
    return {**elems, WARNING: warning}


def _train_tab_with_aimkp(original: Any, engine: Any) -> dict[str, Any]:
    problem = plugin_problem()
    if problem:
        return _add_warning(original(engine), problem)
    import gradio as gr

    inputs = _new_inputs()
    with _base_elems_with(engine.manager, set(inputs.values())):
        elems = original(engine)
    with gr.Accordion(open=False) as tab:
        with gr.Row():
            for name in (ENABLE, "aimkp_impl", "aimkp_init_stride"):
                inputs[name].render()
        with gr.Row():
            for name in ("aimkp_text_threshold", "aimkp_image_threshold", "aimkp_modalities"):
                inputs[name].render()
            with gr.Column():
                inputs["aimkp_filter"].render()
                inputs["aimkp_progressive"].render()
        with gr.Row():
            inputs["aimkp_projector_lr"].render()
    _place_after_anchor(tab, elems)
    return {**elems, TAB: tab, **inputs}


def _train_tab_with_warning(original: Any, engine: Any) -> dict[str, Any]:
    return _add_warning(original(engine), plugin_problem() or "the plugin is inactive")


def _wrap_create_train_tab(module: ModuleType, patch_name: str, wrapper: Any) -> None:
    """Wrap ``create_train_tab`` in ``module`` and in the modules that already imported the original by name.

    Through the ``.pth`` hook the patch runs before ``components/__init__.py`` and ``interface.py`` import the name;
    :func:`patching.apply_aimkp_to_llamafactory` may run after them, so their copies are replaced too.
    """
    original = module.create_train_tab
    patching.wrap_function(module, "create_train_tab", patch_name, wrapper)
    for name in ("llamafactory.webui.components", "llamafactory.webui.interface"):
        importer = sys.modules.get(name)
        if getattr(importer, "create_train_tab", None) is original:
            patching.replace_attribute(importer, "create_train_tab", patch_name, lambda _: module.create_train_tab)


def _patch_webui_components_train_create_train_tab(module: ModuleType) -> None:
    """Wrap ``llamafactory.webui.components.train.create_train_tab`` to add the AimKP section to the Train tab.

    Why: the Train tab has no extension point; its inputs must be in the set the function binds to Preview, Start, Save
    and Load (see :func:`_base_elems_with`), and the section belongs among the method sections (see
    :func:`_place_after_anchor`). If the plugin turns out inactive or a patch failed, the tab shows a warning instead.
    Tested on llamafactory 0.9.5 and main (0.9.6.dev0) with gradio 5.50.0. It can go when LlamaBoard accepts plugin
    sections.
    """
    _wrap_create_train_tab(module, "create_train_tab", _train_tab_with_aimkp)


def _patch_webui_components_train_warn_inactive(module: ModuleType) -> None:
    """While the plugin is inactive, wrap ``create_train_tab`` to show why in place of the AimKP section.

    Why: without it a user who expects the section would not know that it is missing, nor why (disabled, unsupported
    LLaMA-Factory). Tested on llamafactory 0.9.5 and main (0.9.6.dev0) with gradio 5.50.0. It goes with the section
    patch.
    """
    _wrap_create_train_tab(module, "create_train_tab_warn_inactive", _train_tab_with_warning)


def _patch_webui_locales_add_aimkp(module: ModuleType) -> None:
    """Add the AimKP section's labels to ``llamafactory.webui.locales.LOCALES`` (English and Chinese).

    Why: ``Engine.change_lang`` sets every element's label from ``LOCALES[name][lang]``. Languages without a
    translation (ru, ko, ja, ...) get the English texts. The dict is updated in place because ``engine``, ``runner``
    and the components import it by name; :func:`patching.revert_all` leaves these new, otherwise unused, entries.
    Tested on llamafactory 0.9.5 and main (0.9.6.dev0) with gradio 5.50.0. It can go when LlamaBoard accepts plugin
    sections.
    """
    languages = {lang for entry in module.LOCALES.values() for lang in entry}
    for name, texts in TEXTS.items():
        module.LOCALES[name] = _EnglishFallback({lang: texts["en"] for lang in languages} | texts)


def _patch_webui_common_clean_cmd(module: ModuleType) -> None:
    """Wrap ``llamafactory.webui.common._clean_cmd`` so that it keeps every ``aimkp*`` key.

    Why: ``gen_cmd`` (Preview) and ``save_cmd`` (Start's ``training_args.yaml``) drop False values, which would turn
    ``aimkp_filter: false`` / ``aimkp_progressive: false`` into their defaults (true). The keys are only there when
    AimKP is on. Tested on llamafactory 0.9.5 and main (0.9.6.dev0). It can go when LlamaBoard accepts plugin sections.
    """

    def _clean_cmd(original: Any, args: dict[str, Any]) -> dict[str, Any]:
        kept = original(args)
        return {key: value for key, value in args.items() if key in kept or is_aimkp_key(key)}

    patching.wrap_function(module, "_clean_cmd", "clean_cmd", _clean_cmd)


def section_values(manager: Any, data: dict[Component, Any]) -> dict[str, Any] | None:
    """The AimKP inputs' values in an event's ``data``, by name; None when the Train tab has no AimKP section."""
    try:
        return {name: data[manager.get_elem_by_id(f"train.{name}")] for name in INPUTS}
    except KeyError:
        return None


def aimkp_keys(values: dict[str, Any] | None) -> dict[str, Any]:
    """The ``aimkp*`` training arguments for the section's values: none unless "Use AimKP" is ticked, except the
    projector's learning rate, which plain SFT takes too (and only when it is set)."""
    if not values:
        return {}
    projector = {}
    projector_lr = values.get("aimkp_projector_lr")
    if projector_lr is not None and str(projector_lr).strip():
        try:
            projector = {"aimkp_projector_lr": float(projector_lr)}
        except ValueError:  # passed on as typed: the argument check names it
            projector = {"aimkp_projector_lr": str(projector_lr).strip()}
    if not values[ENABLE]:
        return projector
    keys = {name: value for name, value in values.items() if name != "aimkp_projector_lr"}
    return {**keys, "aimkp_modalities": ",".join(values["aimkp_modalities"] or ()), **projector}  # one string


def _patch_webui_runner_parse_train_args(module: ModuleType) -> None:
    """Wrap ``llamafactory.webui.runner.Runner._parse_train_args`` to add the AimKP section's ``aimkp*`` keys.

    Why: Preview (``gen_cmd``) and Start (``save_cmd`` then ``llamafactory-cli train``) both build their arguments
    here. Tested on llamafactory 0.9.5 and main (0.9.6.dev0) with gradio 5.50.0. It can go when LlamaBoard accepts
    plugin sections.
    """

    def _parse_train_args(original: Any, self: Any, data: dict[Component, Any]) -> dict[str, Any]:
        args = original(self, data)
        args.update(aimkp_keys(section_values(self.manager, data)))
        return args

    patching.wrap_function(module.Runner, "_parse_train_args", "parse_train_args", _parse_train_args)


def _patch_webui_runner_initialize(module: ModuleType) -> None:
    """Wrap ``llamafactory.webui.runner.Runner._initialize`` to check the AimKP values before Preview, Save, Start.

    Why: the training process would stop on the same problems (no modality chosen, fp16, packing, ZeRO-3, a stage other
    than SFT), but only after Start, in its log; here the Train tab shows the message at once, the way LLaMA-Factory
    reports its own invalid settings. Tested on llamafactory 0.9.5 and main (0.9.6.dev0) with gradio 5.50.0. It can go
    when LlamaBoard accepts plugin sections.
    """

    def _initialize(original: Any, self: Any, data: dict[Component, Any], do_train: bool, from_preview: bool) -> str:
        error = original(self, data, do_train, from_preview)
        if error or not do_train or not aimkp_keys(section_values(self.manager, data)):
            return error
        try:
            extract_aimkp_arguments(self._parse_train_args(data))
        except AimkpConfigError as err:
            return f"AimKP: {err}"
        return ""

    patching.wrap_function(module.Runner, "_initialize", "initialize", _initialize)
