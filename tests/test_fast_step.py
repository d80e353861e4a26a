"""The fast AimKP step against the reference step (itself checked against the spec's ground truth).

- One micro-batch in float64 on every tiny family: the same cosines, keep decisions, stride updates and ``.grad``
  of every trainable parameter (LoRA, a trained projector, a trained ``lm_head``; on LLaVA also with gradient
  checkpointing, and with the whole vision tower trained).
- ``llamafactory-cli train`` for 5 optimizer steps with ``aimkp_impl: fast`` and ``reference`` from the same seed
  (float32): the same adapter within 1e-5 relative and the same curriculum, at batch 1, batch 4 and gradient
  accumulation 2, on the tiny LLaVA and the tiny Qwen2-VL. The runs use SGD: the two paths sum in different orders,
  so their gradients differ by float32 rounding (about 1e-7 relative), and Adam divides each element by its own
  magnitude, which blows that rounding up for elements whose gradient is near Adam's ε (measured: 3e-5 after 5 steps).
"""

from __future__ import annotations

import dataclasses
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from aimkp_plugin.families import family_for
from aimkp_plugin.integration.batches import BatchSplitter
from aimkp_plugin.method.family_interface import FastStepUnsupportedError
from aimkp_plugin.method.fast_layout import fast_step_layout
from aimkp_plugin.method.fast_step import fast_batch_step
from aimkp_plugin.method.state import CurriculumState, ModalityState
from aimkp_plugin.method.step import reference_sample_step
from aimkp_plugin.method.types import StepConfig

from .helpers import (
    FAMILY_BY_NAME,
    FAMILY_INPUTS,
    aimkp_config,
    assert_same_adapter,
    images_of,
    llamafactory_batch,
    norms_in_input_dtype,
    paligemma_gemma_model,
    qwen3_5_moe_model,
    read_state,
    run_llamafactory,
    template_of,
)


BATCH = 4
STRIDES = [  # (text, image) per sample: both masked; frozen image; text only; image only at 8
    (ModalityState(2), ModalityState(2)),
    (ModalityState(3), ModalityState(4, frozen=True)),
    (ModalityState(4), ModalityState(1)),
    (ModalityState(1), ModalityState(8)),
]
# attention, MLP, Qwen3.5's Gated DeltaNet projections, LFM2's short-convolution projections and MLP (w1, w2, w3)
LANGUAGE_LINEAR = (
    r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj|in_proj\w*|out_proj|w1|w2|w3)"
)


