"""Keyphrase metrics in both styles on hand-computed cases, and ``aimkp eval`` on real files."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from aimkp_plugin.evaluation.metrics import aimkp_sample, cmkp_sample, score, split_prediction
from aimkp_plugin.evaluation.predictions import PredictionFormatError, read_pairs

from .helpers import REPO, subprocess_env


def pair(gold: str, prediction: str) -> tuple[list[str], list[str]]:
    return [phrase.strip() for phrase in gold.split(",")], split_prediction(prediction)


# Each case: gold, prediction, aimkp (F1@1, F1@3, MAP@5), cmkp (P@1, R@1, P@3, R@3, AP@5), computed by hand.
CASES = {
    # "Dog House" is not lower-cased in the aimkp style, so it misses "dog house"; cmkp lower-cases it.
    "case": (
        "cats, dog house",
        "cat, Dog House, bird",
        (2 / 3, 0.4, (1 + 1 / 2 + 1 / 3) / 3),
        (1, 1 / 2, 2 / 3, 1, 1),
    ),
    # duplicates after stemming: aimkp keeps both ranks, cmkp deduplicates
    "duplicates": ("dog", "cat, cats, dog", (0, 0.5, (0 + 0 + 1 / 3) / 3), (0, 0, 1 / 2, 1, 1 / 2)),
    # fewer than k predictions: aimkp divides by k, cmkp by the number predicted
    "fewer_than_k": ("dog, cat", "dog", (2 / 3, 0.4, 1.0), (1, 1 / 2, 1, 1 / 2, 1 / 2)),
    # an empty prediction scores 0 in both
    "empty": ("dog", "", (0, 0, 0), (0, 0, 0, 0, 0)),
    # stemming collision in gold: both phrases stem to "run shoe", one gold phrase is left
    "stem_collision": ("running shoes, run shoe", "run shoe", (1.0, 0.5, 1.0), (1, 1, 1, 1, 1)),
    # junk: cmkp drops a "." prediction; aimkp keeps it at rank 1
    "junk": ("cat", "., cat", (0, 0.5, (0 + 1 / 2) / 2), (1, 1, 1, 1, 1)),
    # empty pieces keep their rank in the aimkp style
    "empty_piece": ("b", "a, , b", (0, 0.5, (0 + 0 + 1 / 3) / 3), (0, 0, 1 / 3, 1, 1 / 3)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_per_sample_scores_match_hand_computation(name: str) -> None:
    gold, prediction, aimkp, cmkp = CASES[name]
    assert aimkp_sample(*pair(gold, prediction)) == pytest.approx(aimkp, abs=1e-12)
    assert cmkp_sample(*pair(gold, prediction)) == pytest.approx(cmkp, abs=1e-12)


def test_aimkp_averages_per_sample_f1_and_cmkp_takes_f1_of_macro_averages() -> None:
    pairs = [pair("a", "a"), pair("b", "x")]  # P@1 = (1 + 0) / 2, R@1 = (1 + 0) / 2
    assert score(pairs, "aimkp")["f1@1"] == pytest.approx(50.0)  # mean of 1 and 0
    assert score(pairs, "cmkp")["f1@1"] == pytest.approx(50.0)  # 2 * .5 * .5 / (.5 + .5)
    pairs = [pair("a, b", "a"), pair("c", "c, d")]  # F1s differ from F1 of means here
    aimkp = score(pairs, "aimkp")
    assert aimkp["f1@1"] == pytest.approx(100 * ((2 * 1 * 0.5 / 1.5) + 1) / 2)
    cmkp = score(pairs, "cmkp")
    precision, recall = (1 + 1) / 2, (0.5 + 1) / 2
    assert cmkp["f1@1"] == pytest.approx(100 * 2 * precision * recall / (precision + recall))
    assert aimkp["n"] == cmkp["n"] == 2


def test_docs_worked_example_diverges() -> None:
    """docs/evaluation.md's example: the same predictions, different numbers (and the page states those numbers)."""
    text = " ".join((REPO / "docs" / "evaluation.md").read_text().split())
    stated = "aimkp style F1@1 50.00, F1@3 50.00, MAP@5 43.06; cmkp style F1@1 50.00, F1@3 66.67, MAP@5 75.00"
    assert stated in text
    pairs = [pair("dog", "cat, cats, dog"), pair("human rights", "human right, rights")]
    # aimkp: F1@3 = mean(0.5, 0.5); MAP@5 = mean((0 + 0 + 1/3) / 3, (1 + 1/2) / 2)
    assert score(pairs, "aimkp") == pytest.approx({"f1@1": 50.0, "f1@3": 50.0, "map@5": 43.0555556, "n": 2})
    # cmkp: dedup gives [cat, dog] and [human right, right]; P@3 = mean(1/2, 1/2), R@3 = 1; AP = mean(1/2, 1)
    assert score(pairs, "cmkp") == pytest.approx({"f1@1": 50.0, "f1@3": 66.6666667, "map@5": 75.0, "n": 2})


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_reads_llamafactory_jsonl_and_plain_text(tmp_path: Path) -> None:
    rows = [{"prompt": "p", "predict": "a, b", "label": "a\n"}, {"prompt": "p", "predict": "", "label": "c, d"}]
    jsonl = write(tmp_path / "generated_predictions.jsonl", "\n".join(json.dumps(row) for row in rows) + "\n\n")
    assert read_pairs(jsonl) == [(["a"], ["a", "b"]), (["c", "d"], [""])]
    text = write(tmp_path / "preds.txt", "human rights;un<sep>human rights, un\n")
    assert read_pairs(text) == [(["human rights", "un"], ["human rights", "un"])]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"predict": "a", "label": "a"}\nnot json\n', "line 2: not valid JSON"),
        ('{"predict": "a"}\n', "line 1: missing or non-string field(s) label"),
        ('{"predict": "a", "label": "  "}\n', "line 1: empty gold keyphrases"),
        ("[1, 2]\n", "line 1: expected a JSON object"),
    ],
)
def test_bad_jsonl_lines_are_named(tmp_path: Path, content: str, message: str) -> None:
    with pytest.raises(PredictionFormatError, match=re.escape(message)):
        read_pairs(write(tmp_path / "p.jsonl", content))


