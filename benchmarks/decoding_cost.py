"""The two decodings on the same adapter, and what one evaluation pass over the CMKP validation split costs.

    make demo && python benchmarks/decoding_cost.py [--split cmkp_demo_valid] [--seeds 1,2,3] [--out FILE]

Runs the demo's predict recipe (``recipes/demo/demo_llava_predict.yaml``: the tiny LLaVA with the demo's AimKP
adapter) on the demo validation split (200 real CMKP posts, generated images) with

- ``beam5``: the protocol's plain beam search, 5 beams, at most 40 new tokens (``recipes/predict_llava.yaml``);
- ``authors``: the authors' ``evaluate.py`` decoding, 5 beams with sampling inside them, temperature 0.5, top-p 1
  (``recipes/predict_llava_authors_decoding.yaml``), once per seed.

For each it reports the keyphrase metrics (aimkp style), LLaMA-Factory's ``predict_runtime``, seconds per post, and
the share of posts whose prediction equals the beam search's. ``epoch_eval_seconds_5370`` scales the beam search's
seconds per post to the 5,370 posts of the CMKP validation split: the cost of one per-epoch evaluation of
``recipes/aimkp_llava_select_best.yaml`` on the tiny model on this machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]
VALIDATION_POSTS = 5370
DECODINGS = {
    "beam5": {"num_beams": 5, "do_sample": False},
    "authors": {"num_beams": 5, "do_sample": True, "temperature": 0.5, "top_p": 1.0, "top_k": 50},
}


def predict(name: str, split: str, overrides: dict[str, object], out: Path) -> dict[str, object]:
    """One ``llamafactory-cli train`` predict run; its predictions scored and its runtime."""
    from aimkp_plugin.evaluation.metrics import score
    from aimkp_plugin.evaluation.predictions import read_pairs

    argv = [f"{key}={value}" for key, value in {**overrides, "eval_dataset": split, "output_dir": out}.items()]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    start = time.perf_counter()
    result = subprocess.run(
        ["llamafactory-cli", "train", "recipes/demo/demo_llava_predict.yaml", "max_new_tokens=40", *argv],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"{name}: llamafactory-cli failed\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
    predictions = out / "generated_predictions.jsonl"
    metrics = json.loads((out / "predict_results.json").read_text())
    pairs = read_pairs(predictions)
    return {
        "metrics": {key: round(value, 3) for key, value in score(pairs, "aimkp").items()},
        "posts": len(pairs),
        "predict_runtime_s": metrics["predict_runtime"],
        "wall_s": round(wall, 1),
        "seconds_per_post": metrics["predict_runtime"] / len(pairs),
        "predictions": [json.loads(line)["predict"] for line in predictions.read_text().splitlines()],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--split", default="cmkp_demo_valid")
    parser.add_argument("--seeds", default="1,2,3", help="seeds of the sampled (authors') decoding")
    parser.add_argument("--out", default=None, help="also write the JSON result to this file")
    options = parser.parse_args()
    if not (REPO / "build" / "demo" / "llava-lora" / "adapter_config.json").is_file():
        raise SystemExit("No demo adapter in build/demo/llava-lora: run `make demo` first.")
    work = REPO / "build" / "bench" / "decoding"
    beam = predict("beam5", options.split, DECODINGS["beam5"], work / "beam5")
    runs = {"beam5": beam}
    for seed in [int(seed) for seed in options.seeds.split(",")]:
        runs[f"authors_seed{seed}"] = predict(
            "authors", options.split, {**DECODINGS["authors"], "seed": seed}, work / f"authors_seed{seed}"
        )
    report: dict[str, object] = {"model": "tiny llava + demo AimKP adapter (make demo)", "split": options.split}
    reference = beam["predictions"]
    for name, run in runs.items():
        same = sum(a == b for a, b in zip(run.pop("predictions"), reference, strict=True))
        run["same_as_beam5"] = round(same / run["posts"], 3)
        report[name] = run
    sampled = [run for name, run in runs.items() if name.startswith("authors")]
    report["authors_mean"] = {
        key: round(statistics.mean(run["metrics"][key] for run in sampled), 3) for key in ("f1@1", "f1@3", "map@5")
    }
    report["epoch_eval_seconds_5370"] = round(beam["seconds_per_post"] * VALIDATION_POSTS, 1)
    report["machine"] = f"{os.cpu_count()} CPU cores"
    text = json.dumps(report, indent=2)
    print(text)
    if options.out:
        Path(options.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
