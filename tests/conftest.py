"""Shared fixtures: tiny models built from config, real CMKP records with generated images, and a runner for the
real ``llamafactory-cli``."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from aimkp_plugin.data.cmkp import iter_records
from aimkp_plugin.data.demo import write_post_images


REPO = Path(__file__).resolve().parents[1]
BUILD = REPO / "build"
SHARED = Path(os.environ.get("AIMKP_SHARED_DIR", REPO.parent / "shared"))
CMKP = SHARED / "data" / "cmkp"
VENV_BIN = Path(sys.executable).parent
TINY_DIR = BUILD / "tiny"
WIDE_IMAGE = (224, 96)  # Qwen3-VL: a 3×7 merged grid; InternVL: 3 tiles of 112 px plus a thumbnail
JSON_SUBSET = 24  # AimKP-JSON records (from the real validation split) used in the workspace


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment of a user's shell: the venv's bin on PATH, offline hub, caches under build/."""
    env = os.environ.copy()
    env.pop("AIMKP_PLUGIN_DISABLE", None)
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("HF_HOME", str(BUILD / "cache" / "huggingface"))
    env.setdefault("HF_DATASETS_CACHE", str(BUILD / "cache" / "datasets"))
    env.setdefault("MPLCONFIGDIR", str(BUILD / "cache" / "matplotlib"))
    env.setdefault("TORCH_EXTENSIONS_DIR", str(BUILD / "cache" / "torch_extensions"))  # DeepSpeed's CPU comm op
    env["HF_HUB_OFFLINE"] = "1"
    env["TOKENIZERS_PARALLELISM"] = "false"
    env.update(extra)
    return env


for _key, _value in subprocess_env().items():  # the in-process LLaMA-Factory calls see the same setup
    if _key in ("HF_HOME", "HF_DATASETS_CACHE", "MPLCONFIGDIR", "HF_HUB_OFFLINE", "TOKENIZERS_PARALLELISM"):
        os.environ.setdefault(_key, _value)


@pytest.fixture(scope="session")
def cmkp_data() -> Path:
    if not (CMKP / "raw" / "tw_mm_s1_tiny" / "train_src.txt").is_file():
        pytest.fail(f"The CMKP sample records are missing: expected them under {CMKP} (set AIMKP_SHARED_DIR).")
    return CMKP


@pytest.fixture(scope="session")
def tiny_models() -> dict[str, Path]:
    from aimkp_plugin.models.tiny import build_tiny_models

    from .helpers import FAMILY_NAMES

    return build_tiny_models(TINY_DIR, list(FAMILY_NAMES))


@pytest.fixture(scope="session")
def cmkp_workspace(tmp_path_factory: pytest.TempPathFactory, cmkp_data: Path) -> Path:
    """A LLaMA-Factory ``dataset_dir`` with the real records in all three input forms and generated images.

    - ``raw/``: the tiny CMKP raw splits (train 200 / valid 200 / test 50);
    - ``json/valid_subset.json``: the first records of the AimKP-JSON validation split;
    - ``jsonl/test.jsonl``: the raw test split rewritten as ``{text, image, keyphrases}`` records;
    - ``images/``: one generated picture per record.
    """
    root = tmp_path_factory.mktemp("cmkp_workspace")
    shutil.copytree(cmkp_data / "raw" / "tw_mm_s1_tiny", root / "raw")
    subset = json.loads((cmkp_data / "aimkp-json" / "valid.json").read_text())[:JSON_SUBSET]
    (root / "json").mkdir()
    (root / "json" / "valid_subset.json").write_text(json.dumps(subset))
    test_posts = [post for _, post in iter_records(root / "raw" / "test_src.txt")]
    (root / "jsonl").mkdir()
    with open(root / "jsonl" / "test.jsonl", "w") as handle:
        for post in test_posts:
            record = {"text": post.text, "image": post.image, "keyphrases": list(post.keyphrases)}
            handle.write(json.dumps(record) + "\n")
    posts = [
        post for split in ("train", "valid", "test") for _, post in iter_records(root / "raw" / f"{split}_src.txt")
    ]
    posts += [post for _, post in iter_records(root / "json" / "valid_subset.json")]
    write_post_images(posts, root / "images")
    write_post_images(posts, root / "images_wide", size=WIDE_IMAGE)  # non-square grids, tiled images
    info = {
        "raw_train": {"file_name": "raw/train_src.txt", "formatting": "cmkp"},
        "raw_test": {"file_name": "raw/test_src.txt", "formatting": "cmkp"},
        "json_valid": {"file_name": "json/valid_subset.json", "formatting": "cmkp"},
        "jsonl_test": {"file_name": "jsonl/test.jsonl", "formatting": "cmkp"},
        "custom_instruction": {
            "file_name": "raw/test_src.txt",
            "formatting": "cmkp",
            "cmkp": {"instruction": "List the hashtags of this post."},
        },
    }
    (root / "dataset_info.json").write_text(json.dumps(info, indent=2))
    return root