def lora_model(
    path: Path, family: str, checkpointing: bool, vision: bool = False, dropout: float = 0.0
) -> torch.nn.Module:
    """LoRA (random A and B) on the language model's linear layers, a trained projector and lm_head; float64.

    ``vision``: the whole vision tower trains too (its per-copy gradients then come through the shared features; on
    Qwen3-VL also through the DeepStack features). ``dropout``: LoRA's dropout."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(
        path, dtype=torch.float64, attn_implementation="sdpa", experts_implementation="eager"
    )
    projector = family_for(model.config).projector.split(".")[-1]  # multi_modal_projector, merger
    config = LoraConfig(
        r=4, lora_alpha=8, lora_dropout=dropout, target_modules=LANGUAGE_LINEAR, init_lora_weights=False
    )
    config.modules_to_save = [projector, "lm_head"]
    model = get_peft_model(model, config)
    if vision:
        for name, parameter in model.named_parameters():
            if "vision_tower" in name or ".visual." in name:
                parameter.requires_grad = True
    norms_in_input_dtype(model)  # Gemma's float32 norms would round the two steps' float64 sums apart
    if checkpointing:  # as LLaMA-Factory's loader does: its wrapper checkpoints only layers with trained parameters
        from types import MethodType

        from llamafactory.model.model_utils.checkpointing import _gradient_checkpointing_enable

        base = model.get_base_model()
        base.gradient_checkpointing_enable = MethodType(_gradient_checkpointing_enable, base)
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
        model.enable_input_require_grads()
    return model.train()


def layout_of(model: torch.nn.Module):
    return fast_step_layout(model, family_for(model.config))


def fresh_state() -> CurriculumState:
    state = CurriculumState(BATCH, 1, [str(index) for index in range(BATCH)])
    for index, (text_state, image_state) in enumerate(STRIDES):
        state.set(index, "text", text_state)
        state.set(index, "image", image_state)
    return state


def run_reference(model, samples, config: StepConfig, tokens: float):
    model.zero_grad(set_to_none=True)
    parameters = [parameter for parameter in model.parameters() if parameter.requires_grad]
    state = fresh_state()
    family = family_for(model.config)
    mask, removal, keys = family.reference_mask_builder(model), family.token_removal(model), family.key_hiding(model)
    outcomes = [
        reference_sample_step(model, parameters, s, state, config, tokens, torch.bool, 0, mask, removal, keys)
        for s in samples
    ]
    return outcomes, state, [parameter.grad.clone() for parameter in parameters]


def run_fast(model, samples, config: StepConfig, tokens: float, **options):
    model.zero_grad(set_to_none=True)
    parameters = [parameter for parameter in model.parameters() if parameter.requires_grad]
    state = fresh_state()
    outcomes, left = fast_batch_step(layout_of(model), samples, state, dataclasses.replace(config, **options), tokens)
    return outcomes, left, state, [parameter.grad.clone() for parameter in parameters]


def summary(outcomes) -> list:
    return [(o.index, o.num_answer_tokens, [(c.modality, c.stride, c.kept) for c in o.copies]) for o in outcomes]


@pytest.fixture(
    scope="module",
    params=[
        *FAMILY_INPUTS,
        "llava-checkpointing",
        "qwen3_5-checkpointing",
        "lfm2_vl-checkpointing",
        "lfm2_vl-vision",
        "llava-vision",
        "llava-vision-checkpointing",
        "qwen3_vl-vision",
        "mistral3-vision",
        "qwen3_5-moe",
        "gemma3-window",
        "paligemma-window",
        "paligemma-gemma",
    ],
)
def case(request, tiny_models: dict, cmkp_workspace: Path, tmp_path_factory: pytest.TempPathFactory):
    family = request.param.split("-")[0]
    template, images = FAMILY_INPUTS[family]
    path = tiny_models[family]
    if request.param == "qwen3_5-moe":  # Qwen3.5's MoE sizes: the qwen3_5 family's second model type
        path = qwen3_5_moe_model(path, tmp_path_factory.mktemp("qwen3_5_moe") / "model")
    if request.param == "paligemma-gemma":  # PaliGemma (1): a Gemma text model, one mask for every layer
        path = paligemma_gemma_model(path, tmp_path_factory.mktemp("paligemma_gemma") / "model")
    batch, tokenizer = llamafactory_batch(
        path, template, cmkp_workspace, tmp_path_factory.mktemp(family), size=BATCH, images=images
    )
    batch = {key: value.double() if key == "pixel_values" else value for key, value in batch.items()}
    model = lora_model(path, family, checkpointing="checkpointing" in request.param, vision="vision" in request.param)
    if "window" in request.param:  # Gemma 2's and 3's sliding layers see 8 positions back: shorter than any sequence
        model.config.get_text_config().sliding_window = 8
    samples = BatchSplitter(model.config, tokenizer).split(batch, list(range(BATCH)))
    tokens = float(sum(sample.num_answer_tokens for sample in samples))
    # thresholds between observed cosines, so that some copies are kept and some dropped
    observed, _, _ = run_reference(model, samples, StepConfig(["text", "image"], {"text": 0.0, "image": 0.0}), tokens)
    cosines = {m: sorted(c.cosine for o in observed for c in o.copies if c.modality == m) for m in ("text", "image")}
    thresholds = {modality: (values[0] + values[1]) / 2 for modality, values in cosines.items()}
    return model, samples, StepConfig(["text", "image"], thresholds), tokens


@pytest.mark.e2e
def test_fast_step_equals_the_reference_step(case) -> None:
    model, samples, config, tokens = case
    expected, expected_state, expected_grads = run_reference(model, samples, config, tokens)
    outcomes, left, state, grads = run_fast(model, samples, config, tokens)

    assert left == []
    assert summary(outcomes) == summary(expected)
    assert any(not c.kept for o in outcomes for c in o.copies) and any(c.kept for o in outcomes for c in o.copies)
    for fast, reference in zip(outcomes, expected, strict=True):
        assert [c.cosine for c in fast.copies] == pytest.approx([c.cosine for c in reference.copies], abs=1e-10)
        assert fast.original_loss_sum == pytest.approx(reference.original_loss_sum, rel=1e-10)
        assert fast.updates == reference.updates
    assert state.to_dict() == expected_state.to_dict()
    names = [name for name, parameter in model.named_parameters() if parameter.requires_grad]
    projector = family_for(model.config).projector.split(".")[-1]
    assert any(projector in n for n in names) and any("lm_head" in n for n in names)
    for name, fast_grad, reference_grad in zip(names, grads, expected_grads, strict=True):
        torch.testing.assert_close(fast_grad, reference_grad, rtol=1e-9, atol=1e-13, msg=name)


@pytest.mark.e2e
def test_fast_step_adds_to_the_gradient_already_there(case) -> None:
    """Gradient accumulation: a later micro-batch adds its share to what earlier ones left in ``.grad``."""
    model, samples, config, tokens = case
    _, _, _, expected = run_fast(model, samples, config, tokens)
    parameters = [parameter for parameter in model.parameters() if parameter.requires_grad]
    for parameter in parameters:
        parameter.grad = torch.ones_like(parameter)
    fast_batch_step(layout_of(model), samples, fresh_state(), config, tokens)
    for parameter, single in zip(parameters, expected, strict=True):
        torch.testing.assert_close(parameter.grad, single + 1, rtol=1e-9, atol=1e-13)


@pytest.mark.e2e
def test_one_row_per_forward_gives_the_same_result(case) -> None:
    """The grouping of rows into forward passes (padding, batching) does not change a number."""
    model, samples, config, tokens = case
    _, _, _, batched = run_fast(model, samples, config, tokens)
    _, _, _, one_by_one = run_fast(model, samples, config, tokens, max_tokens_per_forward=1)
    for first, second in zip(batched, one_by_one, strict=True):
        torch.testing.assert_close(first, second, rtol=1e-9, atol=1e-13)


@pytest.mark.e2e
def test_gradient_checkpointing_stays_on_during_the_fast_step(case, request) -> None:
    """Under LLaMA-Factory's reentrant checkpointing every decoder layer runs twice per pass (a forward without grad,
    then the recomputation in the backward): the step must not make the layers look frozen to its wrapper, which
    would then keep every activation."""
    if "checkpointing" not in request.node.callspec.id:
        pytest.skip("the gradient-checkpointing case")
    model, samples, config, tokens = case
    layer = layout_of(model).model.model.language_model.layers[0]
    calls = {True: 0, False: 0}

    def count(*_: object) -> None:
        calls[torch.is_grad_enabled()] += 1

    handle = layer.register_forward_pre_hook(count)
    try:
        run_fast(model, samples, config, tokens)
    finally:
        handle.remove()
    assert calls[False] >= 1 and calls[True] == calls[False], calls


@pytest.mark.e2e
def test_shared_prefix_gives_the_same_result(case, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each original and its text copy with their shared prefix computed once per decoder layer (packed rows, two
    backward products): the same cosines and ``.grad`` as the rows apart, in float64, on every family (with and
    without gradient checkpointing, a trained vision tower, Qwen3-VL's DeepStack features, Gemma 3's windows)."""
    from aimkp_plugin.method import fast_step

    packed: list[int] = []
    sharing = fast_step.sharing_prefixes

    def counted(layers, plan, gradients):
        packed.append(plan.packed_rows)
        return sharing(layers, plan, gradients)

    monkeypatch.setattr(fast_step, "sharing_prefixes", counted)
    model, samples, config, tokens = case
    family = layout_of(model).family
    if family.removes_hidden_tokens or family.cross_attention_images:  # linear attention reads the sequence in
        # order: no tree mask; Mllama's cross-attention layers take per-row keys and masks that are not packed
        reason = "mixes them outside attention" if family.removes_hidden_tokens else "per-row vision keys"
        with pytest.raises(FastStepUnsupportedError, match=reason):
            run_fast(model, samples, config, tokens, share_prefix=True)
        assert packed == []
        return
    apart, _, _, apart_grads = run_fast(model, samples, config, tokens, share_prefix=False)
    assert packed == []
    outcomes, left, _, grads = run_fast(model, samples, config, tokens, share_prefix=True)
    assert left == [] and summary(outcomes) == summary(apart)
    texts = sum(1 for outcome in outcomes for copy in outcome.copies if copy.modality == "text")
    assert texts and sum(packed) >= texts  # every text copy ran packed with its original
    for shared, rows_apart in zip(outcomes, apart, strict=True):
        assert [c.cosine for c in shared.copies] == pytest.approx([c.cosine for c in rows_apart.copies], abs=1e-12)
        assert shared.original_loss_sum == pytest.approx(rows_apart.original_loss_sum, rel=1e-12)
    for first, second in zip(grads, apart_grads, strict=True):
        torch.testing.assert_close(first, second, rtol=1e-11, atol=1e-14)


