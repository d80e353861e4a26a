"""Cost of one AimKP training step (reference and fast) against one plain SFT step, with the real 24×24 image grid.

    python benchmarks/step_cost.py [--model llava-576|qwen2vl|qwen3vl|qwen3_5|internvl|...] [--batch 4]
                                   [--strides 2,4] [--repeats 5] [--device cpu|cuda] [--bf16]

All steps run on the same LoRA model, built by LLaMA-Factory's own loader as in training (LoRA r8 on all linear
layers of the language model, the projector trained through ``additional_target``, gradient checkpointing on), and
the same batch of demo CMKP posts with 576 image tokens each (Qwen2-VL, Qwen2.5-VL: images resized to 672×672, 24×24
merged tokens; Qwen3-VL, Qwen3-VL-MoE and Qwen3.5: 768×768 with patch 16, 24×24 merged tokens; GLM-4V: 672×672
with patch 14, 24×24 merged tokens; InternVL: one 448 px tile of 16×16 = 256 tokens, InternVL's own size; Gemma 3,
Gemma 4 and LLaVA-NeXT: their tiny models' own image sizes). The plain step is one forward/backward of the padded
batch; the AimKP steps run every sample at text and image stride γ (the original plus two masked copies per sample).
Steps are interleaved so all see the same machine noise; the ratios come from this one run. Peak memory: on CUDA
the allocator's peak per step; on CPU the resident set's high-water mark of a forked child running that step alone,
above the child's start.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


MODELS = {  # benchmark name -> (tiny model, extra LLaMA-Factory keys); template and projector from its family
    "llava-576": ("llava-576", {}),
    "qwen2vl": ("qwen2_vl", {"image_min_pixels": 672 * 672}),
    "qwen2_5vl": ("qwen2_5_vl", {"image_min_pixels": 672 * 672}),
    "qwen3vl": ("qwen3_vl", {"image_min_pixels": 768 * 768}),
    "qwen3_vl_moe": ("qwen3_vl_moe", {"image_min_pixels": 768 * 768}),
    "qwen3_5": ("qwen3_5", {"image_min_pixels": 768 * 768}),
    "internvl": ("internvl-448", {}),
    "gemma3": ("gemma3", {}),
    "gemma4": ("gemma4", {}),
    "glm4v": ("glm4v", {"image_min_pixels": 672 * 672}),
    "llava_next": ("llava_next", {}),
}


def tiny_shape(name: str) -> str:
    """The tiny model's width and depth, from its spec."""
    from aimkp_plugin.models.tiny import tiny_spec

    spec = tiny_spec(MODELS[name][0])
    return f"hidden {spec.hidden_size}, {spec.num_layers} layers"


def lora_model(
    workdir: Path, model_path: Path, template_name: str, projector: str, max_samples: int, bf16: bool, extra: dict
) -> tuple[Any, list[dict], Any, Any]:
    """The LoRA model of ``model_path`` as LLaMA-Factory's loader builds it for training (``lora_target: all``, the
    projector trained through ``additional_target``, gradient checkpointing on; ``extra`` adds or overrides keys),
    the first ``max_samples`` preprocessed demo CMKP posts, the collator and the tokenizer. The model stays on the CPU.
    """
    from llamafactory.data import SFTDataCollatorWith4DAttentionMask, get_dataset, get_template_and_fix_tokenizer
    from llamafactory.hparams import get_train_args
    from llamafactory.model import load_model, load_tokenizer

    from aimkp_plugin.data.demo import build_demo_dataset
    from aimkp_plugin.integration.patching import apply_aimkp_to_llamafactory

    apply_aimkp_to_llamafactory()  # a no-op under the .pth activation; needed where the package is only on the path
    data = build_demo_dataset(workdir / "demo")
    config = {
        "model_name_or_path": str(model_path),
        "stage": "sft",
        "do_train": True,
        "finetuning_type": "lora",
        "lora_rank": 8,
        "lora_target": "all",
        "additional_target": projector,
        "dataset": "cmkp_demo_train",
        "dataset_dir": str(data),
        "template": template_name,
        "cutoff_len": 1024,
        "max_samples": max_samples,
        "output_dir": str(workdir / "out"),
        "report_to": "none",
        "aimkp": True,
        "preprocessing_num_workers": 1,
        "bf16": bf16,
        **extra,
    }
    model_args, data_args, training_args, finetuning_args, _ = get_train_args(config)
    tokenizer_module = load_tokenizer(model_args)
    template = get_template_and_fix_tokenizer(tokenizer_module["tokenizer"], data_args)
    dataset = get_dataset(template, model_args, data_args, training_args, stage="sft", **tokenizer_module)
    model = load_model(tokenizer_module["tokenizer"], model_args, finetuning_args, is_trainable=True)
    collator = SFTDataCollatorWith4DAttentionMask(template=template, model=model, **tokenizer_module)
    features = [dict(dataset["train_dataset"][index]) for index in range(max_samples)]
    return model, features, collator, tokenizer_module["tokenizer"]


