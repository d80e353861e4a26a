"""Cost of one AimKP training step (reference and fast) against one plain SFT step at LLaVA-1.5-7B's real widths, for
per-device batch sizes 1, 2, 4 and 8.

    python benchmarks/wide_step_cost.py [--layers 2] [--vision-layers 2] [--batches 1,2,4,8] [--stride 2]
                                        [--repeats R] [--buffer-mb auto] [--max-tokens 0] [--device cpu|cuda]
                                        [--dtype bf16|fp32] [--bf16] [--out FILE]

The CPU result in ``benchmarks/results/cpu/wide_step_cost.json`` comes from
``python benchmarks/wide_step_cost.py --out benchmarks/results/cpu/wide_step_cost.json``; on a GPU,
``benchmarks/gpu_step_cost.sh`` runs ``python benchmarks/wide_step_cost.py --device cuda --bf16 --layers
$WIDE_LAYERS`` after the families.

The model is a randomly initialised ``LlavaForConditionalGeneration`` (fixed seed) with LLaVA-1.5-7B's widths: a
Llama language model of hidden 4096, intermediate 11008, 32 heads, 32 KV heads, vocabulary 32064; a CLIP-L/336
vision tower of hidden 1024, intermediate 4096, 16 heads, patch 14 on 336 px (24×24 = 576 image tokens, read at
``vision_feature_layer`` -2 with the default select strategy); the 2-layer gelu MLP projector. Only the depth is cut:
``--layers`` language layers and ``--vision-layers`` vision layers (2 and 2 by default, so it runs on a CPU). It is
built with the project's local tokenizer (as the tiny LLaVA; its vocabulary is smaller than the model's 32064 rows),
saved with ``save_pretrained`` under ``build/wide/<name>`` in the compute dtype (LLaMA-Factory loads the weights as
saved, as it loads a real half-precision checkpoint) and cached by its spec. LLaMA-Factory's own loader turns it into
the training model, as in ``benchmarks/step_cost.py``: LoRA r128 (alpha 256) on all linear layers of the language
model (``lora_target: all``), the projector trained (``additional_target: multi_modal_projector``), the vision tower
frozen, gradient checkpointing on, trainable parameters in float32. The batches are the first B demo CMKP posts
(576 image tokens and 28–54 post-text tokens each).

For each batch size, on the same model and batch: the seconds of one plain SFT step, one reference AimKP step and one
fast AimKP step (every sample at text and image stride γ, so three rows per sample; the fast step with the training
default ``aimkp_fast_buffer_mb: auto``, sized from the device's memory when each step starts) and their ratios; the
peak memory of each step, in all (``peak_mem_bytes``, ``peak_mem_fast_over_sft``: what decides whether a run fits) and
above the step's start (``peak_mem_above_start_*``: the model, the trained parameters and the previous step's gradients
left out); the fast step's per-row gradient buffer (``buffer_bytes``: trainable parameters × 4 bytes × rows of the
micro-batch, all rows at once, as without a budget; ``buffer_bytes_held``: the most the fast step holds at a time under
the budget, the rows of its largest group of samples); the token counts.

- CUDA: as ``step_cost.py``: the median of ``--repeats`` (default 10) interleaved runs after one warm-up each, and
  the allocator's peak (in all, and above the step's start).
- CPU: each step runs in a fresh process of its own (``step_cost.py``'s memory child): one warm-up and
  ``--repeats`` timed runs, the resident high-water mark over all of them, in all and above the start (as
  ``step_cost.py``'s two runs), the wall-clock and process CPU seconds of the timed runs and the load average. The
  reference step at batch 8 takes over a minute on this 2-core CPU, so the default is ``--repeats 1`` and bf16 (the
  CPU's AMX runs bf16 matrix products about 2.5× faster than float32): the default run took 13.5 minutes here on a
  quiet machine (each child also loads the model), more while other work shares the cores (``--repeats 2`` adds
  about 5 minutes). Timing and memory from the same runs keep it there; the JSON says how it was timed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch


sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_cost import (  # noqa: E402
    SHARE_CHOICES,
    StepBench,
    add_share_options,
    collate,
    cpu_child_measure,
    cuda_peaks,
    emit_report,
    lora_model,
    share_argv,
)


BUILDER_VERSION = 1  # bump when build_wide_model changes what it writes
BUILD_MARKER = "aimkp_build.json"
BYTES_PER_ROW_ELEMENT = 4  # the per-row buffer is float32 (promote_types(parameter dtype, float32))


@dataclass(frozen=True)
class WideSpec:
    """LLaVA-1.5-7B's widths (language model: Vicuna-7B / Llama; vision: CLIP ViT-L/14-336) at a chosen depth."""

    layers: int = 2
    vision_layers: int = 2
    dtype: str = "float32"  # of the saved weights; LLaMA-Factory loads them as saved (torch_dtype: auto)
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_heads: int = 32
    num_kv_heads: int = 32
    vocab_size: int = 32064
    vision_hidden_size: int = 1024
    vision_intermediate_size: int = 4096
    vision_heads: int = 16
    image_size: int = 336
    patch_size: int = 14
    projection_dim: int = 768
    seed: int = 0

    @property
    def name(self) -> str:
        return f"llava15-7b-widths-l{self.layers}-v{self.vision_layers}-{self.dtype}"

    @property
    def image_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def fingerprint(self) -> str:
        payload = json.dumps({**asdict(self), "builder_version": BUILDER_VERSION}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


def build_wide_model(spec: WideSpec, out: Path) -> Path:
    """Build the random-init LLaVA of ``spec`` into ``out`` (reused when its marker matches the spec)."""
    marker = out / BUILD_MARKER
    if marker.is_file():
        try:
            if json.loads(marker.read_text()).get("fingerprint") == spec.fingerprint():
                return out
        except (OSError, ValueError):
            pass
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    from aimkp_plugin.families.llava import save_llava
    from aimkp_plugin.models.building import TinyModelSpec, llava_tokenizer

    out.mkdir(parents=True, exist_ok=True)
    marker.unlink(missing_ok=True)
    tokenizer = llava_tokenizer(TinyModelSpec(name="llava-576", family="llava", template="llava", image_size=336))
    vocab = tokenizer.get_vocab()
    text_config = LlamaConfig(
        vocab_size=spec.vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        bos_token_id=vocab["<s>"],
        eos_token_id=vocab["</s>"],
        pad_token_id=vocab["<pad>"],
    )
    vision_config = CLIPVisionConfig(
        hidden_size=spec.vision_hidden_size,
        intermediate_size=spec.vision_intermediate_size,
        num_hidden_layers=spec.vision_layers,
        num_attention_heads=spec.vision_heads,
        image_size=spec.image_size,
        patch_size=spec.patch_size,
        projection_dim=spec.projection_dim,
        hidden_act="quick_gelu",
    )
    config = LlavaConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_index=vocab["<image>"],
        image_seq_length=spec.image_tokens,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )
    torch.manual_seed(spec.seed)
    model = LlavaForConditionalGeneration(config).to(getattr(torch, spec.dtype))
    save_llava(out, model, tokenizer, spec.image_size, spec.patch_size)
    marker.write_text(json.dumps({"fingerprint": spec.fingerprint(), "spec": asdict(spec)}, indent=2) + "\n")
    return out


