"""Every shipped recipe parses through LLaMA-Factory's own argument parser with the plugin active."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from aimkp_plugin.data.demo import demo_dataset_info
from aimkp_plugin.integration.args import active_arguments

from .helpers import REPO


RECIPES = sorted((REPO / "recipes").rglob("*.yaml"))


def test_all_expected_recipes_exist() -> None:
    names = {path.relative_to(REPO / "recipes").as_posix() for path in RECIPES}
    families = (
        "llava",
        "qwen2vl",
        "qwen2_5vl",
        "qwen3vl",
        "qwen3_vl_moe",
        "qwen3_5",
        "internvl",
        "gemma3",
        "llava_next",
        "mistral3",
        "pixtral",
        "paligemma",
        "lfm2_vl",
        "llama4",
    )
    for family in families:
        assert {f"aimkp_{family}.yaml", f"sft_{family}.yaml", f"predict_{family}.yaml"} <= names
        assert {f"predict_{family}_text_only.yaml", f"predict_{family}_image_only.yaml"} <= names
    assert {"demo/demo_llava_train.yaml", "demo/demo_llava_predict.yaml"} <= names
    assert {"aimkp_llava_select_best.yaml", "predict_llava_authors_decoding.yaml"} <= names


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda path: path.relative_to(REPO / "recipes").as_posix())
def test_recipe_parses_with_llamafactory(recipe: Path, tmp_path: Path) -> None:
    from llamafactory.hparams import get_train_args, read_args

    config = yaml.safe_load(recipe.read_text())
    text = recipe.read_text()
    assert "swap" in text.lower(), "each recipe says how to swap the model"
    config["output_dir"] = str(tmp_path)  # keep the parser's checks from touching saves/
    if config.get("bf16"):
        config["use_cpu"] = True  # this CPU has no bf16 GPU; the recipe itself targets GPUs
    model_args, data_args, training_args, finetuning_args, _ = get_train_args(read_args(config))
    assert finetuning_args.stage == "sft"
    expects_aimkp = recipe.name.startswith("aimkp_") or recipe.name == "demo_llava_train.yaml"
    if recipe.name.startswith("predict_"):
        setting = next((name for name in ("text_only", "image_only") if recipe.stem.endswith(name)), "full")
        assert active_arguments().aimkp_input_setting == setting
    assert (active_arguments() is not None and active_arguments().aimkp) == expects_aimkp
    if recipe.name.startswith("aimkp_"):
        assert active_arguments().aimkp_text_threshold == 0.1 and active_arguments().aimkp_image_threshold == 0.4
        assert (finetuning_args.lora_rank, finetuning_args.lora_alpha) == (128, 256)
        assert finetuning_args.lora_dropout == 0.05 and active_arguments().aimkp_projector_lr == 2e-5
        assert training_args.learning_rate == 2e-4 and training_args.num_train_epochs == 4
        assert training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps == 16
    if recipe.name == "aimkp_llava_select_best.yaml":
        assert training_args.metric_for_best_model == "eval_aimkp_score" and training_args.load_best_model_at_end
        assert training_args.predict_with_generate and data_args.eval_dataset == ["cmkp_valid"]


def test_dataset_info_lists_cmkp_splits_and_the_demo() -> None:
    info = json.loads((REPO / "data" / "dataset_info.json").read_text())
    for split in ("train", "valid", "test"):
        assert info[f"cmkp_{split}"]["file_name"].endswith(f"{split}_src.txt")
        assert info[f"cmkp_json_{split}"]["file_name"].endswith(f"{split}.json")
    assert {key: value for key, value in info.items() if key.startswith("cmkp_demo")} == demo_dataset_info("demo/")
    assert all(entry["formatting"] == "cmkp" for entry in info.values())


def short_families_markdown(families) -> str:
    """The README's short "Supported models" table: model types, templates, projector, fast step, tiny models."""
    lines = [
        "| family (`model_type`) | LLaMA-Factory template | projector (`additional_target`) | fast step | tiny "
        "model |",
        "|---|---|---|---|---|",
    ]
    for family in families:
        types = ", ".join(f"`{model_type}`" for model_type in family.model_types)
        if family.vision_model_types:  # a model type shared by two families: the vision tower tells them apart
            types += " with a " + ", ".join(f"`{tower}`" for tower in family.vision_model_types) + " vision tower"
        templates = ", ".join(f"`{template}`" for template in family.templates)
        tiny = ", ".join(f"`{spec.name}`" for spec in family.tiny_models)
        fast = "yes" if family.has_fast_step else "no"
        lines.append(f"| {types} | {templates} | `{family.projector}` | {fast} | {tiny} |")
    return "\n".join(lines)


def test_readme_and_docs_list_every_model_family() -> None:
    """docs/families.md holds the full table ``aimkp models families`` prints from the family modules; the README's
    "Supported models" table has every family's short row, from the same modules."""
    from aimkp_plugin.cli import families_markdown
    from aimkp_plugin.families import FAMILIES

    assert families_markdown(FAMILIES) in (REPO / "docs" / "families.md").read_text()
    assert short_families_markdown(FAMILIES) in (REPO / "README.md").read_text()