def collate(collator: Any, features: list[dict], batch_size: int, device: str) -> dict[str, Any]:
    """The padded batch of the first ``batch_size`` posts, on ``device`` (``features`` stay as they are: the collator
    pops keys of the dicts it gets)."""
    batch = collator([dict(feature) for feature in features[:batch_size]])
    return {key: value.to(device) if torch.is_tensor(value) else value for key, value in batch.items()}


def build(workdir: Path, name: str, batch_size: int, device: str, bf16: bool):
    from aimkp_plugin.families import FAMILY_BY_NAME
    from aimkp_plugin.integration.patching import apply_aimkp_to_llamafactory

    apply_aimkp_to_llamafactory()  # a no-op under the .pth activation; needed where the package is only on the path
    from aimkp_plugin.models.tiny import TINY_MODELS, build_tiny_model

    tiny, extra = MODELS[name]
    template_name = TINY_MODELS[tiny].template
    projector = FAMILY_BY_NAME[TINY_MODELS[tiny].family].projector
    repo = Path(__file__).resolve().parents[1]
    model_path = build_tiny_model(tiny, repo / "build" / "tiny" / tiny)
    model, features, collator, tokenizer = lora_model(
        workdir, model_path, template_name, projector, batch_size, bf16, extra
    )
    batch = collate(collator, features, batch_size, device)
    return model.to(device).train(), batch, tokenizer


def resident_kib(field: str) -> int:
    with open("/proc/self/status", encoding="utf-8") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def cpu_child_measure(method: str, stride: int, argv: list[str], script: str = __file__) -> dict[str, Any]:
    """What a fresh process (``script`` with ``argv``) measures running one ``method`` step alone
    (:meth:`StepBench.measure_child`): ``peak_bytes``, its resident high-water mark above its resident set after
    building the model (``start_bytes``), the wall-clock ``seconds`` and process ``cpu_seconds`` of each run and the
    ``load_average`` before each (a fork would share OpenMP state with this process, which can hang)."""
    command = [sys.executable, script, *argv, "--measure-memory", f"{method}:{stride}"]
    output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def cpu_peak_bytes(method: str, stride: int, argv: list[str], script: str = __file__) -> int:
    """Resident high-water mark of a fresh process running one ``method`` step twice, above its resident set after
    building the model."""
    return int(cpu_child_measure(method, stride, argv, script)["peak_bytes"])


def cuda_peaks(step: Callable[[], None]) -> tuple[int, int]:
    """The CUDA allocator's peak while ``step`` runs: above what was allocated at its start, and in all."""
    torch.cuda.synchronize()
    baseline = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    return peak - baseline, peak


def cuda_peak_bytes(step: Callable[[], None]) -> int:
    return cuda_peaks(step)[0]


