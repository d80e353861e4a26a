"""The fast AimKP step: the same updates as :func:`~aimkp_plugin.method.step.reference_sample_step`, computed for a
whole micro-batch at once.

What changes against the reference, and why each change keeps the result exact:

- **Images are encoded once.** The vision tower and projector run once per micro-batch; every variant of a sample
  reads the same image features (the reference recomputes them per variant, with identical results).
- **Masked tokens are dropped, not hidden.** A hidden token influences no other token, so removing it from the
  sequence changes nothing for the kept ones, as long as every kept token keeps its original position id (also
  Qwen2-VL's 3-D rope positions, whose columns are gathered). At stride 2 a 24×24 image keeps 144 of 576 tokens.
- **Variants of the micro-batch run together**, as rows of padded forward passes (rows sorted by length and split
  into the passes that pad least, at most ``max_tokens_per_forward`` padded tokens per pass; by default as many as
  the micro-batch's own padded batch, the size of the plain SFT forward of the same micro-batch, and on an
  accelerator at least one sample's rows at the longest length, see :func:`default_max_tokens`).
- **Logits only where a loss reads them.** ``lm_head`` and the cross-entropy run at the positions that predict an
  answer token of some row of a pass (tens of a row's hundreds of positions); the other positions' logits have no
  loss, so no gradient flows from them, and a trained ``lm_head``'s rows get nothing from them either.
- **Per-variant gradients come from one backward per pass**, not one per variant:
  :class:`~aimkp_plugin.method.row_gradients.RowGradients` keeps each row's gradient apart (Linear-layer hooks in
  the language model; one vmapped backward through the shared image features for the projector). Cosines come from
  one Gram matrix, and the optimizer-step gradient ``Σ_i n_i / |K_i| / N · Σ_{v ∈ K_i} g_{i,v}`` is one weighted sum
  of the rows, with no further pass.

Supported trainable parameters: Linear layers outside the vision side (LoRA ``lora_A``/``lora_B``, a trained
``lm_head``) and anything inside the vision tower and projector. Any other trained parameter (embeddings, norms of
the language model, DoRA magnitudes) has no per-row rule here: :func:`fast_step_layout` says so, and the caller
runs the reference step instead. A sample in which a hidden token directly precedes an answer token (possible only
when the instruction was not found and the text span runs up to the answer) also takes the reference step: there
the reference predicts that answer token from the hidden token's own output, which a dropped token cannot give.

Pure torch. What differs between model families (how images are encoded, which modules produce the image features,
how the language model is called with them, which positions a token has) is asked of a :class:`FastStepFamily`;
the model families of ``aimkp_plugin.families`` implement it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn

from .filtering import cosine_from_products, keep_copy, variant_weight
from .row_gradients import RowGradients
from .shared_prefix import PackedPass, PrefixPair, sharing_prefixes
from .state import CurriculumState
from .types import IGNORE_INDEX, ORIGINAL, CopyOutcome, SampleInputs, SampleOutcome, StepConfig
from .variants import hidden_for, kept_positions, planned_copies, predicted_loss_sums, update_curriculum


class FastStepUnsupportedError(ValueError):
    """The model or its trainable parameters are outside what the fast step computes per row."""


@dataclass
class ImageFeatures:
    """What the language model reads from the images of a micro-batch, one row per image token (samples and images in
    order): ``tokens`` replace the image tokens' embeddings; each of ``extras`` is fed to the language model beside
    them (Qwen3-VL's DeepStack features, one tensor per layer they are added to)."""

    tokens: torch.Tensor
    extras: tuple[torch.Tensor, ...] = ()

    @property
    def shared(self) -> list[torch.Tensor]:
        return [self.tokens, *self.extras]


class FastStepFamily(Protocol):
    """What the fast step asks of a model family."""

    name: str
    removes_hidden_tokens: bool  # token mixing outside attention: rows never share a packed prefix

    def image_token_id(self, config: object) -> int | None:
        """The id of the tokens whose embeddings are replaced by image features."""

    def vision_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        """Every parameter upstream of the image features (vision tower, projector, DeepStack mergers, LLaVA-NeXT's
        ``image_newline``)."""

    def encode_images(self, model: nn.Module, samples: Sequence[SampleInputs]) -> ImageFeatures | None:
        """The image features of every image of ``samples`` (None when none has an image)."""

    def position_ids(self, sample: SampleInputs) -> torch.Tensor:
        """The sample's original position ids, ``(1, L)`` or ``(rows, 1, L)`` for multimodal rope."""

    def decoder_layers(self, model: nn.Module) -> list[nn.Module]:
        """The language model's decoder layers, each called as ``layer(hidden_states, **keywords)`` through the
        gradient-checkpointing hook of Hugging Face's ``GradientCheckpointingLayer`` (for the shared prefix)."""

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
        """Logits ``(rows, len(logits_positions), vocabulary)`` at ``logits_positions`` (1-D, the same positions of
        every row) of padded rows whose image tokens (``image_mask``) already hold their features; ``extras`` are the
        kept rows of :attr:`ImageFeatures.extras`, in the order of ``image_mask``."""


@dataclass
class FastStepLayout:
    """Where a model's trainable parameters sit, as the fast step needs to know it."""

    model: nn.Module  # the Hugging Face model (below any PEFT wrapper)
    family: FastStepFamily
    parameters: list[nn.Parameter]  # every trainable parameter, in the buffer's order
    linear_modules: list[nn.Linear]  # language-side Linear layers that own trainable parameters (hooked)
    vision_parameters: list[nn.Parameter] = field(default_factory=list)  # trainable, upstream of the image features
    dropout: str | None = None  # the first active dropout in the decoder layers (see active_dropout), or None
    # vision-side modules with a gradient-checkpointing switch: checkpointing pauses there while trained vision
    # parameters are encoded (a reentrant checkpoint cannot take the vmapped autograd.grad through the features)
    vision_modules: list[nn.Module] = field(default_factory=list)


def base_model_of(model: nn.Module) -> nn.Module:
    """The Hugging Face model below a PEFT wrapper (LoRA layers are injected into it, so calling it trains them)."""
    get_base_model = getattr(model, "get_base_model", None)
    return get_base_model() if callable(get_base_model) else model


def fast_step_layout(model: nn.Module, family: FastStepFamily) -> FastStepLayout:
    """Classify the trainable parameters of ``model``; :class:`FastStepUnsupportedError` says what is not covered."""
    hf_model = base_model_of(model)
    if family.image_token_id(hf_model.config) is None:
        raise FastStepUnsupportedError(f"the {family.name} model has no image token id")
    vision_ids = {id(p) for p in family.vision_parameters(hf_model)}
    parameters, linear_modules, vision_parameters, uncovered = [], [], [], []
    for name, module in hf_model.named_modules():
        own = [p for p in module.parameters(recurse=False) if p.requires_grad]
        if not own:
            continue
        if all(id(p) in vision_ids for p in own):
            vision_parameters += own
        elif type(module) is nn.Linear and ".experts." in f".{name}.":
            uncovered.append(f"{name} (a Linear layer of a routed MoE expert, which sees only its routed tokens)")
            continue
        elif type(module) is nn.Linear:
            linear_modules.append(module)
        else:
            uncovered.append(f"{name} ({type(module).__name__})")
            continue
        parameters += own
    if uncovered:
        raise FastStepUnsupportedError(
            "trained parameters without a per-row gradient rule in the fast step: " + ", ".join(uncovered[:5])
        )
    dropout = active_dropout(family.decoder_layers(hf_model))
    switchable = [
        module
        for module in hf_model.modules()
        if hasattr(module, "gradient_checkpointing") and all(id(p) in vision_ids for p in module.parameters())
    ]
    return FastStepLayout(hf_model, family, parameters, linear_modules, vision_parameters, dropout, switchable)


@contextmanager
def checkpointing_paused(modules: Sequence[nn.Module]) -> Iterator[None]:
    """Gradient checkpointing off in ``modules`` while active (their activations are kept instead)."""
    paused = [module for module in modules if getattr(module, "gradient_checkpointing", False)]
    for module in paused:
        module.gradient_checkpointing = False
    try:
        yield
    finally:
        for module in paused:
            module.gradient_checkpointing = True


@dataclass
class Row:
    """One variant of one sample, as a row of a forward pass: the sample's positions it keeps, in order."""

    sample: int  # position in the micro-batch
    name: str  # ORIGINAL, "text" or "image"
    stride: int
    keep: torch.Tensor  # long, sorted positions of the sample's sequence


def needs_reference_step(sample: SampleInputs, hidden: Sequence[int]) -> bool:
    """True when a hidden token directly precedes an answer token (then dropping it would change a prediction)."""
    labels = sample.labels[0].tolist()
    return any(position + 1 < len(labels) and labels[position + 1] != IGNORE_INDEX for position in hidden)


def plan_rows(
    samples: Sequence[SampleInputs], state: CurriculumState, config: StepConfig, removes_hidden: bool = False
) -> tuple[list[Row], list[int]]:
    """The rows of every fast-path sample, and the positions of the samples that need the reference step.

    With ``removes_hidden`` (a model whose copies are the sequence with the hidden tokens removed) no sample needs
    the reference step: a row predicts each answer token from the kept token before it, as the reference does."""
    rows, reference = [], []
    for position, sample in enumerate(samples):
        if sample.num_answer_tokens == 0:
            continue  # no loss, no gradient: the sample only moves its curriculum
        length = sample.model_inputs["input_ids"].shape[1]
        sample_rows = [Row(position, ORIGINAL, 1, torch.arange(length))]
        for modality, stride in planned_copies(sample, state, config):
            hidden = hidden_for(sample.spans, modality, stride)
            if not removes_hidden and needs_reference_step(sample, hidden):
                reference.append(position)
                break
            sample_rows.append(Row(position, modality, stride, kept_positions(length, hidden)))
        else:
            rows += sample_rows
    return rows, reference


def group_lengths(lengths: list[int], max_tokens: int) -> list[slice]:
    """Forward passes over rows of ``lengths`` (sorted longest first): consecutive runs of at most ``max_tokens``
    padded tokens (a row longer than that is a pass of its own), chosen to cost the least.

    A pass of rows ``a..b`` costs its padded tokens ``(b - a + 1) · len(row a)`` plus a fixed cost of one longest row
    (``len(row 0)``: the per-pass work that does not shrink with fewer tokens, such as launches and the layers'
    weights read once per pass). The cheapest split is found exactly by dynamic programming over the cut points
    (O(rows²), at most a few dozen rows): short image copies are not padded to an original's length when a pass of
    their own is cheaper, and rows of similar length share a pass when the cap allows (with one sample per buffer
    group, that sample's original and copies). The split never changes a number, only how many tokens each pass pads.
    The fixed cost is the same on every device; on a CPU the default cap (:func:`default_max_tokens`) is what keeps
    passes small.
    """
    if not lengths:
        return []
    pass_cost = lengths[0]
    cost = [0] + [float("inf")] * len(lengths)  # cost[end]: the cheapest split of rows[:end]
    start_of = [0] * (len(lengths) + 1)
    for end in range(1, len(lengths) + 1):
        for start in range(end - 1, -1, -1):
            padded = (end - start) * lengths[start]
            if padded > max_tokens and start < end - 1:
                break  # longer runs only pad more (rows are sorted longest first)
            if cost[start] + padded + pass_cost < cost[end]:
                cost[end], start_of[end] = cost[start] + padded + pass_cost, start
    passes, end = [], len(lengths)
    while end:
        passes.append(slice(start_of[end], end))
        end = start_of[end]
    return passes[::-1]


def shared_prefix_length(keep: torch.Tensor) -> int:
    """How many leading positions a copy keeps unchanged (its shared prefix with the original)."""
    changed = (keep != torch.arange(len(keep))).nonzero()
    return int(changed[0]) if len(changed) else len(keep)


@dataclass
class Pass:
    """One forward pass: a run of the ordered rows, and the (original, text copy) pairs among them that share their
    prefix (indices within the pass)."""

    rows: slice
    pairs: list[PrefixPair] = field(default_factory=list)


AUTO_SHARE_FROM = 0.4  # aimkp_fast_share_prefix: auto shares a pair whose prefix is over this share of its tokens


def plan_passes(rows: list[Row], max_tokens: int, share_from: float | None) -> tuple[list[Row], list[Pass]]:
    """``rows`` in pass order and the passes (:func:`group_lengths`, rows sorted longest first).

    With ``share_from`` (not None) a sample's original and text copy whose shared prefix ``p`` is more than
    ``share_from`` of their tokens (``p > share_from · (L_o + L_t)``) are a unit of the packed length
    ``L_o + L_t - p`` (:mod:`~aimkp_plugin.method.shared_prefix`), adjacent in the order; passes of such pairs hold no
    other rows (the text copies' backward product runs over every row of a pass), and the other rows follow in passes
    of their own. ``auto`` uses :data:`AUTO_SHARE_FROM`: counting a token's backward as two forwards, a pair costs
    ``4 (L_o + L_t)`` apart under gradient checkpointing (forward, recomputation, backward) and ``6 (L_o + L_t - p)``
    packed (its backward runs twice), so packing pays from ``p > (L_o + L_t) / 3``; without checkpointing
    (``3 (L_o + L_t)`` against ``5 (L_o + L_t - p)``) from ``p > 0.4 (L_o + L_t)``. The packing's own work (masks,
    index maps, more passes) moves the break-even up: on the tiny LLaVA-NeXT, pairs at 0.33–0.36 ran 1.19× slower
    packed, and pairs at 0.42–0.45 ran 0.93–1.02× (tiny models) and 0.76–0.92× (LLaVA-1.5-7B widths) the time apart.
    """

    def longest_first(units: list[list[Row]], lengths: list[int]) -> tuple[list[list[Row]], list[int]]:
        order = sorted(range(len(units)), key=lambda index: -lengths[index])  # stable: ties keep the sample order
        return [units[index] for index in order], [lengths[index] for index in order]

    texts = {row.sample: row for row in rows if row.name == "text"}
    prefixes = {}  # sample -> its text copy's shared prefix, read only when sharing
    if share_from is not None:
        prefixes = {sample: shared_prefix_length(text.keep) for sample, text in texts.items()}

    def shares(original: Row) -> bool:
        text = texts.get(original.sample)
        if share_from is None or original.name != ORIGINAL or text is None:
            return False
        prefix = prefixes[original.sample]
        return prefix > 0 and prefix > share_from * (len(original.keep) + len(text.keep))

    paired = {row.sample for row in rows if shares(row)}
    pairs = [[row, texts[row.sample]] for row in rows if row.sample in paired and row.name == ORIGINAL]
    singles = [[row] for row in rows if row.sample not in paired or row.name not in (ORIGINAL, "text")]
    ordered: list[Row] = []
    passes: list[Pass] = []
    for units, lengths in (
        longest_first(pairs, [len(o.keep) + len(t.keep) - prefixes[t.sample] for o, t in pairs]),
        longest_first(singles, [len(unit[0].keep) for unit in singles]),
    ):
        for group in group_lengths(lengths, max_tokens):
            start, pass_pairs = len(ordered), []
            for unit in units[group]:
                if len(unit) == 2:
                    original, text = unit
                    at = len(ordered) - start
                    pass_pairs.append(
                        PrefixPair(at, at + 1, prefixes[text.sample], len(original.keep), len(text.keep))
                    )
                ordered += unit
            passes.append(Pass(slice(start, len(ordered)), pass_pairs))
    return ordered, passes


def default_share_prefix(device: torch.device) -> bool:
    """``aimkp_fast_share_prefix: auto`` without dropout: on a CPU, where a step's time follows the tokens it
    computes; not on an accelerator, where the extra passes it takes (pairs and other rows apart) have not been
    measured yet."""
    return device.type == "cpu"


def active_dropout(layers: Sequence[nn.Module]) -> str | None:
    """The first dropout with a rate above 0 in ``layers`` (a ``Dropout`` module such as LoRA's, or an attention
    module's ``attention_dropout``), named; None when there is none."""
    for index, layer in enumerate(layers):
        for name, module in layer.named_modules():
            rate = module.p if isinstance(module, nn.Dropout) else getattr(module, "attention_dropout", 0.0)
            if isinstance(rate, (int, float)) and rate > 0:
                return f"layer {index} {name or type(layer).__name__}: {type(module).__name__} {rate:g}"
    return None


def resolve_share_prefix(layout: FastStepLayout, requested: bool | None, device: torch.device) -> float | None:
    """From which share of a pair's tokens its prefix is shared (:func:`plan_passes`), or None for never:
    ``requested`` True shares every pair (0), None (auto) those over :data:`AUTO_SHARE_FROM` where
    :func:`default_share_prefix` says so. Never with dropout in the decoder layers, where the original and its text
    copy would share the prefix's dropout masks (kept apart, each forward pass draws its own, as in the reference
    step): with ``requested`` True that is a :class:`FastStepUnsupportedError`. Never for a family that removes hidden
    tokens (linear attention and convolutions read the sequence in order, so a tree mask cannot separate the copies);
    with ``requested`` True that is an error too."""
    if layout.family.removes_hidden_tokens:
        if requested:
            raise FastStepUnsupportedError(
                f"aimkp_fast_share_prefix: true needs a model whose tokens mix only through attention, and the "
                f"{layout.family.name} model mixes them outside attention too (linear attention or convolutions), "
                "where a packed prefix cannot be shared. Set aimkp_fast_share_prefix: auto or false."
            )
        return None
    if layout.dropout is None:
        if requested is None:
            return AUTO_SHARE_FROM if default_share_prefix(device) else None
        return 0.0 if requested else None
    if requested:
        raise FastStepUnsupportedError(
            f"aimkp_fast_share_prefix: true needs decoder layers without dropout, and this model has "
            f"{layout.dropout}: the original and its text copy would share the prefix's dropout masks. Set "
            "lora_dropout: 0 (and no attention dropout), or aimkp_fast_share_prefix: auto or false."
        )
    return None


def default_max_tokens(samples: Sequence[SampleInputs], rows: Sequence[Row], device: torch.device) -> int:
    """``aimkp_fast_max_tokens: 0``: the micro-batch's own padded size (``len(samples)`` × its longest row), the size
    of plain SFT's forward. On an accelerator, at least as many rows as one sample has (its original and copies) at
    that length, so that a micro-batch of one or two samples runs a sample's rows as one pass instead of one pass per
    row: a pass of fewer tokens is barely cheaper there (at LLaVA-1.5-7B widths on an H100 one pass of a sample's
    three rows took 0.34× the time of three passes). Not on a CPU, which is compute-bound and where the padded
    three-row pass took 1.3–1.5× as long as three one-row passes at the same widths."""
    together = max(Counter(row.sample for row in rows).values()) if device.type != "cpu" else 1
    return max(len(samples), together) * max(len(row.keep) for row in rows)


def padded_inputs(
    family: FastStepFamily, samples: Sequence[SampleInputs], rows: Sequence[Row], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``input_ids``, ``labels``, ``attention_mask`` and ``position_ids`` of rows, right-padded to the longest; every
    kept token keeps its original position ids (all rope rows of a multimodal rope)."""
    length = max(len(row.keep) for row in rows)
    input_ids = torch.zeros(len(rows), length, dtype=torch.long, device=device)
    labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long, device=device)
    attention_mask = torch.zeros(len(rows), length, dtype=torch.long, device=device)
    positions = [family.position_ids(samples[row.sample]) for row in rows]
    leading = positions[0].shape[:-2]  # () for (1, L); (3,) or (4,) for a multimodal rope's (P, 1, L)
    position_ids = torch.zeros(*leading, len(rows), length, dtype=torch.long, device=device)
    for index, row in enumerate(rows):
        inputs, count = samples[row.sample].model_inputs, len(row.keep)
        keep = row.keep.to(inputs["input_ids"].device)
        input_ids[index, :count] = inputs["input_ids"][0, keep]
        labels[index, :count] = inputs["labels"][0, keep]
        attention_mask[index, :count] = 1
        position_ids[..., index, :count] = positions[index][..., 0, :].to(device)[..., keep.to(device)]
    return input_ids, labels, attention_mask, position_ids


def predicting_positions(labels: torch.Tensor) -> torch.Tensor:
    """The positions (1-D, ascending) whose next token is an answer token in at least one row of ``labels``: the only
    logits a loss reads. Every other position's logits get no gradient, so leaving them out changes no number."""
    return (labels[:, 1:] != IGNORE_INDEX).any(dim=0).nonzero().squeeze(1)


def buffer_groups(rows: Sequence[Row], row_bytes: int, max_buffer_bytes: int | None) -> list[list[int]]:
    """The samples of ``rows`` (positions in the micro-batch, in order) in consecutive groups whose rows take at most
    ``max_buffer_bytes`` of per-copy gradient buffer (``row_bytes`` each); a sample whose rows alone are more makes a
    group of its own. None: one group."""
    groups: list[list[int]] = []
    used = 0
    for sample, count in Counter(row.sample for row in rows).items():  # in order of first appearance
        size = count * row_bytes
        if groups and (max_buffer_bytes is None or used + size <= max_buffer_bytes):
            groups[-1].append(sample)
            used += size
        else:
            groups.append([sample])
            used = size
    return groups


def fast_batch_step(
    layout: FastStepLayout,
    samples: Sequence[SampleInputs],
    state: CurriculumState,
    config: StepConfig,
    total_answer_tokens: float,
    epoch: int = 0,
    max_tokens_per_forward: int | None = None,
    max_buffer_bytes: int | None = None,
    share_prefix: bool | None = None,
) -> tuple[list[SampleOutcome], list[int]]:
    """Run the visits of a micro-batch: gradients into ``.grad``, the states updated, the outcomes returned.

    Returns the outcomes of the samples it trained (in micro-batch order) and the positions of the samples it left
    to the reference step (see the module docstring); the caller runs those. ``max_buffer_bytes`` bounds the
    per-copy gradient buffer: the samples are then trained in groups whose copies fit, each group's share added to
    ``.grad`` before the next (the sum is the same; each sample's cosines only involve its own copies).
    ``share_prefix`` runs each original and its text copy with their shared prefix computed once per decoder layer
    (:mod:`~aimkp_plugin.method.shared_prefix`); None: on a CPU without dropout, the pairs whose prefix pays
    (:func:`resolve_share_prefix`).
    """
    rows, reference = plan_rows(samples, state, config, layout.family.removes_hidden_tokens)
    outcomes = {
        position: SampleOutcome(sample.index, sample.num_answer_tokens, 0.0)
        for position, sample in enumerate(samples)
        if position not in reference
    }
    if rows:
        device = layout.model.get_input_embeddings().weight.device
        max_tokens_per_forward = max_tokens_per_forward or default_max_tokens(samples, rows, device)
        share_from = resolve_share_prefix(layout, share_prefix, device)
        buffer_dtype = torch.promote_types(layout.parameters[0].dtype, torch.float32)
        row_bytes = sum(parameter.numel() for parameter in layout.parameters) * buffer_dtype.itemsize
        for group in buffer_groups(rows, row_bytes, max_buffer_bytes):
            slot = {position: index for index, position in enumerate(group)}
            group_rows = [Row(slot[row.sample], row.name, row.stride, row.keep) for row in rows if row.sample in slot]
            group_rows, passes = plan_passes(group_rows, max_tokens_per_forward, share_from)
            group_samples = [samples[position] for position in group]
            train_rows(
                layout,
                group_samples,
                group_rows,
                passes,
                config,
                total_answer_tokens,
                {index: outcomes[position] for position, index in slot.items()},
            )
    for position, outcome in outcomes.items():
        outcome.copies.sort(key=lambda copy: config.modalities.index(copy.modality))
        cosines = {copy.modality: copy.cosine for copy in outcome.copies}
        update_curriculum(samples[position], state, config, cosines, epoch, outcome)
    return [outcomes[position] for position in sorted(outcomes)], reference


def train_rows(
    layout: FastStepLayout,
    samples: Sequence[SampleInputs],
    rows: list[Row],
    passes: list[Pass],
    config: StepConfig,
    total_answer_tokens: float,
    outcomes: dict[int, SampleOutcome],
) -> None:
    """Every row's gradient, the copies' cosines and keep decisions (into ``outcomes``, by sample position), and
    ``Σ_i n_i / |K_i| / N · Σ_{v ∈ K_i} g_{i,v}`` over these samples added into ``.grad``."""
    gradients, loss_sums = row_gradients(layout, samples, rows, passes)
    gram, losses = gradients.gram().cpu(), loss_sums.tolist()  # one transfer each, then plain reads
    weights = torch.zeros(len(rows), dtype=gram.dtype)
    original_row = {row.sample: index for index, row in enumerate(rows) if row.name == ORIGINAL}
    kept_rows: dict[int, list[int]] = {position: [index] for position, index in original_row.items()}
    for index, row in enumerate(rows):
        if row.name == ORIGINAL:
            outcomes[row.sample].original_loss_sum = losses[index]
            continue
        first = original_row[row.sample]
        cosine = cosine_from_products(gram[first, index], gram[first, first], gram[index, index])
        decision = keep_copy(cosine, config.thresholds[row.name], config.filtering)
        outcomes[row.sample].copies.append(CopyOutcome(row.name, row.stride, cosine, decision))
        if decision:
            kept_rows[row.sample].append(index)
    for position, indices in kept_rows.items():
        share = samples[position].num_answer_tokens * variant_weight(len(indices)) / total_answer_tokens
        weights[indices] = share
    gradients.add_combination_into_grad(weights.to(gradients.flat.device))


def feature_indices(
    samples: Sequence[SampleInputs], rows: Sequence[Row], image_token_id: int
) -> tuple[list[torch.Tensor], int]:
    """For each row, the indices into the micro-batch's image features of the image tokens it keeps, in order; and
    the number of image tokens in the micro-batch."""
    first, cursor, ordinals = [], 0, []
    for sample in samples:
        is_image = sample.model_inputs["input_ids"][0] == image_token_id
        first.append(cursor)
        ordinals.append(torch.where(is_image, torch.cumsum(is_image, 0) - 1, -1))
        cursor += int(is_image.sum())
    indices = []
    for row in rows:
        ordinal = ordinals[row.sample][row.keep.to(ordinals[row.sample].device)]
        indices.append(first[row.sample] + ordinal[ordinal >= 0])
    return indices, cursor


def row_gradients(
    layout: FastStepLayout,
    samples: Sequence[SampleInputs],
    rows: list[Row],
    passes: Sequence[Pass],
) -> tuple[RowGradients, torch.Tensor]:
    """Every row's gradient of its mean answer cross-entropy (in a :class:`RowGradients`) and its summed loss.

    ``.grad`` is left as it was. One forward and one backward per pass (``passes`` of ``rows``, from
    :func:`plan_passes`); the pairs that a pass names share their prefix. The vision side's
    share of each row's gradient comes from one vmapped backward per sample through the shared image features at
    the end.
    """
    model, family = layout.model, layout.family
    embedding = model.get_input_embeddings()
    device = embedding.weight.device
    buffer_dtype = torch.promote_types(layout.parameters[0].dtype, torch.float32)
    gradients = RowGradients(layout.parameters, len(rows), buffer_dtype, device)
    image_token_id = family.image_token_id(model.config)
    trains_vision = bool(layout.vision_parameters)
    paused = checkpointing_paused(layout.vision_modules) if trains_vision else nullcontext()
    with torch.set_grad_enabled(trains_vision), paused:  # the vision backward below is one vmapped autograd.grad
        features = family.encode_images(model, samples)
    # the token features in the embeddings' dtype (as the model's masked_scatter does); extras stay as they come
    if features is not None:
        features.tokens = features.tokens.to(embedding.weight.dtype)
    shared = features.shared if features is not None else []
    traced = [
        k for k, tensor in enumerate(shared) if trains_vision and tensor.requires_grad
    ]  # e.g. not frozen mergers
    indices, image_tokens = feature_indices(samples, rows, image_token_id)
    if shared and any(image_tokens != tensor.shape[0] for tensor in shared):
        counts = [tensor.shape[0] for tensor in shared]
        raise RuntimeError(
            f"aimkp fast step ({family.name}): {image_tokens} image tokens in the micro-batch but image features of "
            f"{counts} rows."
        )

    # Autograd adds into an existing .grad in place: park the caller's gradients while the backward passes below
    # write (and RowGradients drops) the hooked layers' summed gradients, and put the caller's back afterwards.
    saved_grads = [parameter.grad for parameter in layout.parameters]
    for parameter in layout.parameters:
        parameter.grad = None
    leaves: list[list[torch.Tensor]] = [[] for _ in rows]  # per row: its kept rows of each shared tensor
    loss_sums = torch.zeros(len(rows), dtype=buffer_dtype, device=device)
    try:
        with gradients.hook_linear_layers(layout.linear_modules):
            for forward in passes:
                group = forward.rows
                input_ids, labels, attention_mask, position_ids = padded_inputs(family, samples, rows[group], device)
                inputs_embeds = embedding(input_ids)
                image_mask = input_ids == image_token_id
                values: list[torch.Tensor] = []
                if shared:
                    for index in range(group.start, group.stop):
                        kept = indices[index].to(device)
                        leaves[index] = [
                            tensor.detach()[kept].requires_grad_(k in traced) for k, tensor in enumerate(shared)
                        ]
                    values = [
                        torch.cat([leaves[index][k] for index in range(group.start, group.stop)])
                        for k in range(len(shared))
                    ]
                    if values[0].shape[0]:
                        inputs_embeds = inputs_embeds.masked_scatter(image_mask[..., None], values[0])
                if not inputs_embeds.requires_grad:
                    inputs_embeds.requires_grad_(True)  # frozen embeddings and projector: the graph starts here
                gradients.rows, gradients.tokens = group, input_ids.shape[1]
                predicting = predicting_positions(labels)
                sharing = nullcontext()
                if forward.pairs:
                    lengths = [len(row.keep) for row in rows[group]]
                    plan = PackedPass(forward.pairs, lengths, input_ids.shape[1], range(group.start, group.stop))
                    sharing = sharing_prefixes(family.decoder_layers(model), plan.to(device), gradients)
                with sharing:
                    logits = family.language_logits(
                        model, inputs_embeds, attention_mask, position_ids, image_mask, values[1:], predicting
                    )
                sums = predicted_loss_sums(logits, labels[:, predicting + 1])
                tokens = torch.tensor(
                    [samples[row.sample].num_answer_tokens for row in rows[group]], dtype=sums.dtype, device=device
                )
                (sums / tokens).sum().backward()
                loss_sums[group] = sums.detach()
    finally:
        for parameter, previous in zip(layout.parameters, saved_grads, strict=True):
            parameter.grad = previous
    if traced:  # one vmapped backward per sample, over its own rows
        by_sample: dict[int, list[int]] = {}
        for index, row in enumerate(rows):
            if leaves[index] and any(leaves[index][k].grad is not None for k in traced):
                by_sample.setdefault(row.sample, []).append(index)
        for count, sample_rows in enumerate(by_sample.values(), start=1):
            cotangents = [
                torch.zeros(len(sample_rows), *shared[k].shape, dtype=shared[k].dtype, device=device) for k in traced
            ]
            for slot, index in enumerate(sample_rows):
                for cotangent, k in zip(cotangents, traced, strict=True):
                    if leaves[index][k].grad is not None:
                        cotangent[slot, indices[index].to(device)] = leaves[index][k].grad
            retain = count < len(by_sample)
            gradients.add_through(
                [shared[k] for k in traced], layout.vision_parameters, sample_rows, cotangents, retain_graph=retain
            )
    return gradients, loss_sums
