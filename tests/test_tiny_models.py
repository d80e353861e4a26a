"""Tiny models: deterministic, cached builds, the realistic 24x24 LLaVA grid, and Qwen2.5-VL training."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from aimkp_plugin.models.tiny import BUILD_MARKER, TINY_MODELS, build_tiny_model

from .helpers import TINY_DIR, load_through_llamafactory, tiny_train_config


def folder_digest(folder: Path) -> dict[str, str]:
    return {
        path.name: hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.iterdir())
        if path.name != BUILD_MARKER
    }


def test_builds_are_deterministic(tmp_path: Path) -> None:
    first = build_tiny_model("llava", tmp_path / "a")
    second = build_tiny_model("llava", tmp_path / "b")
    assert folder_digest(first) == folder_digest(second)
    assert {"model.safetensors", "config.json", "tokenizer.json", "processor_config.json"} <= set(folder_digest(first))


def test_matching_build_is_reused_and_force_rebuilds(tmp_path: Path) -> None:
    path = build_tiny_model("llava", tmp_path / "m")
    weights = path / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    build_tiny_model("llava", path)
    assert weights.stat().st_mtime_ns == stamp
    build_tiny_model("llava", path, force=True)
    assert weights.stat().st_mtime_ns != stamp


def test_llava_576_has_the_real_24x24_grid_and_stays_small(cmkp_workspace: Path, tmp_path: Path) -> None:
    path = build_tiny_model("llava-576", TINY_DIR / "llava-576")
    assert (path / "model.safetensors").stat().st_size < 5_000_000
    train, tokenizer = load_through_llamafactory(path, "llava", cmkp_workspace, "raw_test", tmp_path, cutoff_len=1024)
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    assert train[0]["input_ids"].count(image_id) == 576 == 24 * 24


def test_every_tiny_model_is_small_and_each_family_has_one_of_its_name() -> None:
    from aimkp_plugin.families import FAMILIES
    from aimkp_plugin.models.tiny import TINY_ALIASES, tiny_spec

    assert {family.name for family in FAMILIES} <= set(TINY_MODELS)
    assert set(TINY_MODELS) - {family.name for family in FAMILIES} == {"llava-576", "internvl-448"}
    for alias, name in TINY_ALIASES.items():  # the earlier names keep working
        assert tiny_spec(alias) is TINY_MODELS[name]
    for spec in TINY_MODELS.values():
        assert spec.hidden_size <= 64 and spec.num_layers <= 4  # Qwen3.5: three linear-attention layers and one full


def test_every_projector_weight_is_random(tiny_models: dict) -> None:
    """No weight matrix of a tiny model's projector is all zeros (transformers initialises some to zero, and image
    features of 0 would hide where image content lands)."""
    from safetensors.torch import load_file

    from aimkp_plugin.families import FAMILIES

    for family in FAMILIES:
        weights = load_file(tiny_models[family.name] / "model.safetensors")
        projector = {name: tensor for name, tensor in weights.items() if f".{family.projector}." in f".{name}"}
        assert projector, family.name
        for name, tensor in projector.items():
            assert tensor.dim() < 2 or tensor.float().std() > 0, f"{family.name}: {name} is constant"


@pytest.mark.e2e
def test_tiny_qwen2_5vl_trains(tiny_models: dict, cmkp_workspace: Path, tmp_path: Path, llamafactory_runner) -> None:
    path = tiny_models["qwen2_5_vl"]
    config = tiny_train_config(path, "qwen2_vl", cmkp_workspace, tmp_path / "out", max_steps=2)
    result = llamafactory_runner(config)
    assert result.returncode == 0, result.stdout[-4000:]
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()


def test_cli_names_unknown_tiny_models_and_its_parser_imports_no_torch(tmp_path: Path) -> None:
    import subprocess
    import sys

    from .helpers import subprocess_env

    result = subprocess.run(
        ["aimkp", "models", "tiny", "--out", str(tmp_path), "--name", "llava", "bogus"],
        env=subprocess_env(),
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2 and "unknown model(s) bogus; choose from: llava, llava-576" in result.stderr
    assert not any(tmp_path.iterdir())  # nothing built before the names were checked
    probe = "import sys, aimkp_plugin.cli as cli; cli.build_parser(); print('torch' in sys.modules)"
    imported = subprocess.run([sys.executable, "-c", probe], env=subprocess_env(), capture_output=True, text=True)
    assert imported.stdout.strip() == "False", imported.stderr