def test_shared_prefix_is_left_out_with_dropout(tiny_models: dict, cmkp_workspace: Path, tmp_path: Path) -> None:
    """With LoRA dropout the original and its text copy would share the prefix's dropout masks: auto keeps the rows
    apart, and an explicit request stops with the dropout named and the fix."""
    from aimkp_plugin.method import fast_step

    template, images = FAMILY_INPUTS["llava"]
    batch, tokenizer = llamafactory_batch(tiny_models["llava"], template, cmkp_workspace, tmp_path, BATCH, images)
    batch = {key: value.double() if key == "pixel_values" else value for key, value in batch.items()}
    model = lora_model(tiny_models["llava"], "llava", checkpointing=False, dropout=0.3)
    layout = layout_of(model)
    assert layout.dropout is not None and "Dropout 0.3" in layout.dropout
    samples = BatchSplitter(model.config, tokenizer).split(batch, list(range(BATCH)))
    tokens = float(sum(sample.num_answer_tokens for sample in samples))
    config = StepConfig(["text", "image"], {"text": -1, "image": -1})
    packed = []
    original = fast_step.PackedPass.__init__

    def counted(self, *args, **kwargs):
        packed.append(1)
        original(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fast_step.PackedPass, "__init__", counted)
        run_fast(model, samples, config, tokens)
    assert packed == []
    with pytest.raises(FastStepUnsupportedError, match=r"aimkp_fast_share_prefix: true needs decoder layers without"):
        run_fast(model, samples, config, tokens, share_prefix=True)
    assert layout_of(lora_model(tiny_models["llava"], "llava", checkpointing=False)).dropout is None


