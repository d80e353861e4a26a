"""Touch point: LLaMA-Factory's dataset loading. Adds the ``cmkp`` formatting for ``dataset_info.json``.

A ``cmkp`` entry may carry an object of options::

    "cmkp_train": {"file_name": "cmkp/tw_mm_s1/train_src.txt", "formatting": "cmkp",
                   "cmkp": {"instruction": "...", "skip_bad_records": false, "media_dir": "cmkp/images"}}

Local files are read by the plugin itself (line numbers for every problem, undecodable bytes included);
other sources (hub datasets of ``{text, image, keyphrases}`` or AimKP records) go through a registered converter.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, fields
from pathlib import Path
from types import ModuleType
from typing import Any

from ..config import AimkpConfigError
from ..data.cmkp import (
    DEFAULT_INSTRUCTION,
    SUPPORTED_SUFFIXES,
    BadRecord,
    CmkpFormatError,
    RecordError,
    build_answer,
    build_prompt,
    describe_bad_records,
    load_cmkp_files,
    parse_json_record,
)
from . import patching
from .args import active_arguments
from .batches import register_instruction


CMKP_FORMATTING = "cmkp"
OPTIONS_KEY = "cmkp"
SKIP_REPORT_NAME = "aimkp_skipped_records_{dataset}.jsonl"


@dataclass(frozen=True)
class CmkpDatasetOptions:
    """Per-dataset options: the ``"cmkp"`` object of a ``dataset_info.json`` entry."""

    instruction: str = DEFAULT_INSTRUCTION
    skip_bad_records: bool = False
    media_dir: str | None = None  # relative to dataset_dir; default: LLaMA-Factory's media_dir

    @classmethod
    def from_entry(cls, dataset_name: str, options: Any) -> CmkpDatasetOptions:
        if options is None:
            return cls()
        allowed = tuple(item.name for item in fields(cls))
        if not isinstance(options, dict) or any(key not in allowed for key in options):
            raise AimkpConfigError(
                f'dataset_info.json entry {dataset_name!r}: "cmkp" must be an object with keys among '
                f"{', '.join(allowed)}; got {options!r}."
            )
        if not isinstance(options.get("skip_bad_records", False), bool):
            raise AimkpConfigError(f"dataset_info.json entry {dataset_name!r}: cmkp.skip_bad_records must be a bool.")
        return cls(**options)


def input_setting() -> str:
    """The run's ``aimkp_input_setting`` (full when the config has no aimkp keys)."""
    arguments = active_arguments()
    return arguments.aimkp_input_setting if arguments is not None else "full"


def aligned_example(text: str, keyphrases: tuple[str, ...], image_path: str, instruction: str) -> dict[str, Any]:
    """One post in LLaMA-Factory's aligned format (``_prompt``, ``_response``, ``_images``, ...)."""
    setting = input_setting()
    return {
        "_prompt": [{"role": "user", "content": build_prompt(text, instruction, setting)}],
        "_response": [{"role": "assistant", "content": build_answer(keyphrases)}],
        "_system": "",
        "_tools": "",
        "_images": None if setting == "text_only" else [image_path],
        "_videos": None,
        "_audios": None,
    }


def dataset_options(dataset_attr: Any) -> CmkpDatasetOptions:
    return getattr(dataset_attr, "cmkp_options", None) or CmkpDatasetOptions()


def _patch_data_parser_dataset_attr_join(module: ModuleType) -> None:
    """Wrap ``llamafactory.data.parser.DatasetAttr.join`` to keep an entry's ``"cmkp"`` options object.

    Why: ``join`` copies only the attributes LLaMA-Factory knows, so per-dataset options would be dropped.
    Tested on llamafactory 0.9.5 and main (0.9.6.dev0).
    """

    def join(original: Any, self: Any, attr: dict[str, Any]) -> None:
        original(self, attr)
        self.cmkp_options = CmkpDatasetOptions.from_entry(self.dataset_name, attr.get(OPTIONS_KEY))
        register_instruction(self.cmkp_options.instruction)  # the AimKP step finds the text span's end by it

    patching.wrap_function(module.DatasetAttr, "join", "dataset_attr_join", join)


def _patch_data_converter_register_cmkp(module: ModuleType) -> None:
    """Register the ``cmkp`` converter with ``llamafactory.data.converter.register_dataset_converter``.

    Why: the converter handles ``formatting: cmkp`` for non-local sources (hub datasets). Registering twice raises
    in LLaMA-Factory, so this checks first. Tested on llamafactory 0.9.5 and main (0.9.6.dev0).
    """
    if CMKP_FORMATTING in module.DATASET_CONVERTERS:
        return

    @dataclass
    class CmkpDatasetConverter(module.DatasetConverter):
        """Converts ``{text, image, keyphrases}`` or AimKP ``{image, text, conversations}`` records."""

        def __call__(self, example: dict[str, Any]) -> dict[str, Any]:
            try:
                post = parse_json_record(example)
            except RecordError as err:
                raise CmkpFormatError(f"dataset {self.dataset_attr}: bad cmkp record {example!r}: {err}") from err
            options = dataset_options(self.dataset_attr)
            images = self._find_medias([post.image])
            return aligned_example(post.text, post.keyphrases, images[0], options.instruction)

    module.register_dataset_converter(CMKP_FORMATTING, CmkpDatasetConverter)