def test_text_line_without_separator_is_named(tmp_path: Path) -> None:
    with pytest.raises(PredictionFormatError, match=r"p.txt, line 2: expected gold<sep>prediction"):
        read_pairs(write(tmp_path / "p.txt", "a<sep>a\nno separator\n"))


def run_eval(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["aimkp", "eval", *args], env=subprocess_env(), capture_output=True, text=True)


def test_cli_prints_a_table_and_json(tmp_path: Path) -> None:
    path = write(tmp_path / "generated_predictions.jsonl", json.dumps({"predict": "cat, dog", "label": "dog"}) + "\n")
    table = run_eval(str(path), "--style", "both")
    assert table.returncode == 0 and "aimkp style" in table.stdout and "cmkp style" in table.stdout
    assert "F1@3" in table.stdout and "MAP@5" in table.stdout
    result = json.loads(run_eval(str(path), "--json").stdout)
    assert set(result) == {"f1@1", "f1@3", "map@5", "n"} and result["n"] == 1
    assert result["f1@3"] == pytest.approx(100 * 2 * (1 / 3) * 1 / (1 / 3 + 1))


def test_cli_reports_bad_input_with_line_number(tmp_path: Path) -> None:
    result = run_eval(str(write(tmp_path / "p.jsonl", "{oops\n")))
    assert result.returncode == 2 and "p.jsonl, line 1: not valid JSON" in result.stderr


def test_scores_real_cmkp_gold_against_itself(cmkp_data: Path, tmp_path: Path) -> None:
    """The real validation split scored against its own gold: every F1@1 hit, and a reference for both styles."""
    lines = (cmkp_data / "raw" / "tw_mm_s1" / "valid_src.txt").read_text().splitlines()
    golds = [line.split("<sep>")[1] for line in lines]
    path = write(tmp_path / "self.txt", "\n".join(f"{gold}<sep>{gold.replace(';', ', ')}" for gold in golds) + "\n")
    pairs = read_pairs(path, progress=False)
    assert len(pairs) == 5370
    for style in ("aimkp", "cmkp"):
        result = score(pairs, style)
        assert result["f1@1"] > 60 and result["map@5"] > 99.9, (style, result)