def test_packed_pass_maps_rows_and_masks() -> None:
    """The packed layout of one pair (original of 6 tokens, text copy of 5 sharing 3) and one unpaired row of 4: the
    hidden states round-trip, the prefix's output reaches both rows, each suffix sees the prefix and itself only, and
    each product's input gradient goes to its own row."""
    from aimkp_plugin.method.shared_prefix import PackedPass, PrefixPair

    lengths, length = [6, 5, 4], 6
    plan = PackedPass([PrefixPair(0, 1, 3, 6, 5)], lengths, length, [10, 11, 12])
    assert (plan.packed_rows, plan.packed_length) == (2, 8)
    assert plan.buffer_rows[0].tolist() == [10, 12] and plan.buffer_rows[1].tolist() == [11, 12]
    hidden = torch.arange(3 * length, dtype=torch.float64).reshape(3, length, 1)
    hidden[1, :3] = hidden[0, :3]  # the shared prefix
    packed = plan.pack(hidden)
    assert packed[0, :, 0].tolist() == [0, 1, 2, 3, 4, 5, 9, 10]  # prefix, original suffix, text suffix
    assert packed[1, :4, 0].tolist() == [12, 13, 14, 15]
    real = plan.real[..., None]
    torch.testing.assert_close(plan.unpack(packed) * real, hidden * real)
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    mask = (causal & plan.real[:, None, :])[:, None]
    cpu = torch.device("cpu")
    packed_mask = plan.pack_mask(mask, cpu)
    allowed = packed_mask[0, 0]
    assert allowed[7].tolist() == [True, True, True, False, False, False, True, True]  # text suffix: prefix + own
    assert allowed[5].tolist() == [True] * 6 + [False, False]  # original suffix: prefix + own
    assert packed_mask[1, 0, 3].tolist() == [True] * 4 + [False] * 4  # the unpaired row as it was
    assert torch.equal(plan.pack_mask(None, cpu), packed_mask)
    additive = torch.zeros(mask.shape, dtype=torch.float64).masked_fill(~mask, torch.finfo(torch.float64).min)
    assert torch.equal(plan.pack_mask(additive, cpu) == 0, packed_mask)
    gradient = torch.randn(3, length, 1, dtype=torch.float64)
    products = [plan.cotangent(gradient, 0), plan.cotangent(gradient, 1)]
    assert products[1][0, 3:6].abs().sum() == 0 and products[0][0, 6:].abs().sum() == 0
    torch.testing.assert_close(products[1][0, :3], gradient[1, :3])
    back = plan.input_gradient(products)
    torch.testing.assert_close(back, gradient * real)


