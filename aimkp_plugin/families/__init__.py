"""The table of model families: ``model_type`` → the :class:`~aimkp_plugin.families.base.ModelFamily` that knows it.

One module per family. The rest of the plugin calls :func:`family_for` with the model's config and never branches on
``model_type``. Most model types name their family alone (``FAMILY_TABLE``); where one model type holds different
layouts, the vision tower's ``model_type`` decides (``VISION_FAMILY_TABLE``: Pixtral-12B is a ``llava`` with a
``pixtral`` tower and ``[IMG_BREAK]`` rows, LLaVA-1.5 a ``llava`` with a CLIP tower). A model type that is not in the
tables gets :class:`~aimkp_plugin.families.base.GenericFamily` (the 1-D fallback and the reference step). To add a
family, write its module (see ``llava.py`` for the smallest one) and add its instance to ``FAMILIES``.
"""

from __future__ import annotations

from typing import Any

from .base import (
    FamilyDescription,
    GenericFamily,
    ImageLayoutError,
    LlavaStyleFamily,
    ModelFamily,
    config_value,
    vision_model_type,
)
from .gemma3 import Gemma3Family
from .gemma4 import Gemma4Family
from .glm4v import Glm4vFamily
from .internvl import InternVLFamily
from .lfm2_vl import Lfm2VlFamily
from .llama4 import Llama4Family
from .llava import LlavaFamily
from .llava_next import LlavaNextFamily
from .mistral3 import Mistral3Family
from .mllama import MllamaFamily
from .paligemma import PaliGemmaFamily
from .pixtral import PixtralFamily
from .qwen2_vl import Qwen25VLFamily, QwenVLFamily
from .qwen3_5 import Qwen35Family
from .qwen3_vl import Qwen3VLFamily
from .qwen3_vl_moe import Qwen3VLMoeFamily


FAMILIES: tuple[ModelFamily, ...] = (
    LlavaFamily(),
    QwenVLFamily(),
    Qwen25VLFamily(),
    Qwen3VLFamily(),
    Qwen3VLMoeFamily(),
    Qwen35Family(),
    InternVLFamily(),
    Gemma3Family(),
    Gemma4Family(),
    Glm4vFamily(),
    LlavaNextFamily(),
    Mistral3Family(),
    PixtralFamily(),
    PaliGemmaFamily(),
    Lfm2VlFamily(),
    Llama4Family(),
    MllamaFamily(),
)
# model_type -> the family of every config of that type not claimed below
FAMILY_TABLE: dict[str, ModelFamily] = {
    model_type: family for family in FAMILIES if not family.vision_model_types for model_type in family.model_types
}
# (model_type, vision tower's model_type) -> the family of those configs
VISION_FAMILY_TABLE: dict[tuple[str, str], ModelFamily] = {
    (model_type, vision_type): family
    for family in FAMILIES
    for model_type in family.model_types
    for vision_type in family.vision_model_types
}
FAMILY_BY_NAME: dict[str, ModelFamily] = {family.name: family for family in FAMILIES}


def family_for(model_config: Any) -> ModelFamily:
    """The family of a model config (a transformers config, the dict of its ``config.json``, or a bare
    ``model_type``, which names no vision tower); a :class:`GenericFamily` when the tables have none."""
    if isinstance(model_config, str) or model_config is None:
        model_config = {"model_type": model_config}
    model_type = config_value(model_config, "model_type") or ""
    family = VISION_FAMILY_TABLE.get((model_type, vision_model_type(model_config) or ""))
    family = family if family is not None else FAMILY_TABLE.get(model_type)
    return family if family is not None else GenericFamily(model_type or "unknown")


__all__ = [
    "FAMILIES",
    "FAMILY_BY_NAME",
    "FAMILY_TABLE",
    "FamilyDescription",
    "GenericFamily",
    "ImageLayoutError",
    "LlavaStyleFamily",
    "ModelFamily",
    "VISION_FAMILY_TABLE",
    "family_for",
]
