"""The ``cmkp`` dataset format: the three input forms on real CMKP records, and every bad-record case."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from aimkp_plugin.data.cmkp import (
    DEFAULT_INSTRUCTION,
    CmkpFormatError,
    CmkpPost,
    RecordError,
    build_answer,
    build_prompt,
    iter_records,
    load_cmkp_files,
    parse_json_record,
    parse_raw_line,
)
from aimkp_plugin.data.demo import draw_post_image, write_post_images

from .helpers import load_through_llamafactory, tiny_train_config


# ---------------------------------------------------------------- parsing, pure


def test_raw_line_uses_the_url_file_name_and_splits_keyphrases() -> None:
    post = parse_raw_line("Some Text here<sep>Human Rights;UN <sep>https://pbs.twimg.com/media/D357lLwWAAAm4E3.jpg")
    assert post == CmkpPost("Some Text here", ("human rights", "un"), "D357lLwWAAAm4E3.jpg")


@pytest.mark.parametrize("keyphrases", [["a b", "C"], "a b, C", "a b;C", "a b ; c ;"])
def test_json_record_keyphrases_as_list_or_separated_string(keyphrases: object) -> None:
    post = parse_json_record({"text": "t", "image": "x.jpg", "keyphrases": keyphrases})
    assert post.keyphrases == ("a b", "c")


def test_aimkp_record_without_text_field_recovers_it_from_the_human_turn() -> None:
    record = {
        "image": "x.jpg",
        "conversations": [
            {"from": "human", "value": f"<image>post text\n{DEFAULT_INSTRUCTION}"},
            {"from": "gpt", "value": "kca, red carpet"},
        ],
    }
    assert parse_json_record(record) == CmkpPost("post text", ("kca", "red carpet"), "x.jpg")


def test_prompt_and_answer_follow_the_spec() -> None:
    assert build_prompt("a post") == "<image>a post\nWhat phrases should be used to tag the media?"
    assert build_answer(["Human Rights", "un"]) == "human rights, un"


def test_all_real_tiny_records_parse(cmkp_data: Path) -> None:
    counts = {}
    for split in ("train", "valid", "test"):
        items = [item for _, item in iter_records(cmkp_data / "raw" / "tw_mm_s1_tiny" / f"{split}_src.txt")]
        assert all(isinstance(item, CmkpPost) for item in items)
        counts[split] = len(items)
    assert counts == {"train": 200, "valid": 200, "test": 50}


def test_raw_and_aimkp_json_forms_of_the_real_validation_split_agree(cmkp_data: Path) -> None:
    raw = [item for _, item in iter_records(cmkp_data / "raw" / "tw_mm_s1" / "valid_src.txt")]
    aimkp = [item for _, item in iter_records(cmkp_data / "aimkp-json" / "valid.json")]
    assert len(raw) == len(aimkp) == 5370
    assert raw == aimkp


# ---------------------------------------------------------------- through LLaMA-Factory's own loader


@pytest.mark.compat
@pytest.mark.parametrize(
    ("dataset", "records", "source"),
    [("raw_test", 50, "raw/test_src.txt"), ("jsonl_test", 50, "raw/test_src.txt"), ("json_valid", 24, None)],
)
def test_each_input_form_tokenizes_with_the_spec_prompt(
    tiny_models: dict, cmkp_workspace: Path, tmp_path: Path, dataset: str, records: int, source: str | None
) -> None:
    train, tokenizer = load_through_llamafactory(tiny_models["llava"], "llava", cmkp_workspace, dataset, tmp_path)
    assert len(train) == records
    path = cmkp_workspace / (source or "json/valid_subset.json")
    first = next(item for _, item in iter_records(path))
    text = tokenizer.decode(train[0]["input_ids"])
    assert text.count("<image>") == 16  # the tiny LLaVA's 4x4 grid
    assert f"<image>{first.text}\n{DEFAULT_INSTRUCTION}" in text
    answer = tokenizer.decode([token for token in train[0]["labels"] if token != -100], skip_special_tokens=True)
    assert answer.strip() == build_answer(first.keyphrases)


@pytest.mark.compat
def test_instruction_is_configurable_per_dataset(tiny_models: dict, cmkp_workspace: Path, tmp_path: Path) -> None:
    train, tokenizer = load_through_llamafactory(
        tiny_models["llava"], "llava", cmkp_workspace, "custom_instruction", tmp_path
    )
    text = tokenizer.decode(train[0]["input_ids"])
    assert "\nList the hashtags of this post." in text and DEFAULT_INSTRUCTION not in text


@pytest.mark.compat
def test_qwen2vl_tokenizes_the_cmkp_prompt(tiny_models: dict, cmkp_workspace: Path, tmp_path: Path) -> None:
    train, tokenizer = load_through_llamafactory(
        tiny_models["qwen2_vl"], "qwen2_vl", cmkp_workspace, "raw_test", tmp_path
    )
    text = tokenizer.decode(train[0]["input_ids"])
    assert (
        "<|vision_start|><|image_pad|>" in text
        and f"<|vision_end|>{next(iter_records(cmkp_workspace / 'raw' / 'test_src.txt'))[1].text}" in text
    )


# ---------------------------------------------------------------- bad records


@pytest.fixture
def bad_dataset(cmkp_workspace: Path, tmp_path: Path) -> Path:
    """A dataset_dir whose raw file has one good line and one line of each kind of problem."""
    root = tmp_path / "bad"
    (root / "images").mkdir(parents=True)
    good = next(item for _, item in iter_records(cmkp_workspace / "raw" / "test_src.txt"))
    write_post_images([good], root / "images")
    (root / "images" / "broken.jpg").write_bytes(b"this is not a jpeg")
    draw_post_image(good, (256, 256)).save(root / "images" / "truncated.jpg", quality=95)
    whole = (root / "images" / "truncated.jpg").read_bytes()
    (root / "images" / "truncated.jpg").write_bytes(whole[: len(whole) // 3])  # passes verify(), fails to decode
    lines = [
        f"{good.text}<sep>{';'.join(good.keyphrases)}<sep>https://x/{good.image}".encode(),  # 1: good
        b"only text<sep>kp",  # 2: two fields
        f"   <sep>kp<sep>https://x/{good.image}".encode(),  # 3: empty text
        f"text<sep> ; <sep>https://x/{good.image}".encode(),  # 4: no keyphrases
        b"text<sep>kp<sep>https://x/missing.jpg",  # 5: image not found
        b"text<sep>kp<sep>https://x/broken.jpg",  # 6: unreadable image
        b"caf\xe9 text<sep>kp<sep>https://x/a.jpg",  # 7: latin-1 byte, not UTF-8
        f"{good.text}<sep>{good.keyphrases[0]}<sep>{good.image}".encode(),  # 8: good again
        b"text<sep>kp<sep>https://x/truncated.jpg",  # 9: the first third of a JPEG
    ]
    (root / "posts.txt").write_bytes(b"\n".join(lines) + b"\n")
    (root / "truncated.txt").write_bytes(lines[0] + b"\n" + lines[8] + b"\n")
    info = {
        "bad": {"file_name": "posts.txt", "formatting": "cmkp", "cmkp": {"media_dir": "images"}},
        "truncated": {"file_name": "truncated.txt", "formatting": "cmkp", "cmkp": {"media_dir": "images"}},
        "bad_skip": {
            "file_name": "posts.txt",
            "formatting": "cmkp",
            "cmkp": {"media_dir": "images", "skip_bad_records": True},
        },
    }
    (root / "dataset_info.json").write_text(json.dumps(info))
    return root


EXPECTED_PROBLEMS = {
    "line 2": "expected 3 fields",
    "line 3": "empty post text",
    "line 4": "no keyphrases",
    "line 5": "image 'missing.jpg' not found",
    "line 6": "unreadable",
    "line 7": "undecodable bytes at column 4",
    "line 9": "truncated",
}


def test_every_bad_record_is_found_with_its_line_and_reason(bad_dataset: Path) -> None:
    report = load_cmkp_files([bad_dataset / "posts.txt"], bad_dataset / "images")
    assert len(report.posts) == 2 and [item.source for item in report.posts] == ["posts.txt:1", "posts.txt:8"]
    found = {record.location: record.reason for record in report.bad}
    assert set(found) == set(EXPECTED_PROBLEMS)
    for location, reason in EXPECTED_PROBLEMS.items():
        assert reason in found[location], (location, found[location])


@pytest.mark.compat
def test_llamafactory_load_fails_listing_first_problems_and_total(
    tiny_models: dict, bad_dataset: Path, tmp_path: Path
) -> None:
    with pytest.raises(CmkpFormatError) as error:
        load_through_llamafactory(tiny_models["llava"], "llava", bad_dataset, "bad", tmp_path)
    message = str(error.value)
    assert "7 bad record(s)" in message and "... and 2 more" in message
    assert "posts.txt, line 2: expected 3 fields" in message
    assert "skip_bad_records" in message  # says how to skip


@pytest.mark.compat
def test_skip_option_keeps_good_records_and_reports_the_rest(
    tiny_models: dict, bad_dataset: Path, tmp_path: Path
) -> None:
    train, _ = load_through_llamafactory(tiny_models["llava"], "llava", bad_dataset, "bad_skip", tmp_path)
    assert len(train) == 2
    report = [json.loads(line) for line in (tmp_path / "out" / "aimkp_skipped_records_posts.txt.jsonl").open()]
    assert [entry["where"] for entry in report] == list(EXPECTED_PROBLEMS)


def test_jsonl_problems_have_line_numbers(tmp_path: Path) -> None:
    path = tmp_path / "posts.jsonl"
    path.write_text('{"text": "t", "image": "a.jpg", "keyphrases": ["k"]}\n\n{not json}\n{"text": "t"}\n[1]\n')
    locations = {location: str(item) for location, item in iter_records(path) if isinstance(item, RecordError)}
    assert locations == {
        "line 2": "empty line",
        "line 3": locations["line 3"],
        "line 4": "missing field(s) keyphrases, image; a record needs text, keyphrases and image",
        "line 5": "expected a JSON object, got list",
    }
    assert locations["line 3"].startswith("not valid JSON")


def test_json_list_with_undecodable_bytes_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "posts.json"
    path.write_bytes(b'[\n{"text": "ok", "image": "a.jpg", "keyphrases": "k"},\n{"text": "caf\xe9"}\n]')
    with pytest.raises(CmkpFormatError, match=r"posts.json, line 3: undecodable bytes"):
        list(iter_records(path))


def test_unsupported_file_type_is_named(tmp_path: Path) -> None:
    path = tmp_path / "posts.csv"
    path.write_text("a,b")
    with pytest.raises(CmkpFormatError, match=r"unsupported file type '.csv'; cmkp reads .txt, .json, .jsonl"):
        list(iter_records(path))


@pytest.mark.e2e
def test_cli_training_stops_on_bad_records(tiny_models: dict, bad_dataset: Path, tmp_path: Path, llamafactory_runner):
    config = tiny_train_config(tiny_models["llava"], "llava", bad_dataset, tmp_path / "out", dataset="bad")
    result = llamafactory_runner(config)
    assert result.returncode != 0
    assert "CmkpFormatError" in result.stdout and "posts.txt, line 2: expected 3 fields" in result.stdout


@pytest.mark.e2e
def test_cli_training_skips_with_the_yaml_key(
    tiny_models: dict, bad_dataset: Path, tmp_path: Path, llamafactory_runner
):
    config = tiny_train_config(
        tiny_models["llava"], "llava", bad_dataset, tmp_path / "out", dataset="bad", aimkp_skip_bad_records=True
    )
    result = llamafactory_runner(config, "max_steps=1")
    assert result.returncode == 0, result.stdout[-3000:]
    assert "aimkp-plugin: skipped 7 bad record(s)" in result.stdout
    assert (tmp_path / "out" / "aimkp_skipped_records_posts.txt.jsonl").is_file()


@pytest.mark.e2e
def test_truncated_jpeg_stops_the_run_before_the_model_loads(
    tiny_models: dict, bad_dataset: Path, tmp_path: Path, llamafactory_runner
):
    """The first third of a JPEG passes PIL's verify(); the dataset check decodes it and names file, line, reason."""
    config = tiny_train_config(tiny_models["llava"], "llava", bad_dataset, tmp_path / "out", dataset="truncated")
    result = llamafactory_runner(config, "max_steps=1")
    assert result.returncode != 0
    assert "truncated.txt, line 2: image" in result.stdout and "image file is truncated" in result.stdout
    assert "Loading model" not in result.stdout and "skip_bad_records" in result.stdout


@pytest.mark.compat
def test_missing_dataset_file_is_named(tiny_models: dict, bad_dataset: Path, tmp_path: Path) -> None:
    shutil.move(bad_dataset / "posts.txt", bad_dataset / "moved.txt")
    with pytest.raises(CmkpFormatError, match=r"posts.txt: file not found"):
        load_through_llamafactory(tiny_models["llava"], "llava", bad_dataset, "bad", tmp_path)
