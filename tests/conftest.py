"""Shared fixtures: tiny models built from config, real CMKP records with generated images, and a runner for the
real ``llamafactory-cli``."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from aimkp_plugin.data.cmkp import iter_records
from aimkp_plugin.data.demo import write_post_images

from .helpers import CMKP, FAMILY_NAMES, JSON_SUBSET, TINY_DIR, WIDE_IMAGE, WarmCli, run_llamafactory, subprocess_env


for _key, _value in subprocess_env().items():  # the in-process LLaMA-Factory calls see the same setup
    if _key in ("HF_HOME", "HF_DATASETS_CACHE", "MPLCONFIGDIR", "HF_HUB_OFFLINE", "TOKENIZERS_PARALLELISM"):
        os.environ.setdefault(_key, _value)


@pytest.fixture(scope="session", autouse=True)
def warm_cli() -> Iterator[None]:
    """The warm ``llamafactory-cli`` (``helpers.WarmCli``) starts with the first run it takes and stops here."""
    yield
    WarmCli.stop_shared()


@pytest.fixture(scope="session")
def cmkp_data() -> Path:
    if not (CMKP / "raw" / "tw_mm_s1_tiny" / "train_src.txt").is_file():
        pytest.fail(f"The CMKP sample records are missing: expected them under {CMKP} (set AIMKP_SHARED_DIR).")
    return CMKP


@pytest.fixture(scope="session")
def tiny_models() -> dict[str, Path]:
    from aimkp_plugin.models.tiny import build_tiny_models

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


@pytest.fixture
def llamafactory_runner(tmp_path: Path) -> Callable[..., subprocess.CompletedProcess]:
    def run(config: dict | Path, *cli_overrides: str, **env: str) -> subprocess.CompletedProcess:
        return run_llamafactory(config, tmp_path, *cli_overrides, **env)

    return run