# ---------------------------------------------------------------- the three input settings


@pytest.mark.parametrize("setting", ["full", "text_only", "image_only"])
def test_input_setting_shapes_the_prompt(setting: str, tiny_models: dict, cmkp_workspace: Path, tmp_path: Path):
    from aimkp_plugin.data.cmkp import DEFAULT_INSTRUCTION, iter_records

    from .helpers import load_through_llamafactory

    train, tokenizer = load_through_llamafactory(
        tiny_models["llava"], "llava", cmkp_workspace, "raw_test", tmp_path, aimkp_input_setting=setting
    )
    text = tokenizer.decode(train[0]["input_ids"])
    post = next(iter_records(cmkp_workspace / "raw" / "test_src.txt"))[1]
    assert text.count("<image>") == (0 if setting == "text_only" else 16)
    assert (post.text in text) == (setting != "image_only")
    assert DEFAULT_INSTRUCTION in text


@pytest.mark.e2e
@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_predict_in_three_settings_and_score(family: str, tiny_models: dict, cmkp_workspace: Path, tmp_path: Path):
    """The shipped predict recipes' setting key, on the tiny model: each setting predicts and scores."""
    from .helpers import run_side_by_side

    template = {"llava": "llava", "qwen2_vl": "qwen2_vl"}[family]
    configs = {
        setting: {
            "model_name_or_path": str(tiny_models[family]),
            "stage": "sft",
            "do_predict": True,
            "finetuning_type": "lora",
            "eval_dataset": "raw_test",
            "dataset_dir": str(cmkp_workspace),
            "media_dir": str(cmkp_workspace / "images"),
            "template": template,
            "cutoff_len": 512,
            "max_samples": 3,
            "output_dir": str(tmp_path / setting),
            "overwrite_output_dir": True,
            "per_device_eval_batch_size": 3,
            "predict_with_generate": True,
            "max_new_tokens": 8,
            "report_to": "none",
            "aimkp_input_setting": setting,
        }
        for setting in ("full", "text_only", "image_only")
    }
    for setting, result in run_side_by_side(configs, tmp_path).items():
        assert result.returncode == 0, result.stdout[-3000:]
        out = tmp_path / setting
        rows = [json.loads(line) for line in (out / "generated_predictions.jsonl").open()]
        assert len(rows) == 3
        image_marker = "<image>" if family == "llava" else "<|image_pad|>"
        assert (image_marker in rows[0]["prompt"]) == (setting != "text_only")
        scored = json.loads(run_eval(str(out / "generated_predictions.jsonl"), "--json").stdout)
        assert scored["n"] == 3


