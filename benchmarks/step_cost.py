"""Cost of one AimKP training step against one plain SFT step, on the tiny LLaVA with the real 24×24 image grid.

    python benchmarks/step_cost.py [--batch 4] [--stride 2] [--repeats 5] [--impl reference]

Both steps run on the same LoRA model (built by LLaMA-Factory's own loader, as in training) and the same batch of
demo CMKP posts (576 image tokens each). The plain step is one forward/backward of the padded batch; the AimKP step
is the plugin's step with every sample at text stride and image stride ``--stride`` (original + 2 masked copies per
sample). Prints JSON with median seconds, the ratio measured in this one run, and the token counts.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch


def build(workdir: Path, batch_size: int):
    from llamafactory.data import SFTDataCollatorWith4DAttentionMask, get_dataset, get_template_and_fix_tokenizer
    from llamafactory.hparams import get_train_args
    from llamafactory.model import load_model, load_tokenizer

    from aimkp_plugin.data.demo import build_demo_dataset
    from aimkp_plugin.models.tiny import build_tiny_model

    repo = Path(__file__).resolve().parents[1]
    model_path = build_tiny_model("llava-576", repo / "build" / "tiny" / "llava-576")
    data = build_demo_dataset(workdir / "demo")
    config = {
        "model_name_or_path": str(model_path),
        "stage": "sft",
        "do_train": True,
        "finetuning_type": "lora",
        "lora_rank": 8,
        "lora_target": "all",
        "dataset": "cmkp_demo_train",
        "dataset_dir": str(data),
        "template": "llava",
        "cutoff_len": 1024,
        "max_samples": batch_size,
        "output_dir": str(workdir / "out"),
        "report_to": "none",
        "aimkp": True,
        "preprocessing_num_workers": 1,
    }
    model_args, data_args, training_args, finetuning_args, _ = get_train_args(config)
    tokenizer_module = load_tokenizer(model_args)
    template = get_template_and_fix_tokenizer(tokenizer_module["tokenizer"], data_args)
    dataset = get_dataset(template, model_args, data_args, training_args, stage="sft", **tokenizer_module)
    model = load_model(tokenizer_module["tokenizer"], model_args, finetuning_args, is_trainable=True)
    collator = SFTDataCollatorWith4DAttentionMask(template=template, model=model, **tokenizer_module)
    features = [dict(dataset["train_dataset"][index]) for index in range(batch_size)]
    return model.train(), collator(features), tokenizer_module["tokenizer"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--stride", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--impl", default="reference", choices=["reference"])
    options = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)

    from aimkp_plugin.integration.batches import BatchSplitter
    from aimkp_plugin.method.state import CurriculumState, ModalityState
    from aimkp_plugin.method.step import StepConfig, reference_sample_step

    with tempfile.TemporaryDirectory() as workdir:
        model, batch, tokenizer = build(Path(workdir), options.batch)
    parameters = [parameter for parameter in model.parameters() if parameter.requires_grad]
    splitter = BatchSplitter(model.config, tokenizer)
    samples = splitter.split(batch, list(range(options.batch)))
    config = StepConfig(modalities=["text", "image"], thresholds={"text": 0.1, "image": 0.4})
    tokens = sum(sample.num_answer_tokens for sample in samples)

    def plain_step() -> None:
        model.zero_grad(set_to_none=True)
        model(**batch).loss.backward()

    def aimkp_step() -> None:
        model.zero_grad(set_to_none=True)
        state = CurriculumState(options.batch, options.stride)
        for index in range(options.batch):  # every sample at the chosen strides, not frozen
            state.set(index, "text", ModalityState(options.stride))
            state.set(index, "image", ModalityState(options.stride))
        for sample in samples:
            reference_sample_step(model, parameters, sample, state, config, tokens, torch.bool)

    timings: dict[str, list[float]] = {"plain_sft": [], "aimkp": []}
    for step in (plain_step, aimkp_step):  # warm-up
        step()
    for _ in range(options.repeats):  # interleaved, so both see the same machine noise
        for name, step in (("plain_sft", plain_step), ("aimkp", aimkp_step)):
            start = time.perf_counter()
            step()
            timings[name].append(time.perf_counter() - start)
    plain, aimkp = statistics.median(timings["plain_sft"]), statistics.median(timings["aimkp"])
    print(
        json.dumps(
            {
                "model": "tiny llava-576 (hidden 64, 2 layers, CLIP 336px/14: 24x24 = 576 image tokens), LoRA r8",
                "impl": options.impl,
                "device": "cpu",
                "threads": torch.get_num_threads(),
                "batch": options.batch,
                "strides": {"text": options.stride, "image": options.stride},
                "sequence_lengths": [int(sample.model_inputs["input_ids"].shape[1]) for sample in samples],
                "image_tokens_per_sample": [len(sample.spans.image_positions) for sample in samples],
                "text_tokens_per_sample": [len(sample.spans.text) for sample in samples],
                "answer_tokens": tokens,
                "repeats": options.repeats,
                "plain_sft_step_s": round(plain, 4),
                "aimkp_step_s": round(aimkp, 4),
                "aimkp_over_plain": round(aimkp / plain, 2),
                "python": sys.version.split()[0],
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
