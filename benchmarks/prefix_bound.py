"""How much sharing the text copy's prefix could save at most: the fast step's time less one forward pass of every
text copy's shared prefix, against plain SFT.

    python benchmarks/prefix_bound.py [--model llava-576] [--batch 4] [--stride 2] [--repeats 5] [--device cpu|cuda]
                                      [--bf16] [--out FILE]

The text copy of a sample equals its original up to the first hidden text token: the system prompt, the image tokens
and the post text before it (its *prefix*). Sharing that prefix means computing its forward pass once for both rows.
The backward pass through the prefix cannot be shared when the step is exact: the two rows' losses send different
output gradients into the prefix, and the cosine between the rows' gradients needs each row's gradient over the
prefix's tokens apart, so each row still runs the backward through the prefix (and, under LLaMA-Factory's reentrant
gradient checkpointing, the recomputed forward that backward needs, which a checkpointed layer cannot keep between two
backward passes). What sharing can remove is therefore at most one forward pass of each text copy's prefix, without
gradient: this script times exactly that pass (the language model on the text rows cut to their prefixes, one padded
pass, as the fast step batches rows), next to the fast step and plain SFT on the same model and batch, interleaved,
median of ``--repeats``. ``fast_less_prefix_over_sft`` is the best fast / plain SFT that any exact prefix sharing can
reach (lower still would need to skip work that the exact per-row gradients need).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch


sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_cost import MODELS, StepBench, build, emit_report  # noqa: E402


def shared_prefix_length(keep: torch.Tensor) -> int:
    """How many leading positions a copy keeps unchanged (the first position it drops, or its whole length)."""
    dropped = (keep != torch.arange(len(keep))).nonzero()
    return int(dropped[0]) if len(dropped) else len(keep)


def prefix_forward(bench: StepBench, stride: int) -> tuple[Callable[[], None], list[int], list[int]]:
    """A no-grad forward of the language model over every text copy's shared prefix, one padded pass; and the
    prefix and text-row lengths."""
    from aimkp_plugin.method.fast_step import Row, padded_inputs, plan_rows

    rows, _ = plan_rows(bench.samples, bench.state_at(stride), bench.config)
    text_rows = [row for row in rows if row.name == "text"]
    prefixes = [shared_prefix_length(row.keep) for row in text_rows]
    cut = [
        Row(row.sample, row.name, row.stride, row.keep[:length])
        for row, length in zip(text_rows, prefixes, strict=True)
    ]
    family, model = bench.layout.family, bench.layout.model
    input_ids, _, attention_mask, position_ids = padded_inputs(family, bench.samples, cut, torch.device(bench.device))
    image_mask = input_ids == family.image_token_id(model.config)
    no_logits = torch.zeros(0, dtype=torch.long, device=input_ids.device)  # a prefix predicts no answer token

    def run() -> None:
        with torch.no_grad(), bench.autocast():
            embeds = model.get_input_embeddings()(input_ids)  # image tokens keep their embedding: same arithmetic
            family.language_logits(model, embeds, attention_mask, position_ids, image_mask, [], no_logits)
        if bench.device == "cuda":
            torch.cuda.synchronize()

    return run, prefixes, [len(row.keep) for row in text_rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llava-576", choices=sorted(MODELS))
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--stride", type=int, default=2, help="γ of every sample, text and image alike")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--bf16", action="store_true", help="bf16 compute (as LLaMA-Factory's bf16: true)")
    parser.add_argument("--out", default=None, help="also write the JSON result to this file")
    options = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as workdir:
        model, batch, tokenizer = build(Path(workdir), options.model, options.batch, options.device, options.bf16)
    bench = StepBench(model, batch, tokenizer, options.batch, options.device, options.bf16)
    steps = bench.steps(options.stride)
    prefix_run, prefixes, text_lengths = prefix_forward(bench, options.stride)
    timed = {"plain_sft": steps["plain_sft"], "fast": steps["fast"], "text_prefix_forward": prefix_run}
    seconds: dict[str, list[float]] = {name: [] for name in timed}
    for step in timed.values():  # warm-up
        step()
    for _ in range(options.repeats):
        for name, step in timed.items():
            began = time.perf_counter()
            step()
            seconds[name].append(time.perf_counter() - began)
    median = {name: statistics.median(values) for name, values in seconds.items()}
    emit_report(
        {
            "model": f"tiny {options.model} (hidden 64, 2 layers), LoRA r8 on all linear layers + trained projector, "
            "gradient checkpointing on",
            "device": torch.cuda.get_device_name() if options.device == "cuda" else "cpu",
            "dtype": "bfloat16" if options.bf16 else "float32",
            "threads": torch.get_num_threads(),
            "batch": options.batch,
            "stride": options.stride,
            "sequence_lengths": [int(sample.model_inputs["input_ids"].shape[1]) for sample in bench.samples],
            "text_copy_lengths": text_lengths,
            "text_copy_shared_prefix_lengths": prefixes,
            "repeats": options.repeats,
            "step_s": {name: round(value, 4) for name, value in median.items()},
            "fast_over_sft": round(median["fast"] / median["plain_sft"], 3),
            "prefix_forward_share_of_fast": round(median["text_prefix_forward"] / median["fast"], 3),
            "fast_less_prefix_over_sft": round(
                (median["fast"] - median["text_prefix_forward"]) / median["plain_sft"], 3
            ),
        },
        options.out,
    )


if __name__ == "__main__":
    main()
