"""The fast AimKP step: the same updates as :func:`~aimkp_plugin.method.step.reference_sample_step`, computed for a
whole micro-batch at once.

What changes against the reference, and why each change keeps the result exact:

- **Images are encoded once.** The vision tower and projector run once per micro-batch; every variant of a sample
  reads the same image features (the reference recomputes them per variant, with identical results).
- **Masked tokens are dropped, not hidden.** A hidden token influences no other token, so removing it from the
  sequence changes nothing for the kept ones, as long as every kept token keeps its original position id (also
  Qwen2-VL's 3-D rope positions, whose columns are gathered). At stride 2 a 24×24 image keeps 144 of 576 tokens. A
  model whose images are cross-attention keys (Mllama) reads its encoded keys beside the embeddings instead, each
  row with its own hidden keys blocked (an image copy there hides keys, no token).
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
the language model, DoRA magnitudes) has no per-row rule here: :func:`~.fast_layout.fast_step_layout` says so, and
the caller runs the reference step instead. A sample in which a hidden token directly precedes an answer token
(possible only when the instruction was not found and the text span runs up to the answer) also takes the reference
step: there the reference predicts that answer token from the hidden token's own output, which a dropped token cannot
give.

Pure torch. What differs between model families (how images are encoded, which modules produce the image features,
how the language model is called with them, which positions a token has) is asked of a
:class:`~aimkp_plugin.method.family_interface.FastStepFamily`; the model families of ``aimkp_plugin.families``
implement it. The plan of rows and passes is :mod:`.pass_planning`'s, the model's layout :mod:`.fast_layout`'s.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from .fast_layout import FastStepLayout, checkpointing_paused, resolve_share_prefix
from .filtering import cosines_from_gram, keep_copy, variant_weight
from .pass_planning import Pass, Row, auto_buffer_bytes, buffer_groups, default_max_tokens, plan_passes, plan_rows
from .row_gradients import RowGradients
from .shared_prefix import PackedPass, sharing_prefixes
from .staging import StagedIndices
from .state import CurriculumState
from .types import AUTO_BUFFER, IGNORE_INDEX, ORIGINAL, CopyOutcome, SampleInputs, SampleOutcome, StepConfig
from .variants import predicted_loss_sums, update_curriculum


def host_pass_inputs(
    samples: Sequence[SampleInputs], rows: Sequence[Row], keeps: Sequence[list[int]]
) -> tuple[list[list[int]], list[list[int]], list[list[int]], list[int]]:
    """``input_ids``, ``labels`` and ``attention_mask`` of rows (each keeping the positions of ``keeps``), right-padded
    to the longest, as host lists from the samples' host lists; and the positions that predict an answer token
    (:func:`predicting_positions`)."""
    length = max(len(keep) for keep in keeps)
    host_ids, host_labels, host_mask = [], [], []
    for row, keep in zip(rows, keeps, strict=True):
        ids, labels, pad = samples[row.sample].host_ids(), samples[row.sample].host_labels(), length - len(keep)
        host_ids.append([ids[position] for position in keep] + [0] * pad)
        host_labels.append([labels[position] for position in keep] + [IGNORE_INDEX] * pad)
        host_mask.append([1] * len(keep) + [0] * pad)
    return host_ids, host_labels, host_mask, predicting_positions(host_labels)


def host_position_ids(positions: Sequence[torch.Tensor], keeps: Sequence[list[int]], length: int) -> list[int]:
    """Position ids of rows as one flat host list in the layout ``(*leading, rows, length)`` (zero-padded), from each
    row's sample's host position ids (``(1, L)``, or ``(P, 1, L)`` for a multimodal rope) at its kept positions
    (``keeps``)."""
    per_row = []
    for position_ids, keep in zip(positions, keeps, strict=True):
        table = position_ids[..., 0, :].tolist()  # (L,) or (P, L)
        lanes = [table] if position_ids.dim() == 2 else table
        per_row.append([[lane[index] for index in keep] + [0] * (length - len(keep)) for lane in lanes])
    return [value for lane in range(len(per_row[0])) for row in per_row for value in row[lane]]


def predicting_positions(labels: Sequence[Sequence[int]]) -> list[int]:
    """The positions (ascending) whose next token is an answer token in at least one row of ``labels`` (host lists
    of equal length): the only logits a loss reads. Every other position's logits get no gradient, so leaving them
    out changes no number."""
    length = len(labels[0]) if labels else 0
    return [position for position in range(length - 1) if any(row[position + 1] != IGNORE_INDEX for row in labels)]


def fast_batch_step(
    layout: FastStepLayout,
    samples: Sequence[SampleInputs],
    state: CurriculumState,
    config: StepConfig,
    total_answer_tokens: float,
    epoch: int = 0,
) -> tuple[list[SampleOutcome], list[int]]:
    """Run the visits of a micro-batch: gradients into ``.grad``, the states updated, the outcomes returned.

    Returns the outcomes of the samples it trained (in micro-batch order) and the positions of the samples it left
    to the reference step (see the module docstring); the caller runs those. The knobs come from ``config``:
    ``max_tokens_per_forward`` caps a pass's padded tokens (None: :func:`~.pass_planning.default_max_tokens`);
    ``max_buffer_bytes`` bounds the per-copy gradient buffer (``AUTO_BUFFER``: sized when the step starts, by
    :func:`~.pass_planning.auto_buffer_bytes`): the samples are then trained in groups whose copies fit, each
    group's share added to ``.grad`` before the next (the sum is the same; each sample's cosines only involve its own
    copies); ``share_prefix`` runs each original and its text copy with their shared prefix computed
    once per decoder layer (:mod:`~aimkp_plugin.method.shared_prefix`); None: on a CPU without dropout, the pairs
    whose prefix pays (:func:`~.fast_layout.resolve_share_prefix`).
    """
    rows, reference = plan_rows(samples, state, config, layout.family.removes_hidden_tokens)
    outcomes = {
        position: SampleOutcome(sample.index, sample.num_answer_tokens, 0.0)
        for position, sample in enumerate(samples)
        if position not in reference
    }
    if rows:
        device = layout.model.get_input_embeddings().weight.device
        max_tokens_per_forward = config.max_tokens_per_forward or default_max_tokens(samples, rows, device)
        share_from = resolve_share_prefix(layout, config.share_prefix, device)
        buffer_dtype = torch.promote_types(layout.parameters[0].dtype, torch.float32)
        row_bytes = sum(parameter.numel() for parameter in layout.parameters) * buffer_dtype.itemsize
        budget = config.max_buffer_bytes
        if budget == AUTO_BUFFER:
            budget = auto_buffer_bytes(device)
        for group in buffer_groups(rows, row_bytes, budget):
            slot = {position: index for index, position in enumerate(group)}
            group_rows = [replace(row, sample=slot[row.sample]) for row in rows if row.sample in slot]
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
    indices = stage_group(layout, samples, rows, passes)  # every index on the device before the first forward
    gradients, loss_sums = variant_gradients(layout, samples, rows, passes, indices)
    copies, device = indices.copies, gradients.flat.device
    cosines = cosines_from_gram(gradients.gram(), indices[indices.pairs[0]], indices[indices.pairs[1]])
    # the keep decisions' one read of the device: every row's loss and every copy's cosine, in one transfer
    values = torch.cat([loss_sums.to(torch.float64), cosines.to(torch.float64)]).tolist()
    losses, cosine_of = values[: len(rows)], dict(zip(copies, values[len(rows) :], strict=True))
    weights = [0.0] * len(rows)
    kept_rows: dict[int, list[int]] = {position: [index] for position, index in indices.originals.items()}
    for index, row in enumerate(rows):
        if row.name == ORIGINAL:
            outcomes[row.sample].original_loss_sum = losses[index]
            continue
        cosine = cosine_of[index]
        decision = keep_copy(cosine, config.thresholds[row.name], config.filtering)
        outcomes[row.sample].copies.append(CopyOutcome(row.name, row.stride, cosine, decision))
        if decision:
            kept_rows[row.sample].append(index)
    for position, indices in kept_rows.items():
        share = samples[position].num_answer_tokens * variant_weight(len(indices)) / total_answer_tokens
        for index in indices:
            weights[index] = share
    gradients.add_combination_into_grad(torch.tensor(weights, dtype=gradients.flat.dtype).to(device))


def feature_indices(
    samples: Sequence[SampleInputs], rows: Sequence[Row], keeps: Sequence[list[int]], image_token_id: int
) -> tuple[list[list[int]], int]:
    """For each row (keeping the positions of ``keeps``), the indices into the micro-batch's image features of the
    image tokens it keeps, in order; and the number of image tokens in the micro-batch."""
    numbers, cursor = [], 0  # per sample: position -> its image token's number in the micro-batch (host lists)
    for sample in samples:
        number = {}
        for position, token in enumerate(sample.host_ids()):
            if token == image_token_id:
                number[position] = cursor
                cursor += 1
        numbers.append(number)
    indices = []
    for row, keep in zip(rows, keeps, strict=True):
        number = numbers[row.sample]
        indices.append([number[position] for position in keep if position in number])
    return indices, cursor


@dataclass
class PassIndices:
    """One pass's staged tensors (handles into :class:`GroupIndices`' staging): ids, labels and attention mask
    ``(rows, length)``, the answer-predicting positions, each row's answer-token count, and the position ids when
    they were laid out on the host (``(*leading, rows, length)``; None: gathered on the device from each row's kept
    positions, out of its sample's own position ids in ``positions``)."""

    input_ids: int
    labels: int
    attention_mask: int
    predicting: int
    tokens: int
    position_ids: int | None
    positions: list[torch.Tensor] | None = None


@dataclass
class GroupIndices:
    """Every index a group of rows needs on the device, staged from the host lists before the group's first forward
    and sent in one copy (:class:`~.staging.StagedIndices`): per pass (:class:`PassIndices`), per row its kept
    positions and image-feature indices, per sample its rows, and the Gram matrix's (original, copy) row pairs."""

    staged: StagedIndices
    passes: list[PassIndices]
    keep: list[int]
    features: list[int]
    feature_counts: list[int]
    image_tokens: int
    sample_rows: dict[int, tuple[list[int], int]]
    pairs: tuple[int, int]
    copies: list[int]
    originals: dict[int, int] = field(default_factory=dict)  # sample position -> its original's row

    def __getitem__(self, handle: int) -> torch.Tensor:
        return self.staged[handle]


def stage_group(
    layout: FastStepLayout, samples: Sequence[SampleInputs], rows: list[Row], passes: Sequence[Pass]
) -> GroupIndices:
    """Lay out on the host, and send to the device in one copy, every index the group's passes, vision backward and
    cosines read (:class:`GroupIndices`)."""
    model, family = layout.model, layout.family
    device = model.get_input_embeddings().weight.device
    staged = StagedIndices()
    keeps = [row.keep.tolist() for row in rows]  # each row's kept positions, read from the host once
    features, image_tokens = feature_indices(samples, rows, keeps, family.image_token_id(model.config))
    pass_indices = []
    for forward in passes:
        group_rows, group_keeps = rows[forward.rows], keeps[forward.rows]
        ids, labels, mask, predicting = host_pass_inputs(samples, group_rows, group_keeps)
        positions = [family.position_ids(samples[row.sample]) for row in group_rows]
        tokens = [samples[row.sample].num_answer_tokens for row in group_rows]
        handles = [staged.add(values) for values in (ids, labels, mask, predicting, tokens)]
        if all(position_ids.device.type == "cpu" for position_ids in positions):
            leading = tuple(positions[0].shape[:-2])
            flat = host_position_ids(positions, group_keeps, len(ids[0]))
            pass_indices.append(PassIndices(*handles, staged.add(flat, (*leading, len(group_rows), len(ids[0])))))
        else:
            pass_indices.append(PassIndices(*handles, None, positions))
    by_sample: dict[int, list[int]] = {}
    for index, row in enumerate(rows):
        by_sample.setdefault(row.sample, []).append(index)
    original_row = {row.sample: index for index, row in enumerate(rows) if row.name == ORIGINAL}
    copies = [index for index, row in enumerate(rows) if row.name != ORIGINAL]
    indices = GroupIndices(
        staged=staged,
        passes=pass_indices,
        keep=[staged.add(keep) for keep in keeps],
        features=[staged.add(kept) for kept in features],
        feature_counts=[len(kept) for kept in features],
        image_tokens=image_tokens,
        sample_rows={sample: (members, staged.add(members)) for sample, members in by_sample.items()},
        pairs=(staged.add([original_row[rows[index].sample] for index in copies]), staged.add(copies)),
        copies=copies,
        originals=original_row,
    )
    staged.send(device)
    return indices


@dataclass
class PassFeatures:
    """A micro-batch's image features as the passes read them: ``shared`` (the token features first, then the
    extras), which of them carry a gradient to trained vision parameters (``traced``), and for each row the indices
    of the features it keeps (on the device) and, once its pass ran, its own leaf copies of them (``leaves``, whose
    ``.grad`` the pass's backward fills)."""

    shared: list[torch.Tensor]
    traced: list[int]
    indices: list[torch.Tensor]
    leaves: list[list[torch.Tensor]] = field(default_factory=list)

    def pass_values(self, rows: slice) -> list[torch.Tensor]:
        """Each shared tensor's kept rows for the rows of one pass, concatenated in row order (fresh leaves)."""
        if not self.shared:
            return []
        for index in range(rows.start, rows.stop):
            kept = self.indices[index]
            self.leaves[index] = [
                tensor.detach()[kept].requires_grad_(k in self.traced) for k, tensor in enumerate(self.shared)
            ]
        return [
            torch.cat([self.leaves[index][k] for index in range(rows.start, rows.stop)])
            for k in range(len(self.shared))
        ]


def encode_features(
    layout: FastStepLayout, samples: Sequence[SampleInputs], rows: Sequence[Row], indices: GroupIndices
) -> PassFeatures:
    """The micro-batch's images encoded once (with the graph to the trained vision parameters, if any), and which
    features each row keeps; stops when the image tokens and the features disagree in number."""
    model, family = layout.model, layout.family
    trains_vision = bool(layout.vision_parameters)
    paused = checkpointing_paused(layout.vision_modules) if trains_vision else nullcontext()
    with torch.set_grad_enabled(trains_vision), paused:  # the vision backward is one vmapped autograd.grad
        features = family.encode_images(model, samples)
    # the token features in the embeddings' dtype (as the model's masked_scatter does); extras stay as they come
    if features is not None:
        features.tokens = features.tokens.to(model.get_input_embeddings().weight.dtype)
    shared = features.shared if features is not None else []
    traced = [k for k, tensor in enumerate(shared) if trains_vision and tensor.requires_grad]  # not frozen mergers
    if shared and any(indices.image_tokens != tensor.shape[0] for tensor in shared):
        counts = [tensor.shape[0] for tensor in shared]
        raise RuntimeError(
            f"aimkp fast step ({family.name}): {indices.image_tokens} image tokens in the micro-batch but image "
            f"features of {counts} rows."
        )
    return PassFeatures(shared, traced, [indices[handle] for handle in indices.features], [[] for _ in rows])


@contextmanager
def grads_parked(parameters: Sequence[nn.Parameter]) -> Iterator[None]:
    """``.grad`` of ``parameters`` set aside while active and put back afterwards. Autograd adds into an existing
    ``.grad`` in place, and the passes' backward writes (and :class:`RowGradients` drops) the hooked layers' summed
    gradients there."""
    saved = [parameter.grad for parameter in parameters]
    for parameter in parameters:
        parameter.grad = None
    try:
        yield
    finally:
        for parameter, previous in zip(parameters, saved, strict=True):
            parameter.grad = previous


def run_pass(
    layout: FastStepLayout,
    samples: Sequence[SampleInputs],
    rows: list[Row],
    forward: Pass,
    features: PassFeatures,
    gradients: RowGradients,
    indices: GroupIndices,
    staged: PassIndices,
) -> torch.Tensor:
    """One forward and one backward of the rows of ``forward``: each row's gradient of its mean answer cross-entropy
    into ``gradients`` (the hooked Linear layers) and into its feature leaves; returns the rows' summed losses. The
    pairs that the pass names share their prefix. Every index comes from ``staged`` (already on the device)."""
    model, family = layout.model, layout.family
    embedding = model.get_input_embeddings()
    device = embedding.weight.device
    group = forward.rows
    input_ids, labels = indices[staged.input_ids], indices[staged.labels]
    attention_mask, predicting = indices[staged.attention_mask], indices[staged.predicting]
    position_ids = pass_position_ids(rows, group, indices, staged, device)
    inputs_embeds = embedding(input_ids)
    image_mask = input_ids == family.image_token_id(model.config)
    values = features.pass_values(group)
    extras = values[1:]
    if family.cross_attention_images:  # the features are the keys of cross-attention, beside the embeddings
        counts = [(row, count) for row, count in zip(rows[group], indices.feature_counts[group], strict=True)]
        extras = [*values, hidden_key_rows(counts, values[0].shape[1], device)] if values else []
    elif values and values[0].shape[0]:
        inputs_embeds = inputs_embeds.masked_scatter(image_mask[..., None], values[0])
    if not inputs_embeds.requires_grad:
        inputs_embeds.requires_grad_(True)  # frozen embeddings and projector: the graph starts here
    gradients.rows, gradients.tokens = group, input_ids.shape[1]
    sharing = nullcontext()
    if forward.pairs:
        lengths = [len(row.keep) for row in rows[group]]
        plan = PackedPass(forward.pairs, lengths, input_ids.shape[1], range(group.start, group.stop))
        sharing = sharing_prefixes(family.decoder_layers(model), plan.to(device), gradients)
    with sharing:
        logits = family.language_logits(
            model, inputs_embeds, attention_mask, position_ids, image_mask, extras, predicting
        )
    sums = predicted_loss_sums(logits, labels[:, predicting + 1])
    (sums / indices[staged.tokens].to(sums.dtype)).sum().backward()
    return sums.detach()


def pass_position_ids(
    rows: list[Row], group: slice, indices: GroupIndices, staged: PassIndices, device: torch.device
) -> torch.Tensor:
    """The pass's position ids ``(*leading, rows, length)``: every kept token keeps its original position ids (all
    rope rows of a multimodal rope). Laid out on the host when the samples' position ids are there, else gathered on
    the device from each row's kept positions."""
    if staged.position_ids is not None:
        return indices[staged.position_ids]
    length = indices[staged.input_ids].shape[1]
    positions = staged.positions
    leading = positions[0].shape[:-2]  # () for (1, L); (3,) or (4,) for a multimodal rope's (P, 1, L)
    position_ids = torch.zeros(*leading, len(positions), length, dtype=torch.long, device=device)
    for slot, index in enumerate(range(group.start, group.stop)):
        keep = indices[indices.keep[index]]
        position_ids[..., slot, : keep.shape[0]] = positions[slot][..., 0, :].to(device)[..., keep]
    return position_ids


def hidden_key_rows(rows: Sequence[tuple[Row, int]], keys_per_image: int, device: torch.device) -> torch.Tensor:
    """Per image token of ``rows`` (each with its number of image tokens; rows in order, a row's images in order),
    which of its image's ``keys_per_image`` vision keys the row hides: ``(image tokens, keys_per_image)`` bool. A
    row's hidden keys index its sample's keys, image after image, and every row keeps all of its sample's image
    tokens (an image copy hides keys, not tokens): key ``k`` is key ``k mod K`` of the row's image ``k // K``."""
    blocks = []
    for row, count in rows:
        block = torch.zeros(count, keys_per_image, dtype=torch.bool)
        for key in row.hidden_keys:
            block[key // keys_per_image, key % keys_per_image] = True
        blocks.append(block)
    return torch.cat(blocks).to(device)


def vision_backward(
    layout: FastStepLayout,
    rows: Sequence[Row],
    features: PassFeatures,
    gradients: RowGradients,
    indices: GroupIndices,
) -> None:
    """The trained vision parameters' share of every row's gradient: the rows' gradients with respect to their
    feature leaves, scattered into the shared features' shape, pushed back through the vision graph in one vmapped
    backward per sample (over that sample's rows)."""
    traced, shared, leaves = features.traced, features.shared, features.leaves
    device = layout.model.get_input_embeddings().weight.device
    by_sample: dict[int, list[int]] = {}
    for index, row in enumerate(rows):
        if leaves[index] and any(leaves[index][k].grad is not None for k in traced):
            by_sample.setdefault(row.sample, []).append(index)
    for count, (sample, sample_rows) in enumerate(by_sample.items(), start=1):
        cotangents = [
            torch.zeros(len(sample_rows), *shared[k].shape, dtype=shared[k].dtype, device=device) for k in traced
        ]
        for slot, index in enumerate(sample_rows):
            for cotangent, k in zip(cotangents, traced, strict=True):
                if leaves[index][k].grad is not None:
                    cotangent[slot, features.indices[index]] = leaves[index][k].grad
        members, handle = indices.sample_rows[sample]
        row_index = indices[handle] if members == sample_rows else torch.tensor(sample_rows).to(device)
        retain = count < len(by_sample)
        gradients.add_through(
            [shared[k] for k in traced], layout.vision_parameters, row_index, cotangents, retain_graph=retain
        )


def variant_gradients(
    layout: FastStepLayout,
    samples: Sequence[SampleInputs],
    rows: list[Row],
    passes: Sequence[Pass],
    indices: GroupIndices,
) -> tuple[RowGradients, torch.Tensor]:
    """Every row's gradient of its mean answer cross-entropy (in a :class:`RowGradients`) and its summed loss.

    ``.grad`` is left as it was. The images are encoded once (:func:`encode_features`), then one forward and one
    backward per pass (:func:`run_pass`, ``passes`` of ``rows`` from :func:`~.pass_planning.plan_passes`, their
    indices staged in ``indices``), and the vision side's share of each row's gradient comes last
    (:func:`vision_backward`).
    """
    device = layout.model.get_input_embeddings().weight.device
    buffer_dtype = torch.promote_types(layout.parameters[0].dtype, torch.float32)
    gradients = RowGradients(layout.parameters, len(rows), buffer_dtype, device)
    features = encode_features(layout, samples, rows, indices)
    loss_sums = torch.zeros(len(rows), dtype=buffer_dtype, device=device)
    with grads_parked(layout.parameters), gradients.hook_linear_layers(layout.linear_modules):
        for forward, staged in zip(passes, indices.passes, strict=True):
            loss_sums[forward.rows] = run_pass(layout, samples, rows, forward, features, gradients, indices, staged)
    if features.traced:
        vision_backward(layout, rows, features, gradients, indices)
    return gradients, loss_sums