def parameter_counts(model: Any) -> dict[str, int]:
    """Trainable parameters by kind (LoRA, projector), and all parameters of the PEFT model (``total``: the LoRA
    weights and PEFT's trained copy of the projector included, beside the frozen original)."""
    trainable = {"lora": 0, "projector": 0, "other": 0}
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            kind = "lora" if "lora_" in name else "projector" if "multi_modal_projector" in name else "other"
            trainable[kind] += parameter.numel()
    return {
        "trainable": sum(trainable.values()),
        **{f"trainable_{kind}": count for kind, count in trainable.items()},
        "total": sum(parameter.numel() for parameter in model.parameters()),
    }


def buffer_sizes(bench: StepBench, stride: int) -> dict[str, Any]:
    """The fast step's per-row gradient buffer: all rows at once, and what its grouping under the budget holds."""
    from aimkp_plugin.method.pass_planning import auto_buffer_bytes, buffer_groups, plan_rows
    from aimkp_plugin.method.types import AUTO_BUFFER

    rows, _ = plan_rows(bench.samples, bench.state_at(stride), bench.config)
    row_bytes = sum(parameter.numel() for parameter in bench.layout.parameters) * BYTES_PER_ROW_ELEMENT
    budget = bench.max_buffer_bytes
    if budget == AUTO_BUFFER:
        budget = auto_buffer_bytes(torch.device(bench.device))
    groups = buffer_groups(rows, row_bytes, budget)
    rows_per_group = [sum(row.sample in group for row in rows) for group in groups]
    return {
        "rows_fast": len(rows),
        "row_bytes": row_bytes,
        "buffer_bytes": row_bytes * len(rows),
        "buffer_bytes_held": row_bytes * max(rows_per_group, default=0),
        "buffer_groups": [len(group) for group in groups],  # samples per group, one forward/backward set each
        "buffer_budget_bytes_resolved": budget,
    }


