"""How the fast step lays a micro-batch's variants out as rows of forward passes.

- :func:`plan_rows`: one :class:`Row` per variant (the original and each planned copy of a sample), as the positions
  of the sample it keeps; the samples that need the reference step instead;
- :func:`plan_passes`: the rows in pass order and the forward passes (:class:`Pass`), cut by :func:`group_lengths`,
  with the (original, text copy) pairs that share their prefix;
- :func:`default_max_tokens`: the automatic cap on a pass's padded tokens;
- :func:`buffer_groups`: the samples in groups whose per-copy gradient rows fit a memory budget.

The plan never changes a number, only how the work is cut. Pure torch.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .shared_prefix import PrefixPair
from .state import CurriculumState
from .types import IGNORE_INDEX, ORIGINAL, SampleInputs, StepConfig
from .variants import hidden_for, hidden_keys_for, kept_positions, planned_copies


@dataclass
class Row:
    """One variant of one sample, as a row of a forward pass: the sample's positions it keeps, in order, and the
    cross-attention vision keys it hides (an image copy of a model whose images are cross-attention keys)."""

    sample: int  # position in the micro-batch
    name: str  # ORIGINAL, "text" or "image"
    stride: int
    keep: torch.Tensor  # long, sorted positions of the sample's sequence
    hidden_keys: tuple[int, ...] = ()  # indices into the sample's vision keys


def needs_reference_step(sample: SampleInputs, hidden: Sequence[int]) -> bool:
    """True when a hidden token directly precedes an answer token (then dropping it would change a prediction)."""
    labels = sample.host_labels()
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
            hidden_keys = tuple(hidden_keys_for(sample.spans, modality, stride))
            sample_rows.append(Row(position, modality, stride, kept_positions(length, hidden), hidden_keys))
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
    for index, position in enumerate(keep.tolist()):
        if position != index:
            return index
    return len(keep)


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
    index maps, more passes) moves the break-even up; the measured pairs are in docs/benchmarks.md.
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


def default_max_tokens(samples: Sequence[SampleInputs], rows: Sequence[Row], device: torch.device) -> int:
    """``aimkp_fast_max_tokens: 0``: the micro-batch's own padded size (``len(samples)`` × its longest row), the size
    of plain SFT's forward. On an accelerator, at least as many rows as one sample has (its original and copies) at
    that length, so that a micro-batch of one or two samples runs a sample's rows as one pass instead of one pass per
    row: a pass of fewer tokens is barely cheaper there, since the accelerator is not yet busy. Not on a CPU,
    which is compute-bound, so that a padded pass of a sample's rows costs more than its rows one at a time
    (both measured in docs/benchmarks.md)."""
    together = max(Counter(row.sample for row in rows).values()) if device.type != "cpu" else 1
    return max(len(samples), together) * max(len(row.keep) for row in rows)


CPU_BUFFER_BYTES = 1024 * 2**20  # aimkp_fast_buffer_mb: auto off an accelerator (the earlier fixed default)


def buffer_budget(free_bytes: int, allocated_bytes: int) -> int:
    """``aimkp_fast_buffer_mb: auto`` on an accelerator: ``min(free / 2, allocated / 2)``. ``free``: the device's
    free memory; ``allocated``: what the model, its gradients and optimizer state hold when the step starts (before
    any pass). The other half of the free memory is left to the passes' activations, and the buffer adds at most half
    of what plain SFT already holds before its forward: with passes no larger than SFT's forward, the step's peak
    stays within 1.5× SFT's."""
    return max(min(free_bytes, allocated_bytes) // 2, 0)


def auto_buffer_bytes(device: torch.device) -> int:
    """The per-copy gradient buffer's budget for ``aimkp_fast_buffer_mb: auto`` on ``device``: on CUDA
    :func:`buffer_budget` of ``torch.cuda.mem_get_info`` and ``torch.cuda.memory_allocated`` now; elsewhere
    ``CPU_BUFFER_BYTES``."""
    if device.type != "cuda":
        return CPU_BUFFER_BYTES
    free, _ = torch.cuda.mem_get_info(device)
    return buffer_budget(free, torch.cuda.memory_allocated(device))


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
