"""What one evaluation pass over the CMKP validation split costs at LLaVA-1.5-7B size: beam-search generation.

    python benchmarks/generation_cost.py --device cuda --bf16 [--layers 32] [--vision-layers 24] [--batch 8]
                                         [--beams 5] [--new-tokens 40,10] [--posts 64] [--out FILE]

A randomly initialised ``LlavaForConditionalGeneration`` with LLaVA-1.5-7B's widths (Llama: hidden 4096,
intermediate 11008, 32 heads, vocabulary 32064; CLIP-L/336: 576 image tokens; the 2-layer MLP projector), built in
memory (nothing is saved or downloaded). Each post is the llava template's prompt as the recipes build it: the
system prompt, 576 image tokens, ~40 text tokens and the instruction (~660 tokens). ``generate`` runs as
LLaMA-Factory's evaluation runs it: left-padded batches, ``num_beams`` beams, and exactly N new tokens
(``min_new_tokens = max_new_tokens``: a random model never stops, a trained one stops after its keyphrases, so
N = 40 is the protocol's ceiling and N = 10 about a trained model's CMKP answer). Prints JSON: seconds per post for
each N and the extrapolation to the 5,370 validation posts (one per-epoch evaluation of
``recipes/aimkp_llava_select_best.yaml`` on one device).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch


VALIDATION_POSTS = 5370
PROMPT_TOKENS = {"system": 35, "text": 40, "instruction": 14}  # around the 576 image tokens
IMAGE_TOKENS = 576


def build_model(layers: int, vision_layers: int, device: str, dtype: torch.dtype) -> torch.nn.Module:
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    text = LlamaConfig(
        hidden_size=4096,
        intermediate_size=11008,
        num_attention_heads=32,
        num_key_value_heads=32,
        num_hidden_layers=layers,
        vocab_size=32064,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
    )
    vision = CLIPVisionConfig(
        hidden_size=1024,
        intermediate_size=4096,
        num_attention_heads=16,
        num_hidden_layers=vision_layers,
        image_size=336,
        patch_size=14,
        projection_dim=768,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=32000,
        vision_feature_layer=-2 if vision_layers >= 2 else -1,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = LlavaForConditionalGeneration(config).to(dtype)
    return model.eval()


def prompts(batch: int, device: str) -> dict[str, torch.Tensor]:
    """A left-padded batch of llava prompts; text lengths vary by a few tokens as real posts do."""
    generator = torch.Generator().manual_seed(1)
    rows = []
    for index in range(batch):
        text = PROMPT_TOKENS["text"] + (index % 5) * 3 - 6
        ids = (
            torch.randint(100, 31000, (PROMPT_TOKENS["system"],), generator=generator).tolist()
            + [32000] * IMAGE_TOKENS
            + torch.randint(100, 31000, (text + PROMPT_TOKENS["instruction"],), generator=generator).tolist()
        )
        rows.append(ids)
    width = max(len(ids) for ids in rows)
    input_ids = torch.zeros(batch, width, dtype=torch.long)
    attention_mask = torch.zeros(batch, width, dtype=torch.long)
    for row, ids in enumerate(rows):
        input_ids[row, width - len(ids) :] = torch.tensor(ids)
        attention_mask[row, width - len(ids) :] = 1
    pixel_values = torch.randn(batch, 3, 336, 336, generator=generator)
    return {
        "input_ids": input_ids.to(device),
        "attention_mask": attention_mask.to(device),
        "pixel_values": pixel_values.to(device),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--vision-layers", type=int, default=24)
    parser.add_argument("--batch", type=int, default=8, help="per_device_eval_batch_size")
    parser.add_argument("--beams", type=int, default=5)
    parser.add_argument("--new-tokens", default="40,10", help="comma-separated generated lengths")
    parser.add_argument("--posts", type=int, default=64, help="posts generated per length (after one warm-up batch)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--out", default=None)
    options = parser.parse_args()
    dtype = torch.bfloat16 if options.bf16 else torch.float32
    model = build_model(options.layers, options.vision_layers, options.device, dtype)
    inputs = prompts(options.batch, options.device)
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    synchronise = torch.cuda.synchronize if options.device == "cuda" else (lambda: None)
    report: dict[str, object] = {
        "model": {
            "widths": "LLaVA-1.5-7B (hidden 4096, intermediate 11008, 32 heads, vocab 32064; CLIP-L/336)",
            "layers": options.layers,
            "vision_layers": options.vision_layers,
            "parameters": sum(parameter.numel() for parameter in model.parameters()),
            "dtype": str(dtype).removeprefix("torch."),
        },
        "device": torch.cuda.get_device_name() if options.device == "cuda" else "cpu",
        "batch": options.batch,
        "beams": options.beams,
        "prompt_tokens": int(inputs["attention_mask"].sum(1).float().mean()),
    }
    for new_tokens in [int(value) for value in options.new_tokens.split(",")]:
        settings = {
            "num_beams": options.beams,
            "do_sample": False,
            "max_new_tokens": new_tokens,
            "min_new_tokens": new_tokens,
            "pad_token_id": 0,
        }
        with torch.inference_mode():
            model.generate(**inputs, **settings)  # warm-up
            times = []
            for _ in range(max(1, options.posts // options.batch)):
                synchronise()
                start = time.perf_counter()
                model.generate(**inputs, **settings)
                synchronise()
                times.append(time.perf_counter() - start)
        per_post = statistics.median(times) / options.batch
        report[f"new_tokens_{new_tokens}"] = {
            "seconds_per_batch": round(statistics.median(times), 4),
            "seconds_per_post": round(per_post, 5),
            "validation_split_minutes": round(per_post * VALIDATION_POSTS / 60, 2),
        }
    if options.device == "cuda":
        report["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    text = json.dumps(report, indent=2)
    print(text)
    if options.out:
        Path(options.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