def _local_files(dataset_dir: str, file_name: str) -> list[Path]:
    path = Path(dataset_dir) / file_name
    if path.is_dir():
        files = sorted(item for item in path.iterdir() if item.suffix.lower() in SUPPORTED_SUFFIXES)
        if not files:
            raise CmkpFormatError(f"{path}: no cmkp files ({', '.join(SUPPORTED_SUFFIXES)}) in this folder.")
        return files
    if path.is_file():
        return [path]
    raise CmkpFormatError(f"{path}: file not found (dataset_dir {dataset_dir!r} + file_name {file_name!r}).")


def _report_skipped(dataset_name: str, bad: list[BadRecord], output_dir: str | None, is_main: bool) -> str | None:
    """Write every skipped record to ``<output_dir>/aimkp_skipped_records_<dataset>.jsonl``; returns the path."""
    if not output_dir or not is_main:
        return None
    os.makedirs(output_dir, exist_ok=True)
    report = os.path.join(output_dir, SKIP_REPORT_NAME.format(dataset=dataset_name))
    with open(report, "w", encoding="utf-8") as handle:
        for record in bad:
            handle.write(json.dumps({"file": record.path, "where": record.location, "reason": record.reason}) + "\n")
    return report


def _sample(dataset: Any, dataset_attr: Any, data_args: Any) -> Any:
    """LLaMA-Factory's ``num_samples`` / ``max_samples`` rules, as in ``data.loader._load_single_dataset``."""
    import numpy as np

    if dataset_attr.num_samples is not None and not data_args.streaming:
        target = dataset_attr.num_samples
        indexes = np.random.permutation(len(dataset))[:target]
        if target > len(indexes):
            indexes = np.concatenate((indexes, np.random.choice(len(dataset), target - len(indexes))))
        dataset = dataset.select(indexes)
    if data_args.max_samples is not None:
        dataset = dataset.select(range(min(data_args.max_samples, len(dataset))))
    return dataset


def load_cmkp_dataset(dataset_attr: Any, data_args: Any, training_args: Any, logger: Any) -> Any:
    """Read a local ``cmkp`` dataset into LLaMA-Factory's aligned format; fail or skip-and-report bad records."""
    from datasets import Dataset

    options = dataset_options(dataset_attr)
    files = _local_files(data_args.dataset_dir, dataset_attr.dataset_name)
    media_dir = os.path.join(data_args.dataset_dir, options.media_dir) if options.media_dir else data_args.media_dir
    report = load_cmkp_files(files, media_dir, check_images=input_setting() != "text_only")
    arguments = active_arguments()
    skip = options.skip_bad_records or (arguments is not None and arguments.aimkp_skip_bad_records)
    name = re.sub(r"[^\w.-]+", "_", dataset_attr.dataset_name)
    if report.bad and not skip:
        raise CmkpFormatError(
            f"cmkp dataset {dataset_attr.dataset_name!r} (media_dir {media_dir}): "
            f"{describe_bad_records(report.bad)}\nFix these records, or skip and report them with "
            '"cmkp": {"skip_bad_records": true} in its dataset_info.json entry or aimkp_skip_bad_records: true '
            "in the training YAML."
        )
    if report.bad:
        path = _report_skipped(name, report.bad, training_args.output_dir, training_args.local_process_index == 0)
        where = f"; full list in {path}" if path else ""
        logger.warning_rank0(
            f"aimkp-plugin: skipped {describe_bad_records(report.bad)}\n"
            f"({len(report.posts)} kept from {dataset_attr.dataset_name}{where})"
        )
    if not report.posts:
        raise CmkpFormatError(f"cmkp dataset {dataset_attr.dataset_name!r}: no usable record left.")
    rows = [
        aligned_example(item.post.text, item.post.keyphrases, item.image_path, options.instruction)
        for item in report.posts
    ]
    dataset = _sample(Dataset.from_list(rows), dataset_attr, data_args)
    if data_args.streaming:
        dataset = dataset.to_iterable_dataset(num_shards=max(training_args.dataloader_num_workers, 1))
    return dataset


def _patch_data_loader_load_single_dataset(module: ModuleType) -> None:
    """Wrap ``llamafactory.data.loader._load_single_dataset`` to read local ``cmkp`` files with the plugin's reader.

    Why: LLaMA-Factory would load ``*.txt`` as plain text lines and decode files before any converter runs, so a
    converter alone can neither parse raw CMKP lines nor report undecodable bytes or the line of a bad record.
    Other datasets go to the original function untouched. Tested on llamafactory 0.9.5 and main (0.9.6.dev0).
    """

    def _load_single_dataset(original: Any, dataset_attr: Any, model_args: Any, data_args: Any, training_args: Any):
        if dataset_attr.formatting != CMKP_FORMATTING or dataset_attr.load_from != "file":
            return original(dataset_attr, model_args, data_args, training_args)
        return load_cmkp_dataset(dataset_attr, data_args, training_args, module.logger)

    patching.wrap_function(module, "_load_single_dataset", "load_single_dataset", _load_single_dataset)
