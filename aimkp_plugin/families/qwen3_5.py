"""Qwen3.5 and Qwen3.6 (``qwen3_5``, ``qwen3_5_moe``): Qwen3-VL's merged image grid, and a language model that mixes
tokens outside attention.

- Grid: ``(grid_h / 2) × (grid_w / 2)`` ``<|image_pad|>`` tokens per image from ``image_grid_thw`` (patch 16, 2×2
  merge), as Qwen3-VL; ``<|vision_start|>`` and ``<|vision_end|>`` stay visible. No DeepStack features.
- Hybrid linear attention: most decoder layers are Gated DeltaNet layers (``text_config.layer_types``), a recurrence
  with a causal short convolution in front. There a token hidden by the attention mask still moves the recurrent
  state and fills a slot of the convolution's window, so masking cannot hide it. Both steps therefore run a copy as
  the sample with its hidden tokens **removed** from the sequence, every kept token at its original position ids (the
  collator's four rows: text and the interleaved t/h/w m-rope rows): the reference step through a pre-hook on the
  language model that keeps only the kept positions of ``inputs_embeds`` and ``position_ids``, the fast step by its
  rows of kept tokens, right-padded (padding after the last kept token reaches no kept token: the recurrence and the
  convolution are causal). The text copies' shared prefix is never packed.
- MoE sizes (``qwen3_5_moe``): the same layout; the experts' fused 3-D weights and the router are not Linear layers,
  so LoRA leaves them alone, and a run that trains them takes the reference step (with a warning). The router's
  auxiliary loss: see :mod:`.qwen3_vl_moe`.
"""

from __future__ import annotations

from pathlib import Path

from ..models.building import TinyModelSpec
from ..models.tiny_qwen3 import build_qwen3_5
from .base import FamilyDescription
from .qwen2_vl import QwenVLFamily


class Qwen35Family(QwenVLFamily):
    name = "qwen3_5"
    model_types = ("qwen3_5", "qwen3_5_moe")
    templates = ("qwen3_5_nothink", "qwen3_5", "qwen3_6")
    description = FamilyDescription(
        grid="(grid_h/2)×(grid_w/2) merged grid from image_grid_thw (patch 16)",
        masked="grid cells by the 2-D rule, **removed** from the sequence (Gated DeltaNet layers mix tokens outside "
        "attention); the vision start and end tokens stay",
        positions="interleaved m-rope: the collator's position_ids columns, kept tokens at their original positions",
    )
    removes_hidden_tokens = True
    tiny_models = (
        # three Gated DeltaNet layers, then one full-attention layer (Qwen3.5's 3:1 pattern)
        TinyModelSpec(
            name="qwen3_5", family="qwen3_5", template="qwen3_5_nothink", patch_size=16, vision_layers=2, num_layers=4
        ),
    )

    def build_tiny(self, spec: TinyModelSpec, out: Path) -> None:
        build_qwen3_5(spec, out)