class StepBench:
    """The three steps on one LoRA model and one padded batch: plain SFT (one forward/backward of the batch), the
    reference AimKP step and the fast one, every sample at text and image stride γ (not frozen).

    ``max_tokens``, ``max_buffer_bytes`` and ``share_prefix`` are the fast step's ``aimkp_fast_max_tokens`` (0: the
    batch's padded size), per-copy gradient buffer budget (None: no limit) and ``aimkp_fast_share_prefix`` (None:
    auto). ``compare_share`` adds the step ``fast_prefix_apart``: the fast step with every row apart."""

    def __init__(
        self,
        model: Any,
        batch: dict[str, Any],
        tokenizer: Any,
        batch_size: int,
        device: str,
        bf16: bool,
        max_tokens: int = 0,
        max_buffer_bytes: int | None = None,
        share_prefix: bool | None = None,
        compare_share: bool = False,
    ) -> None:
        from aimkp_plugin.families import family_for
        from aimkp_plugin.integration.batches import BatchSplitter
        from aimkp_plugin.method.fast_layout import fast_step_layout
        from aimkp_plugin.method.types import StepConfig

        self.model, self.batch, self.batch_size, self.device, self.bf16 = model, batch, batch_size, device, bf16
        self.max_tokens, self.max_buffer_bytes = max_tokens, max_buffer_bytes
        self.share_prefix, self.compare_share = share_prefix, compare_share
        self.parameters = [parameter for parameter in model.parameters() if parameter.requires_grad]
        self.samples = BatchSplitter(model.config, tokenizer).split(batch, list(range(batch_size)))
        self.config = StepConfig(modalities=["text", "image"], thresholds={"text": 0.1, "image": 0.4})
        self.tokens = sum(sample.num_answer_tokens for sample in self.samples)
        family = family_for(model.config)
        self.layout = fast_step_layout(model, family)
        self.reference_mask = family.reference_mask_builder(model)
        self.removal = family.token_removal(model)
        self.mask_dtype = torch.bool

    def autocast(self) -> torch.autocast:
        return torch.autocast(self.device, dtype=torch.bfloat16, enabled=self.bf16)

    def state_at(self, stride: int) -> Any:
        from aimkp_plugin.method.state import CurriculumState, ModalityState

        state = CurriculumState(self.batch_size, stride)
        for index in range(self.batch_size):  # every sample at the chosen strides, not frozen
            state.set(index, "text", ModalityState(stride))
            state.set(index, "image", ModalityState(stride))
        return state

    def plain(self) -> None:
        self.model.zero_grad(set_to_none=True)
        with self.autocast():
            loss = self.model(**self.batch).loss
        loss.backward()

    def reference(self, stride: int) -> None:
        from aimkp_plugin.method.step import reference_sample_step

        self.model.zero_grad(set_to_none=True)
        state = self.state_at(stride)
        with self.autocast():
            for sample in self.samples:
                reference_sample_step(
                    self.model,
                    self.parameters,
                    sample,
                    state,
                    self.config,
                    self.tokens,
                    self.mask_dtype,
                    0,
                    self.reference_mask,
                    self.removal,
                )

    def fast(self, stride: int, share_prefix: bool | None = None) -> None:
        from aimkp_plugin.method.fast_step import fast_batch_step

        config = dataclasses.replace(
            self.config,
            max_tokens_per_forward=self.max_tokens or None,
            max_buffer_bytes=self.max_buffer_bytes,
            share_prefix=self.share_prefix if share_prefix is None else share_prefix,
        )
        self.model.zero_grad(set_to_none=True)
        with self.autocast():
            fast_batch_step(self.layout, self.samples, self.state_at(stride), config, self.tokens, 0)

    def steps(self, stride: int) -> dict[str, Callable[[], None]]:
        """The three steps at ``stride``, each waiting for the device to finish."""

        def synchronised(step: Callable[[], None]) -> Callable[[], None]:
            def run() -> None:
                step()
                if self.device == "cuda":
                    torch.cuda.synchronize()

            return run

        steps = {
            "plain_sft": synchronised(self.plain),
            "reference": synchronised(lambda: self.reference(stride)),
            "fast": synchronised(lambda: self.fast(stride)),
        }
        if self.compare_share:
            steps["fast_prefix_apart"] = synchronised(lambda: self.fast(stride, share_prefix=False))
        return steps

    def measure_child(self, method_stride: str, runs: int = 2, warmup: int = 0) -> None:
        """The child of :func:`cpu_child_measure`: run one step ``warmup`` + ``runs`` times, print its resident
        high-water mark above the start (over all of them), the resident set at the start, the wall-clock and process
        CPU seconds of each of the ``runs`` after the warm-up and the 1-minute load average before each as JSON."""
        method, stride = method_stride.split(":")
        step = self.steps(int(stride))[method]
        with open("/proc/self/clear_refs", "w", encoding="utf-8") as clear:  # VmHWM := the current resident set
            clear.write("5")
        start = resident_kib("VmHWM")
        for _ in range(warmup):
            step()
        seconds, cpu_seconds, load = [], [], []
        for _ in range(runs):
            load.append(os.getloadavg()[0])
            began, began_cpu = time.perf_counter(), time.process_time()
            step()
            seconds.append(time.perf_counter() - began)
            cpu_seconds.append(time.process_time() - began_cpu)
        peak = (resident_kib("VmHWM") - start) * 1024
        print(
            json.dumps(
                {
                    "peak_bytes": peak,
                    "start_bytes": start * 1024,
                    "seconds": seconds,
                    "cpu_seconds": cpu_seconds,
                    "load_average": load,
                }
            )
        )

    def seconds(self, stride: int, repeats: int) -> dict[str, float]:
        """Median seconds of each step over ``repeats``, after one warm-up each; interleaved, so all see the same
        machine noise."""
        steps = self.steps(stride)
        timings: dict[str, list[float]] = {name: [] for name in steps}
        for step in steps.values():  # warm-up
            step()
        for _ in range(repeats):
            for name, step in steps.items():
                start = time.perf_counter()
                step()
                timings[name].append(time.perf_counter() - start)
        return {name: statistics.median(values) for name, values in timings.items()}

    def peak_memory(self, stride: int, argv: list[str], script: str = __file__) -> dict[str, int]:
        """Peak bytes of each step above its start: the CUDA allocator's peak, or on the CPU the resident high-water
        mark of a fresh process (``script`` with ``argv`` rebuilds this model and batch)."""
        if self.device == "cuda":
            return {name: cuda_peak_bytes(step) for name, step in self.steps(stride).items()}
        return {name: cpu_peak_bytes(name, stride, argv, script) for name in self.steps(stride)}

    def result(self, stride: int, seconds: dict[str, float], memory: dict[str, int]) -> dict[str, Any]:
        """Copy lengths, step seconds, peak memory and their ratios at ``stride``."""
        from aimkp_plugin.method.pass_planning import plan_rows

        rows, _ = plan_rows(self.samples, self.state_at(stride), self.config)
        apart = {}
        if "fast_prefix_apart" in seconds:
            apart = {
                "fast_prefix_apart_over_sft": round(seconds["fast_prefix_apart"] / seconds["plain_sft"], 3),
                "fast_over_fast_prefix_apart": round(seconds["fast"] / seconds["fast_prefix_apart"], 3),
            }
        return {
            "row_lengths_fast": {
                name: [len(row.keep) for row in rows if row.name == name] for name in ("original", "text", "image")
            },
            "step_s": {name: round(value, 4) for name, value in seconds.items()},
            "peak_mem_bytes": memory,
            "fast_over_reference": round(seconds["fast"] / seconds["reference"], 3),
            "fast_over_sft": round(seconds["fast"] / seconds["plain_sft"], 3),
            "reference_over_sft": round(seconds["reference"] / seconds["plain_sft"], 3),
            "peak_mem_fast_over_reference": round(memory["fast"] / max(memory["reference"], 1), 3),
            "peak_mem_fast_over_sft": round(memory["fast"] / max(memory["plain_sft"], 1), 3),
            **apart,
        }


