"""Every multimodal template of LLaMA-Factory's registry has an answer (first-class, the same code as a family, or
refused), `aimkp models families --templates` lists them all, and a refused template stops a run before the model
loads with its reason."""

from __future__ import annotations

import json
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from aimkp_plugin.families import FAMILIES, FAMILY_TABLE
from aimkp_plugin.families.templates import FIRST_CLASS, NO_ANSWER, OTHER_TEMPLATES, REFUSED, template_answers
from aimkp_plugin.integration.templates import multimodal_templates

from .helpers import REPO, run_llamafactory, subprocess_env, tiny_train_config


@pytest.mark.compat
def test_every_multimodal_template_of_llamafactory_has_an_answer() -> None:
    """Read from the installed LLaMA-Factory's registry: a template a new release adds fails here until it has an
    answer in ``aimkp_plugin/families/templates.py``."""
    registry = multimodal_templates()
    assert len(registry) >= 48 and {"llava", "qwen2_vl", "mllama", "qwen2_audio"} <= set(registry)
    answers = template_answers(registry)
    assert [answer.template for answer in answers if answer.reason == NO_ANSWER] == []
    family_names = {family.name for family in FAMILIES}
    for answer in answers:
        assert answer.model_types and answer.plugin == registry[answer.template]
        if answer.status.startswith("same code as "):
            family = answer.status.removeprefix("same code as ")
            assert family in family_names, answer
            assert all(FAMILY_TABLE[model_type].name == family for model_type in answer.model_types), answer
            assert answer.reason.startswith("not tested with a tiny model of its own")
        else:
            assert answer.status in (FIRST_CLASS, REFUSED), answer


def test_no_template_is_both_first_class_and_listed_among_the_others() -> None:
    first_class = {template for family in FAMILIES for template in family.templates}
    assert first_class & set(OTHER_TEMPLATES) == set()


def test_cli_lists_every_template_as_json_lines() -> None:
    result = subprocess.run(
        ["aimkp", "models", "families", "--templates"],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        check=True,
    )
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [row["template"] for row in rows] == list(multimodal_templates())
    assert {row["status"] for row in rows} >= {FIRST_CLASS, REFUSED, "same code as llava"}
    assert all(set(row) == {"template", "model_types", "status", "reason", "plugin"} for row in rows)


def test_docs_table_lists_every_template() -> None:
    """docs/families.md holds the table `aimkp models families --templates --markdown` prints."""
    from aimkp_plugin.cli import templates_markdown

    answers = template_answers(multimodal_templates())
    assert templates_markdown(answers) in (REPO / "docs" / "families.md").read_text()


# one template per kind of reason; each stops before the dataset and the model load
REFUSED_KINDS = {
    "minicpm_v": "run their own model code (trust_remote_code)",
    "llava_next_video": "a video model",
    "qwen2_audio": "an audio model",
    "qwen2_omni": "an omni model",
    "gemma3n": "no family module of aimkp-plugin describes its image layout",
}


@pytest.fixture(scope="module")
def refused_runs(tiny_models: dict, cmkp_workspace: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The runs of REFUSED_KINDS on the tiny LLaVA, two side by side: template -> result."""
    root = tmp_path_factory.mktemp("refused_templates")

    def run(template: str) -> subprocess.CompletedProcess:
        config = tiny_train_config(tiny_models["llava"], template, cmkp_workspace, root / template, aimkp=True)
        return run_llamafactory(config, root / f"{template}-run")

    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip(REFUSED_KINDS, pool.map(run, REFUSED_KINDS), strict=True))


@pytest.mark.e2e
@pytest.mark.parametrize("template", list(REFUSED_KINDS))
def test_refused_template_stops_before_loading_with_its_reason(template: str, refused_runs: dict) -> None:
    result = refused_runs[template]
    assert result.returncode != 0
    assert f"aimkp: true does not support template: {template}: " in result.stdout
    assert REFUSED_KINDS[template] in result.stdout
    assert "Loading dataset" not in result.stdout and "loading weights" not in result.stdout.lower()