def test_rows_are_split_into_the_passes_that_pad_least() -> None:
    """The pass plan: every row once, in order; no pass over the cap unless it is one row; a sample's three rows in
    one pass at batch 1 on an accelerator (the default cap), one row per pass on a CPU; short image copies apart from
    the originals when that pads less."""
    from aimkp_plugin.method.pass_planning import Row, default_max_tokens, group_lengths

    def rows(lengths: list[int]) -> list[Row]:
        return [Row(index // 3, "copy", 2, torch.arange(length)) for index, length in enumerate(lengths)]

    def split(lengths: list[int], cap: int) -> list[list[int]]:
        passes = group_lengths(lengths, cap)
        assert [index for part in passes for index in range(part.start, part.stop)] == list(range(len(lengths)))
        for part in passes:
            assert part.stop - part.start == 1 or (part.stop - part.start) * lengths[part.start] <= cap
        return [lengths[part] for part in passes]

    one_sample = [737, 710, 305]
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    cap = default_max_tokens([None], rows(one_sample), cuda)  # type: ignore[list-item]
    assert cap == 3 * 737 and split(one_sample, cap) == [[737, 710, 305]]
    assert default_max_tokens([None], rows(one_sample), cpu) == 737  # type: ignore[list-item]
    assert default_max_tokens([None] * 8, rows(one_sample), cuda) == 8 * 737  # type: ignore[list-item]
    assert split(one_sample, 737) == [[737], [710], [305]]
    two_samples = [737, 731, 710, 704, 305, 299]
    assert split(two_samples, 8 * 737) == [[737, 731, 710, 704], [305, 299]]
    assert split(two_samples, 2 * 737) == [[737, 731], [710, 704], [305, 299]]
    assert split(two_samples, 1) == [[length] for length in two_samples]
    assert group_lengths([], 100) == []


def test_pairs_share_passes_of_their_own() -> None:
    """With the shared prefix, a sample's original and text copy are adjacent units of their packed length, in passes
    without other rows, when the prefix is over the given share of the pair's tokens; without, the plan is the plain
    longest-first split."""
    from aimkp_plugin.method.pass_planning import AUTO_SHARE_FROM, Row, plan_passes

    def sample(index: int, length: int, hidden_at: int) -> list[Row]:
        text = torch.cat([torch.arange(hidden_at), torch.arange(hidden_at + 1, length)])
        image = torch.arange(length // 3)
        return [
            Row(index, "original", 1, torch.arange(length)),
            Row(index, "text", 2, text),
            Row(index, "image", 2, image),
        ]

    rows = sample(0, 700, 640) + sample(1, 720, 650) + sample(2, 100, 30)
    ordered, passes = plan_passes(rows, 2 * 800, AUTO_SHARE_FROM)
    assert [(row.sample, row.name, len(row.keep)) for row in ordered] == [
        (1, "original", 720),
        (1, "text", 719),
        (0, "original", 700),
        (0, "text", 699),
        (1, "image", 240),
        (0, "image", 233),
        (2, "original", 100),
        (2, "text", 99),  # a prefix of 30 of 199 tokens (under 0.4 of them): apart
        (2, "image", 33),
    ]
    assert [(part.rows.start, part.rows.stop) for part in passes] == [(0, 4), (4, 6), (6, 9)]
    assert [(pair.original, pair.text, pair.prefix, pair.packed_length) for pair in passes[0].pairs] == [
        (0, 1, 650, 720 + 69),
        (2, 3, 640, 700 + 59),
    ]
    assert passes[1].pairs == passes[2].pairs == []
    ordered, passes = plan_passes(rows, 2 * 800, 0.0)  # every pair
    assert [(pair.prefix, pair.packed_length) for part in passes for pair in part.pairs][-1] == (30, 169)
    ordered, passes = plan_passes(rows, 2 * 800, None)
    assert [len(row.keep) for row in ordered] == [720, 719, 700, 699, 240, 233, 100, 99, 33]
    assert all(part.pairs == [] for part in passes)


@pytest.mark.e2e
def test_buffer_budget_of_one_sample_per_group_gives_the_same_result(case) -> None:
    """``max_buffer_bytes`` small enough for one sample's copies: the micro-batch is trained in 4 groups, each group's
    share added to ``.grad`` before the next; cosines, decisions, states and ``.grad`` are those of one group."""
    from aimkp_plugin.method.pass_planning import (
        CPU_BUFFER_BYTES,
        auto_buffer_bytes,
        buffer_budget,
        buffer_groups,
        plan_rows,
    )
    from aimkp_plugin.method.types import AUTO_BUFFER

    model, samples, config, tokens = case
    layout = layout_of(model)
    rows, _ = plan_rows(samples, fresh_state(), config)
    row_bytes = sum(parameter.numel() for parameter in layout.parameters) * 8  # float64
    assert buffer_groups(rows, row_bytes, 3 * row_bytes) == [[0], [1], [2], [3]]
    assert buffer_groups(rows, row_bytes, None) == [[0, 1, 2, 3]]
    assert auto_buffer_bytes(torch.device("cpu")) == CPU_BUFFER_BYTES  # aimkp_fast_buffer_mb: auto on a CPU
    assert buffer_budget(free_bytes=10 * 2**30, allocated_bytes=4 * 2**30) == 2 * 2**30  # half the model's state
    assert buffer_budget(free_bytes=2**30, allocated_bytes=4 * 2**30) == 2**29  # half the free memory
    expected, _, expected_state, expected_grads = run_fast(model, samples, config, tokens)
    automatic = run_fast(model, samples, config, tokens, max_buffer_bytes=AUTO_BUFFER)
    assert summary(automatic[0]) == summary(expected) and automatic[2].to_dict() == expected_state.to_dict()
    for auto, whole in zip(automatic[3], expected_grads, strict=True):
        torch.testing.assert_close(auto, whole, rtol=0, atol=0)
    outcomes, left, state, grads = run_fast(model, samples, config, tokens, max_buffer_bytes=3 * row_bytes)
    assert left == [] and summary(outcomes) == summary(expected) and state.to_dict() == expected_state.to_dict()
    for fast, one_group in zip(outcomes, expected, strict=True):
        assert [c.cosine for c in fast.copies] == pytest.approx([c.cosine for c in one_group.copies], abs=1e-12)
    for grouped, whole in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(grouped, whole, rtol=1e-9, atol=1e-13)


@pytest.mark.e2e
def test_hidden_token_before_the_answer_goes_to_the_reference_step(case) -> None:
    """When the text span runs up to the answer, the reference predicts the first answer token from a hidden token;
    the fast step hands such a sample to the reference step, and the sum is still the all-reference result. Where
    hidden tokens are removed (Qwen3.5), both steps predict it from the kept token before, and the fast step keeps
    the sample."""
    model, samples, config, tokens = case
    labels = samples[0].labels[0].tolist()
    answer_start = next(index for index, label in enumerate(labels) if label != -100)
    start = samples[0].spans.text[0]
    start += (answer_start - start) % 2 == 0  # an odd length: at stride 2 the span's last token is hidden
    changed = [replace(samples[0], spans=replace(samples[0].spans, text=list(range(start, answer_start))))]
    changed += samples[1:]
    _, _, expected_grads = run_reference(model, changed, config, tokens)

    outcomes, left, state, _ = run_fast(model, changed, config, tokens)
    parameters = [parameter for parameter in model.parameters() if parameter.requires_grad]
    family = family_for(model.config)
    if family.removes_hidden_tokens:
        assert left == [] and [outcome.index for outcome in outcomes] == [0, 1, 2, 3]
    else:
        assert left == [0] and [outcome.index for outcome in outcomes] == [1, 2, 3]
        mask = family.reference_mask_builder(model)
        keys = family.key_hiding(model)
        reference_sample_step(model, parameters, changed[0], state, config, tokens, torch.bool, 0, mask, None, keys)
    for parameter, expected in zip(parameters, expected_grads, strict=True):
        torch.testing.assert_close(parameter.grad, expected, rtol=1e-9, atol=1e-13)


def test_uncovered_trainable_parameters_are_named(tiny_models: dict) -> None:
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(tiny_models["llava"])
    for name, parameter in model.named_parameters():
        parameter.requires_grad = name.endswith("norm.weight") and "language_model" in name
    with pytest.raises(FastStepUnsupportedError, match=r"language_model\.layers\.0\.input_layernorm \(LlamaRMSNorm\)"):
        layout_of(model)


def test_trained_moe_experts_and_router_are_named_as_uncovered(tiny_models: dict) -> None:
    """Fused 3-D expert weights and a bare router weight have no per-copy rule in the fast step: a run that trains
    them is told so (and takes the reference step), never silently inexact."""
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(tiny_models["qwen3_vl_moe"])
    for name, parameter in model.named_parameters():
        parameter.requires_grad = ".mlp." in name and "language_model.layers.0." in name
    with pytest.raises(FastStepUnsupportedError, match=r"layers\.0\.mlp\.(experts|gate) \(Qwen3VLMoeText"):
        layout_of(model)


def test_llama4_trained_experts_and_router_are_named_as_uncovered(tiny_models: dict) -> None:
    """Llama 4's fused expert weights have no per-copy rule, and its router is a subclass of Linear (not a Linear, so
    not hooked as one): a run that trains them is told so and takes the reference step."""
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(tiny_models["llama4"])
    for name, parameter in model.named_parameters():
        parameter.requires_grad = "layers.1.feed_forward." in name and ("experts" in name or "router" in name)
    uncovered = r"feed_forward\.experts \(Llama4TextExperts\), .*feed_forward\.router \(Llama4Router\)"
    with pytest.raises(FastStepUnsupportedError, match=uncovered):
        layout_of(model)


def test_flattened_linear_inputs_are_read_per_row_and_a_subset_of_tokens_is_refused() -> None:
    """A Linear layer fed every token of every row flattened row by row (an MoE block's shared expert) gets each row's
    exact gradient; one fed a subset of the tokens (a routed expert's) stops with the reason, never attributed
    silently."""
    from aimkp_plugin.method.row_gradients import RowGradients

    torch.manual_seed(0)
    layer = torch.nn.Linear(3, 2).double()
    inputs = torch.randn(2, 5, 3, dtype=torch.float64)
    expected = []
    for row in range(2):
        weight, bias = torch.autograd.grad((layer(inputs[row]) ** 2).sum(), [layer.weight, layer.bias])
        expected.append(torch.cat([weight.reshape(-1), bias]))
    gradients = RowGradients(list(layer.parameters()), 2, torch.float64, torch.device("cpu"))
    gradients.rows, gradients.tokens = slice(0, 2), 5
    with gradients.hook_linear_layers([layer]):
        (layer(inputs.reshape(-1, 3)) ** 2).sum().backward()
        torch.testing.assert_close(gradients.flat, torch.stack(expected), rtol=1e-12, atol=1e-14)
        with pytest.raises(RuntimeError, match="only a layer that sees every row"):
            (layer(inputs[1, :4]) ** 2).sum().backward()  # four tokens, all of row 1


TRAINING_SETUPS = {"batch1": (1, 1), "batch4": (4, 1), "accumulation2": (2, 2), "qlora4": (4, 1), "qlora8": (4, 1)}
QUANTIZED_SETUPS = {"qlora4": 4, "qlora8": 8}  # QLoRA: the base model quantized on the fly by bitsandbytes


# every setup on four layouts (LLaVA's square grid, Qwen2-VL's m-rope, InternVL's tiles, Gemma 3's bidirectional image
# blocks); batch 4 (padded rows, accumulation of a whole micro-batch) on every other family: the trainer's batching
# and accumulation do not depend on the family, whose fast step the tests above check against the reference in
# process; batch 4 of every family is in the compat subset (make test-compat)
FIVE_STEP_RUNS = [
    pytest.param(family, setup, marks=[pytest.mark.compat] if setup == "batch4" else [])
    for family in FAMILY_INPUTS
    if family != "qwen2_5_vl"
    for setup in (TRAINING_SETUPS if family in ("llava", "qwen2_vl", "internvl", "gemma3") else ["batch4"])
    if setup not in QUANTIZED_SETUPS
] + [("llava", setup) for setup in QUANTIZED_SETUPS]


@pytest.mark.e2e
@pytest.mark.parametrize(("family", "setup"), FIVE_STEP_RUNS)
def test_five_optimizer_steps_match_the_reference(
    family: str, setup: str, tiny_models: dict, cmkp_workspace: Path, tmp_path: Path
) -> None:
    batch, accumulation = TRAINING_SETUPS[setup]
    outputs = {impl: tmp_path / impl for impl in ("reference", "fast")}

    def train(impl: str) -> subprocess.CompletedProcess:
        config = aimkp_config(
            tiny_models[family],
            FAMILY_INPUTS[family][0],
            cmkp_workspace,
            outputs[impl],
            media_dir=str(cmkp_workspace / FAMILY_INPUTS[family][1]),
            aimkp_impl=impl,
            aimkp_init_stride=2,
            max_samples=2 * batch * accumulation,
            per_device_train_batch_size=batch,
            gradient_accumulation_steps=accumulation,
            save_strategy="no",
            aimkp_image_threshold=0.9,
            optim="sgd",
            learning_rate=0.05,
        )
        config["max_steps"] = 5
        if setup in QUANTIZED_SETUPS:
            config["quantization_bit"] = QUANTIZED_SETUPS[setup]
        if setup == "batch1":  # the rows apart; elsewhere the CPU default, the shared prefix
            config["aimkp_fast_share_prefix"] = False
        return run_llamafactory(config, tmp_path / f"{impl}_config", OMP_NUM_THREADS="1")

    with ThreadPoolExecutor(max_workers=2) as pool:  # both runs side by side, one thread each
        results = dict(zip(outputs, pool.map(train, outputs), strict=True))
    for result in results.values():
        assert result.returncode == 0, result.stdout[-4000:]
    assert "reference step runs instead" not in results["fast"].stdout
    if setup in QUANTIZED_SETUPS:  # the frozen base weights quantized in both steps; LoRA and lm_head train
        for result in results.values():
            assert f"Quantizing model to {QUANTIZED_SETUPS[setup]} bit with bitsandbytes." in result.stdout
    shared = "computed per copy, aimkp_fast_share_prefix: False" if setup == "batch1" else "computed once"
    if FAMILY_BY_NAME[family].removes_hidden_tokens or FAMILY_BY_NAME[family].cross_attention_images:
        shared = "computed per copy"
    assert f"the text copies' shared prefix {shared}" in results["fast"].stdout
    assert_same_adapter(outputs["reference"], outputs["fast"], rtol=1e-5)
    reference_state, fast_state = read_state(outputs["reference"]), read_state(outputs["fast"])
    assert fast_state == reference_state


@pytest.mark.e2e
def test_run_with_uncovered_parameters_warns_and_trains_with_the_reference(
    tiny_models: dict, cmkp_workspace: Path, tmp_path: Path, llamafactory_runner
) -> None:
    config = aimkp_config(
        tiny_models["llava"], "llava", cmkp_workspace, tmp_path / "out", additional_target="lm_head,embed_tokens"
    )
    config.update(max_steps=2, save_strategy="no", max_samples=4)
    result = llamafactory_runner(config)
    assert result.returncode == 0, result.stdout[-4000:]
    assert "aimkp_impl: fast cannot run this model" in result.stdout
    assert "embed_tokens" in result.stdout and "the reference step runs instead" in result.stdout
    assert read_state(tmp_path / "out")["text_stride"]


@pytest.mark.e2e
@pytest.mark.parametrize("family", ["qwen3_vl_moe", "qwen3_5_moe"])
def test_plain_sft_loss_of_the_moe_families_has_no_router_term(
    family: str, tiny_models: dict, cmkp_workspace: Path, tmp_path: Path
) -> None:
    """The MoE families' router auxiliary loss is left out of the AimKP step because plain SFT leaves it out too:
    with the config's ``output_router_logits`` on and a large ``router_aux_loss_coef`` (what LLaMA-Factory's
    ``moe_aux_loss_coef`` sets where it sets anything), the forward call LLaMA-Factory's trainer makes returns the
    answer cross-entropy alone; only a call that asks for router logits adds the term. Should transformers add it by
    default one day, this test fails, and the AimKP step must add it as plain SFT would."""
    from transformers import AutoModelForImageTextToText

    base = "qwen3_5" if family == "qwen3_5_moe" else family
    path = tiny_models[base] if base == family else qwen3_5_moe_model(tiny_models[base], tmp_path / "moe")
    batch, _ = llamafactory_batch(path, template_of(base), cmkp_workspace, tmp_path, size=2, images=images_of(base))
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float64, experts_implementation="eager")
    text_config = model.config.get_text_config()
    text_config.output_router_logits, text_config.router_aux_loss_coef = True, 0.5
    inputs = {key: value.double() if key == "pixel_values" else value for key, value in batch.items()}
    labels = inputs.pop("labels")
    with torch.no_grad():
        output = model(**inputs, labels=labels)
        asked = model(**inputs, labels=labels, output_router_logits=True).loss
    cross_entropy = torch.nn.functional.cross_entropy(
        output.logits[:, :-1].reshape(-1, output.logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100
    )
    assert float(output.loss) == pytest.approx(float(cross_entropy), rel=1e-6)
    assert float(asked) - float(cross_entropy) > 1e-3  # the term exists, when asked for


@pytest.mark.e2e
def test_llama4_loss_has_no_router_term_even_when_asked(
    tiny_models: dict, cmkp_workspace: Path, tmp_path: Path
) -> None:
    """Llama 4's forward never adds a router auxiliary loss (what LLaMA-Factory's ``moe_aux_loss_coef`` sets for it
    are config flags only): plain SFT trains on the answer cross-entropy alone, so AimKP leaves the router term out
    too. Should transformers add one, this test fails, and the AimKP step must add it as plain SFT would."""
    from transformers import AutoModelForImageTextToText

    batch, _ = llamafactory_batch(
        tiny_models["llama4"], template_of("llama4"), cmkp_workspace, tmp_path, size=2, images=images_of("llama4")
    )
    model = AutoModelForImageTextToText.from_pretrained(tiny_models["llama4"], dtype=torch.float64)
    text_config = model.config.get_text_config()
    text_config.output_router_logits, text_config.router_aux_loss_coef = True, 0.5
    inputs = {key: value.double() if key == "pixel_values" else value for key, value in batch.items()}
    labels = inputs.pop("labels")
    with torch.no_grad():
        output = model(**inputs, labels=labels)
        asked = model(**inputs, labels=labels, output_router_logits=True).loss
    cross_entropy = torch.nn.functional.cross_entropy(
        output.logits[:, :-1].reshape(-1, output.logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100
    )
    assert float(output.loss) == pytest.approx(float(cross_entropy), rel=1e-12)
    assert float(asked) == pytest.approx(float(cross_entropy), rel=1e-12)


def test_staged_indices_come_back_on_the_device_as_they_were_laid_out() -> None:
    from aimkp_plugin.method.staging import StagedIndices

    staged = StagedIndices()
    flat, rows, shaped = staged.add([3, 1, 2]), staged.add([[1, 2], [3, 4]]), staged.add(list(range(6)), (3, 1, 2))
    empty = staged.add([])
    with pytest.raises(RuntimeError, match="read before send"):
        staged[flat]
    with pytest.raises(ValueError, match="do not fill the shape"):
        staged.add([1, 2, 3], (2, 2))
    staged.send(torch.device("cpu"))
    assert staged[flat].tolist() == [3, 1, 2] and staged[rows].tolist() == [[1, 2], [3, 4]]
    assert torch.equal(staged[shaped], torch.arange(6).view(3, 1, 2)) and staged[empty].shape == (0,)
    with pytest.raises(RuntimeError, match="add after send"):
        staged.add([1])


@pytest.mark.parametrize("leading", [(), (3,)])
def test_position_ids_gathered_on_the_device_equal_those_laid_out_on_the_host(leading: tuple[int, ...]) -> None:
    """The fast step lays a pass's position ids out on the host when the samples' are there, and gathers them on the
    device otherwise (a multimodal rope computed on the accelerator): both give the same tensor."""
    from aimkp_plugin.method.fast_step import GroupIndices, PassIndices, host_position_ids, pass_position_ids
    from aimkp_plugin.method.pass_planning import Row
    from aimkp_plugin.method.staging import StagedIndices

    torch.manual_seed(0)
    tables = [torch.randint(0, 50, (*leading, 1, length)) for length in (9, 7)]  # two samples' position ids

    rows = [Row(0, "original", 1, torch.arange(9)), Row(1, "text", 2, torch.tensor([0, 2, 3, 6])),
            Row(0, "image", 2, torch.tensor([1, 4, 5, 8]))]  # fmt: skip
    staged = StagedIndices()
    ids = staged.add([[0] * 9] * 3)
    keeps = [row.keep.tolist() for row in rows]
    host = staged.add(host_position_ids(tables[:1] + tables[1:2] + tables[:1], keeps, 9), (*leading, 3, 9))
    keep = [staged.add(row.keep.tolist()) for row in rows]
    staged.send(torch.device("cpu"))
    indices = GroupIndices(staged, [], keep, [], [], 0, {}, (0, 0), [])
    cpu = torch.device("cpu")
    on_host, on_device = (
        pass_position_ids(rows, slice(0, 3), indices, PassIndices(ids, 0, 0, 0, 0, *at), cpu)
        for at in ((host, None), (None, [tables[0], tables[1], tables[0]]))  # laid out on the host; on the device
    )
    assert on_host.shape == (*leading, 3, 9) and torch.equal(on_host, on_device)
    assert on_host[..., 1, :4].tolist() == tables[1][..., 0, [0, 2, 3, 6]].tolist()