def tiny_train_config(model: Path, template: str, dataset_dir: Path, output_dir: Path, **overrides: Any) -> dict:
    """A few-step LoRA SFT config on the tiny model; ``lm_head`` trains too so the loss can move."""
    config = {
        "model_name_or_path": str(model),
        "stage": "sft",
        "do_train": True,
        "finetuning_type": "lora",
        "lora_rank": 4,
        "lora_target": "all",
        "additional_target": "lm_head",
        "dataset": "raw_train",
        "dataset_dir": str(dataset_dir),
        "media_dir": str(dataset_dir / "images"),
        "template": template,
        "cutoff_len": 512,
        "max_samples": 16,
        "output_dir": str(output_dir),
        "overwrite_output_dir": True,
        "per_device_train_batch_size": 2,
        "max_steps": 3,
        "learning_rate": 1.0e-3,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "preprocessing_num_workers": 1,
        "seed": 7,
    }
    config.update(overrides)
    return config


def llamafactory_data(model: Path, template: str, dataset_dir: Path, out: Path, **overrides: Any):
    """What ``run_sft`` does before the model: parse args, load tokenizer/processor and template, tokenize the data.

    Returns ``(train_dataset, tokenizer_module, template)``.
    """
    from llamafactory.data import get_dataset, get_template_and_fix_tokenizer
    from llamafactory.hparams import get_train_args
    from llamafactory.model import load_tokenizer

    config = tiny_train_config(model, template, dataset_dir, out, **overrides)
    model_args, data_args, training_args, _, _ = get_train_args(config)
    tokenizer_module = load_tokenizer(model_args)
    template_obj = get_template_and_fix_tokenizer(tokenizer_module["tokenizer"], data_args)
    dataset = get_dataset(template_obj, model_args, data_args, training_args, stage="sft", **tokenizer_module)
    return dataset["train_dataset"], tokenizer_module, template_obj


def run_llamafactory(
    config: dict | Path, workdir: Path, *cli_overrides: str, timeout: int = 600, **env: str
) -> subprocess.CompletedProcess:
    """Run ``llamafactory-cli train CONFIG`` as a user would; ``config`` is a dict (written as YAML) or a file."""
    if isinstance(config, dict):
        path = workdir / "config.yaml"
        workdir.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(config))
    else:
        path = config

    def run() -> subprocess.CompletedProcess:
        return subprocess.run(
            ["llamafactory-cli", "train", str(path), *cli_overrides],
            cwd=REPO,
            env=subprocess_env(**env),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,  # LLaMA-Factory logs to stdout, Python errors go to stderr: read them together
            text=True,
            timeout=timeout,
        )

    result = run()
    if isinstance(config, dict) and exit_abort_after_training(result, env):
        shutil.rmtree(config["output_dir"], ignore_errors=True)  # LLaMA-Factory refuses a non-empty output_dir
        first = result.stdout
        result = run()
        result.stdout = f"{first}\n[tests] the run above was repeated after a rank's exit abort:\n{result.stdout}"
    return result


def exit_abort_after_training(result: subprocess.CompletedProcess, env: dict[str, str]) -> bool:
    """A multi-rank CPU (gloo) run whose training completed, but one rank then aborted on its way out ("terminate
    called without an active exception", exit -6). Seen with torch 2.10 in about one 2-rank run in ten on this
    2-core machine, more often under load; the cause (somewhere in the process teardown after LLaMA-Factory's
    destroy_process_group) is not found yet. Such a run is repeated once; a second abort, or any other failure,
    fails the test. The abort is recognised by its signal (torchrun's "exitcode: -6") and message after a completed
    training, not by the absence of earlier tracebacks: the aborting rank may print one on its way out (an exception
    ignored in a destructor) before rank 0 logs "Training completed"."""
    return (
        result.returncode != 0
        and env.get("NPROC_PER_NODE", "1") != "1"
        and "Training completed" in result.stdout
        and "terminate called without an active exception" in result.stdout
        and "(exitcode: -6)" in result.stdout
    )


def read_trace(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.fixture
def llamafactory_runner(tmp_path: Path) -> Callable[..., subprocess.CompletedProcess]:
    def run(config: dict | Path, *cli_overrides: str, **env: str) -> subprocess.CompletedProcess:
        return run_llamafactory(config, tmp_path, *cli_overrides, **env)

    return run
