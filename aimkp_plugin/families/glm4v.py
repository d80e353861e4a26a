"""GLM-4.1V (``glm4v``), GLM-4.5V (``glm4v_moe``) and ``glm46v``: one merged grid per image, 3-D m-rope positions.

- Grid: LLaMA-Factory's GLM4VPlugin (templates ``glm4v``, ``glm4_5v``) writes each image as ``<|begin_of_image|>``,
  ``t·h·w / merge²`` ``<|image|>`` tokens and ``<|end_of_image|>``, from the image's ``image_grid_thw`` row (patch 14,
  merge = ``spatial_merge_size``, 2): a ``(h / merge) × (w / merge)`` grid in row-major order (the vision tower
  merges each 2×2 patch block into one feature, blocks in rows, as ``get_rope_index`` numbers them). Any other count
  (a video frame stack, a mismatch) is an error. An image takes ``t·h·w`` rows of ``pixel_values``.
- Masked: the grid cells by the 2-D rule; ``<|begin_of_image|>`` and ``<|end_of_image|>`` are not image tokens and
  stay visible.
- Positions: the collator runs ``get_rope_index`` with the model. A text token at ``p`` has ``(t, h, w) = (p, p, p)``;
  the tokens of an image starting at ``s`` have ``t = s``, ``h = s + row``, ``w = s + col``, and the text after it
  resumes at ``s + max(h, w) / merge``. The collator prepends a copy of the t row (row 0 is not ``0..L-1``): the
  language model reads rows 1–3 for the rotary embedding and gives row 0 to the mask builder, which, when no attention
  mask is given, splits the sequence wherever row 0 does not step by 1 (packed sequences); every call here passes a
  mask. A kept token keeps its column of all four rows.
- Fast step: ``visual`` (patch embedding, position table, blocks, ``downsample``, ``merger``) runs once per
  micro-batch through ``get_image_features``; the language model takes ``inputs_embeds`` and the 4-row positions, and
  ``lm_head`` runs only at the positions a loss reads. Grid, pixel rows, image encoding, positions and the
  generation-during-training refusal are Qwen2-VL's (:class:`~.qwen2_vl.QwenVLFamily`), which this family builds on.
- Tokens meet only in attention: norms, MLPs and GLM-4.5V's routed experts act per token (top-k routing without a
  capacity limit), so hiding a token by the attention mask equals deleting it (``removes_hidden_tokens`` False).
- GLM-4.5V: the experts are fused 3-D parameters (``experts.gate_up_proj``, ``experts.down_proj``) and the router a
  plain ``weight``; ``lora_target: all`` wraps only ``nn.Linear`` layers (attention, shared experts, the dense first
  layers' MLPs), which the fast step covers; training experts or router in full leaves a run to the reference step.
  In transformers 5.6 its router's auxiliary loss is added only when ``output_router_logits=True`` is passed to
  ``forward``, which LLaMA-Factory's trainer never does (``moe_aux_loss_coef`` only sets the config flag), so plain
  SFT has none either and the AimKP step's answer cross-entropy is the whole loss in both.
- ``glm46v``: ``Glm46VModel`` is ``Glm4vModel`` (same image layout, positions and vision code) with its language model
  built from ``text_config`` (``glm4v_text`` or ``glm4v_moe_text``). LLaMA-Factory 0.9.5 registers no composite model
  for it, so ``lora_target: all`` also wraps the vision tower's and merger's Linear layers; the fast step trains them
  as vision-side parameters.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from ..models.building import TinyModelSpec
from ..models.tiny_glm4v import build_glm4v
from .base import FamilyDescription
from .qwen2_vl import QwenVLFamily


class Glm4vFamily(QwenVLFamily):
    """GLM-4.1V; GLM-4.5V and ``glm46v`` share its image layout, positions and vision code (``Glm4vModel``)."""

    name = "glm4v"
    model_types = ("glm4v", "glm4v_moe", "glm46v")
    templates = ("glm4v", "glm4_5v")
    projector = "visual.merger"
    description = FamilyDescription(
        grid="(grid_h/2)×(grid_w/2) merged grid from image_grid_thw (patch 14)",
        masked="grid cells by the 2-D rule; the begin- and end-of-image tokens stay visible",
        positions="3-D m-rope: the collator's position_ids columns (t copy, t, h, w)",
    )
    removes_hidden_tokens = False  # pure attention: no token mixing outside it (the experts route per token)
    tiny_models = (TinyModelSpec(name="glm4v", family="glm4v", template="glm4v", vision_layers=2),)

    def decoder_layers(self, model: nn.Module) -> list[nn.Module]:
        return list(model.model.language_model.layers)

    def language_logits(
        self,
        model: nn.Module,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        image_mask: torch.Tensor,
        extras: Sequence[torch.Tensor],
        logits_positions: torch.Tensor,
    ) -> torch.Tensor:
        """The language model on ``inputs_embeds`` with the 4-row positions and the rows' padding mask, then
        ``lm_head`` at ``logits_positions`` only."""
        hidden = model.model.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=False,
        ).last_hidden_state
        return model.lm_head(hidden[:, logits_positions])

    def build_tiny(self, spec: TinyModelSpec, out: Path) -> None:
        build_glm4v(spec, out)
