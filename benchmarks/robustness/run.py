"""Toy-scale robustness reproduction: plain SFT vs AimKP on the same tiny LLaVA-style model, evaluated in the
full / text-only / image-only settings.

    python benchmarks/robustness/run.py --out build/robustness [--seeds 0 1 2] [--quick]

For every seed it generates the synthetic posts (``generate.py``). It then trains plain SFT and AimKP with the same
config, steps and seed through ``llamafactory-cli``: full fine-tuning, so the from-scratch vision tower learns too.
Each model predicts the test split in the three settings, which are scored with ``aimkp eval``'s metrics (aimkp
style). It writes ``results.md``, ``results.json`` and ``results.png`` (means over seeds) under ``--out``.
Nothing is asserted about which method wins. ``--quick`` (1 seed, small data, 2 epochs) only checks the pipeline.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml


HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))
METHODS = ("sft", "aimkp")
SETTINGS = ("full", "text_only", "image_only")
SIZES = {
    "full": {"train": 600, "test": 120, "epochs": 6, "seeds": [0, 1, 2]},
    "quick": {"train": 32, "test": 8, "epochs": 2, "seeds": [0]},
}


def environment() -> dict[str, str]:
    env = os.environ.copy()
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("HF_HOME", str(REPO / "build" / "cache" / "huggingface"))
    env.setdefault("MPLCONFIGDIR", str(REPO / "build" / "cache" / "matplotlib"))
    env["HF_HUB_OFFLINE"] = "1"
    env["TOKENIZERS_PARALLELISM"] = "false"
    return env


def llamafactory(config: dict, path: Path, **env: str) -> None:
    path.write_text(yaml.safe_dump(config))
    result = subprocess.run(
        ["llamafactory-cli", "train", str(path)],
        env={**environment(), **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    (path.with_suffix(".log")).write_text(result.stdout)
    if result.returncode != 0:
        raise RuntimeError(f"llamafactory-cli train {path} failed:\n{result.stdout[-3000:]}")


def train_config(model: Path, data: Path, out: Path, seed: int, epochs: int, aimkp: bool) -> dict:
    config = {
        "model_name_or_path": str(model),
        "stage": "sft",
        "do_train": True,
        "finetuning_type": "full",
        "freeze_vision_tower": False,
        "freeze_multi_modal_projector": False,
        "dataset": "robust_train",
        "dataset_dir": str(data),
        "template": "llava",
        "cutoff_len": 256,
        "output_dir": str(out),
        "overwrite_output_dir": True,
        "per_device_train_batch_size": 8,
        "gradient_accumulation_steps": 1,
        "learning_rate": 1.0e-3,
        "lr_scheduler_type": "cosine",
        "warmup_ratio": 0.05,
        "num_train_epochs": float(epochs),
        "logging_steps": 10,
        "save_strategy": "no",
        "report_to": "none",
        "seed": seed,
        "preprocessing_num_workers": 1,
    }
    if aimkp:
        config.update({"aimkp": True, "aimkp_text_threshold": 0.1, "aimkp_image_threshold": 0.4})
    return config


def predict_config(model: Path, data: Path, out: Path, setting: str) -> dict:
    return {
        "model_name_or_path": str(model),
        "stage": "sft",
        "do_predict": True,
        "finetuning_type": "full",
        "eval_dataset": "robust_test",
        "dataset_dir": str(data),
        "template": "llava",
        "cutoff_len": 256,
        "output_dir": str(out),
        "overwrite_output_dir": True,
        "per_device_eval_batch_size": 16,
        "predict_with_generate": True,
        "max_new_tokens": 12,
        "report_to": "none",
        "aimkp_input_setting": setting,
        "preprocessing_num_workers": 1,
    }


def predict(run: tuple[Path, Path, str, str]) -> None:
    """One method's predictions in one setting, with one thread."""
    seed_dir, data, method, setting = run
    config = predict_config(seed_dir / method, data, seed_dir / method / f"predict_{setting}", setting)
    llamafactory(config, seed_dir / f"{method}_{setting}.yaml", OMP_NUM_THREADS="1")