SHARE_CHOICES = {"auto": None, "true": True, "false": False}  # --share-prefix -> the fast step's share_prefix


def add_share_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--share-prefix", default="auto", choices=sorted(SHARE_CHOICES), help="aimkp_fast_share_prefix"
    )
    parser.add_argument(
        "--compare-share", action="store_true", help="also time the fast step with every row apart (no shared prefix)"
    )


def share_argv(options: argparse.Namespace) -> list[str]:
    """The share options again, for a child process that rebuilds the bench."""
    return [f"--share-prefix={options.share_prefix}"] + (["--compare-share"] if options.compare_share else [])


def emit_report(report: dict[str, Any], out: str | None) -> None:
    """Print ``report`` (with the Python and torch versions added) as JSON, and write it to ``out`` when given."""
    text = json.dumps(
        {**report, "python": sys.version.split()[0], "torch": torch.__version__}, indent=2, ensure_ascii=False
    )
    print(text)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text + "\n", encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llava-576", choices=sorted(MODELS))
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--strides", default="2,4", help="comma-separated γ values (text and image alike)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--bf16", action="store_true", help="bf16 compute (as LLaMA-Factory's bf16: true)")
    parser.add_argument("--max-tokens", type=int, default=0, help="aimkp_fast_max_tokens (0: automatic)")
    add_share_options(parser)
    parser.add_argument("--out", default=None, help="also write the JSON result to this file")
    parser.add_argument("--measure-memory", default=None, help=argparse.SUPPRESS)  # internal: "method:stride"
    options = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)

    with tempfile.TemporaryDirectory() as workdir:
        model, batch, tokenizer = build(Path(workdir), options.model, options.batch, options.device, options.bf16)
    share = SHARE_CHOICES[options.share_prefix]
    bench = StepBench(
        model,
        batch,
        tokenizer,
        options.batch,
        options.device,
        options.bf16,
        options.max_tokens,
        None,
        share,
        options.compare_share,
    )
    if options.measure_memory:  # the child of cpu_peak_bytes
        bench.measure_child(options.measure_memory)
        return
    argv = [f"--model={options.model}", f"--batch={options.batch}", f"--device={options.device}"]
    argv += [f"--max-tokens={options.max_tokens}"] + share_argv(options)
    argv += ["--bf16"] if options.bf16 else []
    results = {}
    for stride in [int(value) for value in options.strides.split(",")]:
        seconds = bench.seconds(stride, options.repeats)
        results[f"stride_{stride}"] = bench.result(stride, seconds, bench.peak_memory(stride, argv))
    device_name = torch.cuda.get_device_name() if options.device == "cuda" else "cpu"
    emit_report(
        {
            "model": f"tiny {options.model} ({tiny_shape(options.model)}), LoRA r8 on all linear layers + projector",
            "device": device_name,
            "dtype": "bfloat16" if options.bf16 else "float32",
            "threads": torch.get_num_threads(),
            "batch": options.batch,
            "sequence_lengths": [int(sample.model_inputs["input_ids"].shape[1]) for sample in bench.samples],
            "image_tokens_per_sample": [len(sample.spans.image_positions) for sample in bench.samples],
            "text_tokens_per_sample": [len(sample.spans.text) for sample in bench.samples],
            "answer_tokens": bench.tokens,
            "trainable_parameters": sum(parameter.numel() for parameter in bench.parameters),
            "share_prefix": options.share_prefix,
            "repeats": options.repeats,
            **results,
        },
        options.out,
    )


if __name__ == "__main__":
    main()
