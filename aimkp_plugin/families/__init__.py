"""The table of model families: ``model_type`` → the :class:`~aimkp_plugin.families.base.ModelFamily` that knows it.

One module per family. The rest of the plugin calls :func:`family_for` and never branches on ``model_type``; a model
type that is not in the table gets :class:`~aimkp_plugin.families.base.GenericFamily` (the 1-D fallback and the
reference step). To add a family, write its module (see ``llava.py`` for the smallest one) and add its instance to
``FAMILIES``.
"""

from __future__ import annotations

from .base import FamilyDescription, GenericFamily, ImageLayoutError, LlavaStyleFamily, ModelFamily
from .gemma3 import Gemma3Family
from .gemma4 import Gemma4Family
from .glm4v import Glm4vFamily
from .internvl import InternVLFamily
from .llava import LlavaFamily
from .llava_next import LlavaNextFamily
from .mllama import MllamaFamily
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
    MllamaFamily(),
)
FAMILY_TABLE: dict[str, ModelFamily] = {model_type: family for family in FAMILIES for model_type in family.model_types}


def family_for(model_type: str | None) -> ModelFamily:
    """The family of ``model_type``; a :class:`GenericFamily` when the table has none."""
    family = FAMILY_TABLE.get(model_type or "")
    return family if family is not None else GenericFamily(model_type or "unknown")


__all__ = [
    "FAMILIES",
    "FAMILY_TABLE",
    "FamilyDescription",
    "GenericFamily",
    "ImageLayoutError",
    "LlavaStyleFamily",
    "ModelFamily",
    "family_for",
]