def run(out: Path, seeds: list[int], size: dict, redundant: float, classes: int, filler_vocab: int) -> dict:
    from generate import generate

    from aimkp_plugin.evaluation.compare import RunResult, bar_chart, compare_runs
    from aimkp_plugin.models.tiny import build_tiny_model

    start = time.perf_counter()
    model = build_tiny_model("llava", REPO / "build" / "tiny" / "llava")
    per_seed: list[dict] = []
    for seed in seeds:
        seed_dir = out / f"seed{seed}"
        data = seed_dir / "data"
        signals = generate(data, seed, size["train"], size["test"], redundant, classes, filler_vocab)
        runs = []
        for method in METHODS:
            trained = seed_dir / method
            llamafactory(
                train_config(model, data, trained, seed, size["epochs"], method == "aimkp"),
                seed_dir / f"{method}.yaml",
            )
            runs += [str(seed_dir / method / f"predict_{setting}") for setting in SETTINGS]

        predictions = [(seed_dir, data, method, setting) for method in METHODS for setting in SETTINGS]
        with ThreadPoolExecutor(max_workers=2) as pool:  # the predictions two at a time, one thread each
            list(pool.map(predict, predictions))
        results = compare_runs(runs, "aimkp")
        per_seed.append({"seed": seed, "train_signals": signals, "results": [vars(result) for result in results]})

    summary = []
    for method in METHODS:
        for setting in SETTINGS:
            rows = [
                r for entry in per_seed for r in entry["results"] if r["method"] == method and r["setting"] == setting
            ]
            row = {"method": method, "setting": setting, "seeds": len(rows)}
            for key in ("f1_at_1", "f1_at_3", "map_at_5"):
                values = [r[key] for r in rows]
                row[key] = statistics.mean(values)
                row[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
            summary.append(row)
    elapsed = time.perf_counter() - start
    report = {
        "seeds": seeds,
        "size": size,
        "redundant": redundant,
        "classes": classes,
        "filler_vocab": filler_vocab,
        "wall_s": round(elapsed, 1),
        "summary": summary,
        "per_seed": per_seed,
    }
    (out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        f"Seeds {seeds}; train {size['train']} posts ({redundant:.0%} redundant), test {size['test']}, "
        f"{size['epochs']} epochs, {classes} topics; wall {elapsed / 60:.1f} min. Mean ± std over seeds, aimkp style.",
        "",
        "| method | setting | F1@1 | F1@3 | MAP@5 |",
        "|---|---|---:|---:|---:|",
    ]
    for row in summary:
        cells = " | ".join(f"{row[key]:.2f} ± {row[key + '_std']:.2f}" for key in ("f1_at_1", "f1_at_3", "map_at_5"))
        lines.append(f"| {row['method']} | {row['setting']} | {cells} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    means = [
        RunResult(
            f"{row['method']}/{row['setting']}",
            row["method"],
            row["setting"],
            "aimkp",
            row["seeds"],
            row["f1_at_1"],
            row["f1_at_3"],
            row["map_at_5"],
        )
        for row in summary
    ]
    bar_chart(means, out / "results.png")
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO / "build" / "robustness"))
    parser.add_argument("--seeds", type=int, nargs="+")
    parser.add_argument("--quick", action="store_true", help="1 seed, small data: checks the pipeline only.")
    parser.add_argument("--train", type=int)
    parser.add_argument("--test", type=int)
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--redundant", type=float, default=0.8)
    parser.add_argument("--classes", type=int, default=8)
    parser.add_argument("--filler-vocab", type=int, default=200)
    options = parser.parse_args()
    size = dict(SIZES["quick" if options.quick else "full"])
    for key in ("train", "test", "epochs"):
        if getattr(options, key) is not None:
            size[key] = getattr(options, key)
    seeds = options.seeds or size.pop("seeds")
    size.pop("seeds", None)
    out = Path(options.out)
    out.mkdir(parents=True, exist_ok=True)
    report = run(out, seeds, size, options.redundant, options.classes, options.filler_vocab)
    print((out / "results.md").read_text())
    print(json.dumps({"wall_s": report["wall_s"], "results": str(out / "results.json")}))


if __name__ == "__main__":
    main()