def memory_ratios(peaks: dict[str, int], kind: str) -> dict[str, float]:
    """``peak_mem_<kind>fast_over_sft`` and the reference's ratios of the steps' peaks."""
    ratio = lambda a, b: round(peaks[a] / max(peaks[b], 1), 3)  # noqa: E731
    return {
        f"peak_mem_{kind}fast_over_sft": ratio("fast", "plain_sft"),
        f"peak_mem_{kind}reference_over_sft": ratio("reference", "plain_sft"),
        f"peak_mem_{kind}fast_over_reference": ratio("fast", "reference"),
    }


def measure(bench: StepBench, options: argparse.Namespace, repeats: int, batch_size: int) -> tuple[dict, dict, dict]:
    """Median seconds and peak bytes of each step at ``batch_size``, and what else the CPU tells. CUDA: timed here,
    interleaved after one warm-up each, then the allocator's peaks. CPU: each step runs once untimed and ``repeats``
    times timed in a fresh process of its own (the timing and the resident high-water mark of the same runs), which
    also gives the process's CPU seconds (barely moved by other work on the machine, unlike the wall clock) and the
    load average."""
    if options.device == "cuda":
        seconds = bench.seconds(options.stride, repeats)  # warms up first
        peaks = {}
        for name, step in bench.steps(options.stride).items():
            bench.model.zero_grad(set_to_none=True)  # the start: the loaded model and the trained parameters
            peaks[name] = cuda_peaks(step)
        above = {name: above for name, (above, _) in peaks.items()}
        total = {name: total for name, (_, total) in peaks.items()}
        return seconds, above, {"peak_mem_total_bytes": total}
    argv = [
        f"--layers={options.layers}",
        f"--vision-layers={options.vision_layers}",
        f"--batches={batch_size}",
        f"--stride={options.stride}",
        f"--repeats={repeats}",
        f"--lora-rank={options.lora_rank}",
        f"--buffer-mb={options.buffer_mb}",
        f"--max-tokens={options.max_tokens}",
        f"--dtype={options.dtype}",
        "--device=cpu",
        *share_argv(options),
    ]
    seconds, memory, total, cpu_seconds, load = {}, {}, {}, {}, {}
    for method in bench.steps(options.stride):
        child = cpu_child_measure(method, options.stride, argv, __file__)
        seconds[method] = statistics.median(child["seconds"])
        memory[method] = int(child["peak_bytes"])
        total[method] = int(child["peak_bytes"]) + int(child["start_bytes"])
        cpu_seconds[method] = round(statistics.median(child["cpu_seconds"]), 2)
        load[method] = round(max(child["load_average"]), 2)
        print(f"batch {batch_size} {method}: {seconds[method]:.1f} s", file=sys.stderr, flush=True)
    extra = {
        "peak_mem_total_bytes": total,
        "step_cpu_s": cpu_seconds,
        "cpu_time_ratios": {
            "fast_over_reference": round(cpu_seconds["fast"] / cpu_seconds["reference"], 3),
            "fast_over_sft": round(cpu_seconds["fast"] / cpu_seconds["plain_sft"], 3),
            "reference_over_sft": round(cpu_seconds["reference"] / cpu_seconds["plain_sft"], 3),
        },
        "load_average_1min": load,
    }
    return seconds, memory, extra


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2, help="language-model layers (LLaVA-1.5-7B: 32)")
    parser.add_argument("--vision-layers", type=int, default=2, help="vision-tower layers (CLIP-L/336: 24)")
    parser.add_argument("--batches", default="1,2,4,8", help="comma-separated per-device batch sizes")
    parser.add_argument("--stride", type=int, default=2, help="γ of every sample, text and image alike")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per step (default: CPU 1, CUDA 10)")
    parser.add_argument("--lora-rank", type=int, default=128, help="LoRA rank (alpha: twice the rank)")
    parser.add_argument("--buffer-mb", default="auto", help="aimkp_fast_buffer_mb: auto, or MiB (0: no limit)")
    parser.add_argument("--max-tokens", type=int, default=0, help="aimkp_fast_max_tokens (0: automatic)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"], help="weights and compute")
    parser.add_argument("--bf16", action="store_const", const="bf16", dest="dtype", help="--dtype bf16 (the default)")
    add_share_options(parser)
    parser.add_argument("--out", default=None, help="also write the JSON result to this file")
    parser.add_argument("--measure-memory", default=None, help=argparse.SUPPRESS)  # internal: "method:stride"
    options = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    batches = [int(value) for value in options.batches.split(",")]
    repeats = options.repeats or (10 if options.device == "cuda" else 1)
    buffer_budget = "auto" if options.buffer_mb == "auto" else int(options.buffer_mb) * 2**20 or None
    bf16 = options.dtype == "bf16"

    spec = WideSpec(options.layers, options.vision_layers, "bfloat16" if bf16 else "float32")
    repo = Path(__file__).resolve().parents[1]
    started = time.perf_counter()
    model_path = build_wide_model(spec, repo / "build" / "wide" / spec.name)
    torch.manual_seed(0)
    extra = {"lora_rank": options.lora_rank, "lora_alpha": 2 * options.lora_rank}
    if options.device == "cpu":
        extra["use_cpu"] = True  # else transformers refuses bf16 without a GPU
    with tempfile.TemporaryDirectory() as workdir:
        model, features, collator, tokenizer = lora_model(
            Path(workdir), model_path, "llava", "multi_modal_projector", max(batches), bf16, extra
        )
        padded = {size: collate(collator, features, size, options.device) for size in batches}  # reads the images
    model = model.to(options.device).train()
    build_s = time.perf_counter() - started

    def bench_at(batch_size: int) -> StepBench:
        return StepBench(
            model,
            padded[batch_size],
            tokenizer,
            batch_size,
            options.device,
            bf16,
            options.max_tokens,
            buffer_budget,
            SHARE_CHOICES[options.share_prefix],
            options.compare_share,
        )

    if options.measure_memory:  # the child of step_cost.cpu_child_measure, one batch size
        bench_at(batches[0]).measure_child(options.measure_memory, repeats, warmup=1)
        return
    counts = parameter_counts(model)
    entries = []
    for batch_size in batches:
        bench = bench_at(batch_size)
        seconds, memory, extra = measure(bench, options, repeats, batch_size)
        result = bench.result(options.stride, seconds, memory)
        total = extra.pop("peak_mem_total_bytes")
        entries.append(
            {
                "batch": batch_size,
                "fast_over_reference": result["fast_over_reference"],
                "fast_over_sft": result["fast_over_sft"],
                "reference_over_sft": result["reference_over_sft"],
                **{key: value for key, value in result.items() if "prefix_apart" in key},
                **memory_ratios(total, ""),
                **memory_ratios(memory, "above_start_"),
                **buffer_sizes(bench, options.stride),
                "step_s": result["step_s"],
                **extra,
                "peak_mem_bytes": total,
                "peak_mem_above_start_bytes": memory,
                "sequence_lengths": [int(sample.model_inputs["input_ids"].shape[1]) for sample in bench.samples],
                "image_tokens": sum(len(sample.spans.image_positions) for sample in bench.samples),
                "text_tokens": sum(len(sample.spans.text) for sample in bench.samples),
                "answer_tokens": bench.tokens,
                "padded_tokens_sft": int(bench.batch["input_ids"].numel()),
                "row_lengths_fast": result["row_lengths_fast"],
            }
        )
        print(json.dumps(entries[-1]), file=sys.stderr, flush=True)
    widest = bench_at(max(batches)).samples
    timing = (
        f"the median of {repeats} run(s) of each step, interleaved, after one warm-up each"
        if options.device == "cuda"
        else f"each step in a fresh process of its own: one warm-up, then {repeats} timed run(s), the median of the "
        "wall clock (step_s, and the ratios); the same process gives its peak memory over all its runs, its process "
        "CPU seconds (step_cpu_s, cpu_time_ratios: what other work on the machine barely moves) and the 1-minute "
        "load average before each timed run (2 cores: above ~2, other work shares them)"
    )
    if options.device == "cpu" and repeats == 1:
        timing += "; repeats 1 on the CPU so that the default run (1 + 2 + 4 + 8 samples) stays within ~25 minutes"
    emit_report(
        {
            "model": {
                "description": (
                    f"random-init LLaVA (LlavaForConditionalGeneration) at LLaVA-1.5-7B widths, {spec.layers} of 32 "
                    f"language layers and {spec.vision_layers} of 24 vision layers; LoRA r{options.lora_rank} "
                    f"(alpha {2 * options.lora_rank}) on all linear layers of the language model + trained "
                    "projector, frozen vision tower, gradient checkpointing on"
                ),
                "language": {
                    "layers": spec.layers,
                    "hidden": spec.hidden_size,
                    "intermediate": spec.intermediate_size,
                    "heads": spec.num_heads,
                    "kv_heads": spec.num_kv_heads,
                    "vocab": spec.vocab_size,
                    "tokenizer_vocab": len(tokenizer),
                },
                "vision": {
                    "layers": spec.vision_layers,
                    "hidden": spec.vision_hidden_size,
                    "intermediate": spec.vision_intermediate_size,
                    "heads": spec.vision_heads,
                    "image_size": spec.image_size,
                    "patch_size": spec.patch_size,
                    "feature_layer": -2,
                    "trained": False,
                },
                "projector": "2-layer MLP (1024 -> 4096 -> 4096, gelu), trained",
                "lora_rank": options.lora_rank,
                "lora_alpha": 2 * options.lora_rank,
                "lora_target": "all",
                "gradient_checkpointing": True,
                "share_prefix": options.share_prefix,
                "parameters": counts,
                "trainable_parameters": counts["trainable"],
                "image_tokens_per_sample": [len(sample.spans.image_positions) for sample in widest],
                "text_tokens_per_sample": [len(sample.spans.text) for sample in widest],
                "weights_dtype": spec.dtype,
                "path": str(model_path.relative_to(repo)),
            },
            "device": torch.cuda.get_device_name() if options.device == "cuda" else "cpu",
            "dtype": "bfloat16 (autocast; trainable parameters float32)" if bf16 else "float32",
            "threads": torch.get_num_threads(),
            "stride": options.stride,
            "repeats": repeats,
            "timing": timing,
            "memory": (
                "peak_mem_bytes and the peak_mem_*_over_* ratios: the step's peak in all, the CUDA allocator's peak "
                "(the loaded model, the trained parameters and their gradients, and the step's own memory)"
                if options.device == "cuda"
                else "peak_mem_bytes and the peak_mem_*_over_* ratios: the step's peak in all, the resident "
                "high-water mark of the step's own process (the runtime, the loaded model, the trained parameters and "
                "their gradients, and the step's own memory)"
            )
            + "; peak_mem_above_start_bytes and the peak_mem_above_start_* ratios: that peak less what was there at "
            "the step's start (the loaded model and the trained parameters, no gradients); an optimizer's states "
            "(AdamW: 8 bytes per trained parameter) are not held and would add the same to every step",
            "buffer_budget_bytes": buffer_budget,
            "buffer_note": (
                "buffer_bytes: trainable parameters × 4 bytes × rows of the micro-batch (3 rows per sample: the "
                "original and its text and image copies), all rows at once, as without a budget; buffer_bytes_held: "
                "what the fast step holds at a time under buffer_budget_bytes (the rows of its largest group of "
                "samples; a sample whose rows alone exceed the budget is a group of its own); buffer_groups: samples "
                "per group, each group a forward/backward set of its own"
            ),
            "setup_s": round(build_s, 1),
            "total_s": round(time.perf_counter() - started, 1),
            "batches": entries,
        },
        options.out,
    )


if __name__ == "__main__":
    main()
