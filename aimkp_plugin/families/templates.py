"""An answer for every multimodal template of LLaMA-Factory: first-class, the same code as a family, or refused.

A template that a family module lists in its ``templates`` is **first-class**: that family's tiny model trains with
it in the tests, exact against the plain one-copy-at-a-time step. Every other multimodal template has an entry in
``OTHER_TEMPLATES``:

- **same code as <family>**: LLaMA-Factory lays its images out with the same plugin as the family's own template, and
  its checkpoints load the same transformers model class (``model_type``), so the family's layout holds; only the chat
  wording differs. These run, and the reason says they are not tested with a tiny model of their own.
- **refused**: a run with ``aimkp: true`` and this template stops before the model loads, with the reason and the
  nearest supported family.

``template_answers`` takes LLaMA-Factory's registry (template name → image plugin class, read at run time by
:func:`aimkp_plugin.integration.templates.multimodal_templates`), so a template a new LLaMA-Factory release adds shows
up as refused with ``NO_ANSWER`` until it is given an answer here.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from . import FAMILIES


FIRST_CLASS = "first-class"
REFUSED = "refused"
NO_ANSWER = (
    "no answer is recorded for this template: it is newer than this version of aimkp-plugin. Use a template of the "
    "Supported models table (`aimkp models families`)."
)


@dataclass(frozen=True)
class TemplateAnswer:
    """What ``aimkp: true`` does with one LLaMA-Factory template."""

    template: str
    model_types: tuple[str, ...]  # the transformers model types of the template's checkpoints
    status: str  # "first-class", "same code as <family>" or "refused"
    reason: str
    plugin: str = ""  # LLaMA-Factory's image plugin class of the template

    @property
    def refused(self) -> bool:
        return self.status == REFUSED

    def as_json(self) -> dict:
        row = asdict(self)
        row["model_types"] = list(self.model_types)
        return row


def _same_code(family: str, model_types: tuple[str, ...], detail: str) -> tuple[tuple[str, ...], str, str]:
    return model_types, f"same code as {family}", f"not tested with a tiny model of its own: {detail}"


def _refused(model_types: tuple[str, ...], reason: str) -> tuple[tuple[str, ...], str, str]:
    return model_types, REFUSED, reason


_REMOTE_CODE = (
    "its checkpoints run their own model code (trust_remote_code), which transformers does not have, so no family "
    "module can say where its image tokens sit, how its positions run and whether its layers mix tokens outside "
    "attention, which decide what a masked copy is. Nearest supported family: {nearest}."
)
_NO_FAMILY = (
    "transformers has its model class, but no family module of aimkp-plugin describes its image layout yet, so a "
    "masked copy is not defined for it. Nearest supported family: {nearest}."
)


def _remote(model_types: tuple[str, ...], nearest: str) -> tuple[tuple[str, ...], str, str]:
    return _refused(model_types, _REMOTE_CODE.format(nearest=nearest))


def _no_family(model_types: tuple[str, ...], nearest: str, detail: str) -> tuple[tuple[str, ...], str, str]:
    return _refused(model_types, f"{detail}; {_NO_FAMILY.format(nearest=nearest)}")


# template -> (model types, status, reason); templates of a family module's ``templates`` are not listed here
OTHER_TEMPLATES: dict[str, tuple[tuple[str, ...], str, str]] = {
    # the same plugin and model class as a family
    "yi_vl": _same_code("llava", ("llava",), "Yi-VL's -hf checkpoints are LLaVA-1.5 models with a Yi language model"),
    "mimo_vl": _same_code("qwen2_5_vl", ("qwen2_5_vl",), "MiMo-VL checkpoints are Qwen2.5-VL models"),
    "granite3_vision": _same_code(
        "llava_next",
        ("llava_next",),
        "Granite Vision checkpoints are LLaVA-NeXT models (several vision feature layers, a Granite language model)",
    ),
    # model code outside transformers
    "minicpm_v": _remote(("minicpmv",), "qwen2_vl"),
    "minicpm_v_4_6": _remote(("minicpmv",), "qwen3_vl"),
    "minicpm_o": _remote(("minicpmo",), "qwen2_vl"),
    "kimi_vl": _remote(("kimi_vl",), "qwen2_5_vl"),
    "intern_s1": _remote(("interns1",), "internvl"),
    "keye_vl": _remote(("Keye",), "qwen3_vl"),
    "dots_ocr": _remote(("dots_ocr",), "qwen2_vl"),
    "ernie_vl": _remote(("ernie4_5_moe_vl",), "qwen3_vl_moe"),
    "youtu_vl": _remote(("youtu_vl",), "qwen2_5_vl"),
    "moss_vl": _remote(("moss_vl",), "qwen2_5_vl"),
    # video or audio
    "video_llava": _refused(
        ("video_llava",),
        "a video model: Video-LLaVA's batches carry pixel_values_images and pixel_values_videos of its own "
        "LanguageBind towers, which no family module lays out; AimKP's copies are defined for image + text posts. "
        "Nearest supported family: llava.",
    ),
    **{
        name: _refused(
            ("llava_next_video",),
            "a video model: LLaVA-NeXT-Video pools its video frames into tokens that no family module lays out; "
            "AimKP's copies are defined for image + text posts. For images use template llava_next (family "
            "llava_next).",
        )
        for name in ("llava_next_video", "llava_next_video_mistral", "llava_next_video_yi")
    },
    "qwen2_audio": _refused(
        ("qwen2_audio",),
        "an audio model: Qwen2-Audio takes no images, and AimKP's copies are defined for image + text posts.",
    ),
    # omni models
    **{
        name: _refused(
            model_types,
            "an omni model: its thinker interleaves audio, video and image positions (TMRoPE) in a model class that "
            f"no family module describes, and the template adds audio inputs. Nearest supported family: {nearest}.",
        )
        for name, model_types, nearest in (
            ("qwen2_omni", ("qwen2_5_omni",), "qwen2_5_vl"),
            ("qwen3_omni", ("qwen3_omni_moe",), "qwen3_vl_moe"),
            ("qwen3_omni_nothink", ("qwen3_omni_moe",), "qwen3_vl_moe"),
        )
    },
    # in transformers, no family module
    "gemma3n": _no_family(
        ("gemma3n",),
        "gemma3",
        "Gemma 3n has a MobileNet vision tower, per-layer embeddings and AltUp layers, and the template adds audio",
    ),
    "glm_ocr": _no_family(("glm_ocr",), "glm4v", "GLM-OCR derives from GLM-4V's code with its own vision attention"),
    # a template of a family that the family cannot train exactly
    "gemma4n": _refused(
        ("gemma4",),
        "gemma4n adds a dummy audio clip (input_features) to every batch without audio, which the AimKP step cannot "
        "split per sample. Set template: gemma4 (the same model and image path).",
    ),
}


def first_class_templates() -> dict[str, TemplateAnswer]:
    """The templates that family modules list, each with the model types of every family that lists it (Qwen2-VL
    and Qwen2.5-VL share ``qwen2_vl``)."""
    families: dict[str, list] = {}
    for family in FAMILIES:
        for template in family.templates:
            families.setdefault(template, []).append(family)
    answers = {}
    for template, listing in families.items():
        model_types = tuple(model_type for family in listing for model_type in family.model_types)
        names = " and ".join(f"{family.name} (tiny model `{family.tiny_models[0].name}`)" for family in listing)
        step = "with the fast step" if all(family.has_fast_step for family in listing) else "with the reference step"
        reason = f"exact, {step}; tested with family {names}"
        answers[template] = TemplateAnswer(template, model_types, FIRST_CLASS, reason)
    return answers


def template_answer(template: str, plugin: str = "") -> TemplateAnswer:
    """The answer for one template; a template with none is refused with :data:`NO_ANSWER`."""
    first_class = first_class_templates()
    if template in first_class:
        answer = first_class[template]
        return TemplateAnswer(answer.template, answer.model_types, answer.status, answer.reason, plugin)
    if template in OTHER_TEMPLATES:
        model_types, status, reason = OTHER_TEMPLATES[template]
        return TemplateAnswer(template, model_types, status, reason, plugin)
    return TemplateAnswer(template, (), REFUSED, NO_ANSWER, plugin)


def template_answers(registry: dict[str, str]) -> list[TemplateAnswer]:
    """One answer per template of ``registry`` (template name → its image plugin class), in the registry's order."""
    return [template_answer(template, plugin) for template, plugin in registry.items()]