def test_compare_builds_table_json_and_chart(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    outcomes = {
        "sft": {"full": "a, b", "text_only": "a", "image_only": "x"},
        "aimkp": {"full": "a", "text_only": "a", "image_only": "b, a"},
    }
    for method, settings in outcomes.items():
        for setting, prediction in settings.items():
            folder = runs / method / f"predict_{setting}"
            folder.mkdir(parents=True)
            (folder / "generated_predictions.jsonl").write_text(
                json.dumps({"predict": prediction, "label": "a"}) + "\n"
            )
    folders = [str(runs / method / f"predict_{setting}") for method in outcomes for setting in outcomes[method]]
    result = subprocess.run(
        ["aimkp", "compare", *folders, "--out", str(tmp_path / "cmp")],
        env=subprocess_env(),
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert "| sft | image_only | 0.00 | 0.00 | 0.00 | 1 |" in result.stdout
    assert "| aimkp | image_only | 0.00 | 50.00 | 25.00 | 1 |" in result.stdout  # MAP: (0 + 1/2) / 2
    rows = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert {(row["method"], row["setting"]) for row in rows} == {(m, s) for m in outcomes for s in outcomes[m]}
    assert (tmp_path / "cmp" / "compare.png").stat().st_size > 5000


def test_compare_names_a_run_without_predictions(tmp_path: Path) -> None:
    result = subprocess.run(["aimkp", "compare", str(tmp_path)], env=subprocess_env(), capture_output=True, text=True)
    assert result.returncode == 2 and "no generated_predictions.jsonl" in result.stderr


@pytest.mark.e2e
def test_select_best_epoch_by_keyphrase_metrics(tiny_models: dict, cmkp_workspace: Path, tmp_path: Path) -> None:
    """A 2-epoch AimKP run evaluating on cmkp data with generation logs the four keyphrase metrics each epoch, picks
    the best checkpoint by ``eval_aimkp_score``, decodes with the run's generation keys, and its numbers are what
    ``aimkp eval`` gives on the same predictions."""
    from transformers import AutoTokenizer

    from .helpers import run_llamafactory, tiny_train_config

    out = tmp_path / "run"
    config = tiny_train_config(
        tiny_models["llava"],
        "llava",
        cmkp_workspace,
        out,
        aimkp=True,
        max_samples=6,
        max_steps=-1,
        num_train_epochs=2,
        per_device_train_batch_size=3,
        eval_dataset="raw_test",
        eval_strategy="epoch",
        save_strategy="epoch",
        per_device_eval_batch_size=4,  # 6 posts: a padded last batch, gathered with -100
        predict_with_generate=True,
        max_new_tokens=3,
        num_beams=2,
        do_sample=False,
        metric_for_best_model="eval_aimkp_score",
        load_best_model_at_end=True,
    )
    result = run_llamafactory(config, tmp_path)
    assert result.returncode == 0, result.stdout[-3000:]
    state = json.loads((out / "trainer_state.json").read_text())
    evaluations = [entry for entry in state["log_history"] if "eval_aimkp_score" in entry]
    assert [entry["epoch"] for entry in evaluations] == [1.0, 2.0]
    best = max(evaluations, key=lambda entry: entry["eval_aimkp_score"])
    assert state["best_model_checkpoint"] == str(out / f"checkpoint-{best['step']}")
    assert state["best_metric"] == best["eval_aimkp_score"]
    tokenizer = AutoTokenizer.from_pretrained(tiny_models["llava"])
    for entry in evaluations:
        assert {"eval_rouge-1", "eval_bleu-4"} <= set(entry)  # LLaMA-Factory's own metrics stay
        predictions = out / "aimkp_eval" / f"eval_step{entry['step']}.jsonl"
        rows = [json.loads(line) for line in predictions.read_text().splitlines()]
        assert len(rows) == 6
        lengths = [len(tokenizer(row["predict"], add_special_tokens=False).input_ids) for row in rows]
        # max_new_tokens: 3 reached generation (without the run's keys the tiny model rambles for hundreds of tokens;
        # a generated byte token can decode to "\ufffd", which re-tokenizes into a few)
        assert max(lengths) <= 12, lengths
        scored = json.loads(run_eval(str(predictions), "--json").stdout)
        expected = {f"eval_aimkp_{name}": scored[key] for key, name in (("f1@1", "f1_at_1"), ("f1@3", "f1_at_3"))}
        expected["eval_aimkp_map_at_5"] = scored["map@5"]
        for key, value in expected.items():
            assert entry[key] == pytest.approx(value, abs=1e-9), key
        total = scored["f1@1"] + scored["f1@3"] + scored["map@5"]
        assert entry["eval_aimkp_score"] == pytest.approx(total, abs=1e-9)
    # the evaluation after training (of the best checkpoint, loaded at the end) keeps the epochs' files as they were
    assert (out / "aimkp_eval" / f"eval_final_step{evaluations[-1]['step']}.jsonl").is_file()


@pytest.mark.e2e
def test_keyphrase_metric_for_best_model_needs_keyphrase_evaluation(
    tiny_models: dict, cmkp_workspace: Path, tmp_path: Path
) -> None:
    """Without generation, eval_aimkp_score is never reported: the run stops before the model loads."""
    from .helpers import run_llamafactory, tiny_train_config

    config = tiny_train_config(
        tiny_models["llava"],
        "llava",
        cmkp_workspace,
        tmp_path / "run",
        eval_dataset="raw_test",
        eval_strategy="epoch",
        save_strategy="epoch",
        metric_for_best_model="eval_aimkp_score",
        load_best_model_at_end=True,
    )
    result = run_llamafactory(config, tmp_path)
    assert result.returncode != 0
    assert "metric_for_best_model: eval_aimkp_score is reported only by a generating evaluation" in result.stdout
    assert "trainable params" not in result.stdout
