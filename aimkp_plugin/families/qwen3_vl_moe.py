"""Qwen3-VL-MoE (``qwen3_vl_moe``: Qwen3-VL-30B-A3B, Qwen3-VL-235B-A22B): Qwen3-VL's layout with sparse MoE layers.

- Image grid, DeepStack features and interleaved m-rope positions: exactly as Qwen3-VL (:mod:`.qwen3_vl`).
- MoE: each layer's experts are fused 3-D weights (``gate_up_proj``, ``down_proj``) and its router a bare weight,
  not Linear layers. LoRA (``lora_target: all``) therefore adapts the attention projections only, which the fast
  step covers; a run that trains the experts or the router (full fine-tuning, ``additional_target``) has no per-copy
  gradient rule there and takes the reference step, with a warning naming them. Routing is per token, so a hidden
  token changes no kept token's experts.
- The router's auxiliary loss: transformers adds it to the loss only when the forward call asks for router logits
  (``output_router_logits=True`` as an argument; the config flag and LLaMA-Factory's ``moe_aux_loss_coef`` do not),
  and LLaMA-Factory's trainer never asks. So plain SFT of these models trains on the answer cross-entropy alone, and
  so does AimKP: the spec's cosines and update use each copy's cross-entropy, and nothing is left out against plain
  SFT. ``tests/test_fast_step.py`` pins that fact; should a later version add the loss by default, that test fails.
"""

from __future__ import annotations

from pathlib import Path

from ..models.building import TinyModelSpec
from ..models.tiny_qwen3 import build_qwen3_vl_moe
from .base import FamilyDescription
from .qwen3_vl import Qwen3VLFamily


class Qwen3VLMoeFamily(Qwen3VLFamily):
    name = "qwen3_vl_moe"
    model_types = ("qwen3_vl_moe",)
    description = FamilyDescription(
        grid="(grid_h/2)×(grid_w/2) merged grid from image_grid_thw (patch 16)",
        masked="as qwen3_vl; MoE experts and router are not hooked (LoRA leaves them alone)",
        positions="interleaved m-rope: the collator's position_ids columns",
    )
    tiny_models = (
        TinyModelSpec(
            name="qwen3_vl_moe", family="qwen3_vl_moe", template="qwen3_vl_nothink", patch_size=16, vision_layers=2
        ),
    )

    def build_tiny(self, spec: TinyModelSpec, out: Path) -> None:
        build_qwen3_vl_moe(spec, out)
