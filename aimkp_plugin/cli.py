"""The ``aimkp`` command: tiny offline models, the demo dataset, and an activation check.

aimkp models tiny --out build/tiny [--name llava ...] [--force]
aimkp models families [--templates [--markdown]]
aimkp data demo --out data/demo
aimkp doctor
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import sysconfig
from pathlib import Path


PTH_NAME = "aimkp_plugin.pth"


def _models_tiny(options: argparse.Namespace) -> int:
    from .models.tiny import TINY_ALIASES, TINY_MODELS, build_tiny_model

    names = options.name or list(TINY_MODELS)
    unknown = [name for name in names if name not in TINY_MODELS and name not in TINY_ALIASES]
    if unknown:
        known = ", ".join([*TINY_MODELS, *TINY_ALIASES])
        print(
            f"aimkp models tiny: unknown model(s) {', '.join(unknown)}; choose from: {known}.",
            file=sys.stderr,
        )
        return 2
    for name in names:
        path = build_tiny_model(name, Path(options.out) / name, force=options.force)
        print(f"{name}: {path}")
    return 0


def _models_families(options: argparse.Namespace) -> int:
    from .families import FAMILIES

    if not options.templates:
        print(families_markdown(FAMILIES))
        return 0
    from .families.templates import template_answers
    from .integration.templates import multimodal_templates

    answers = template_answers(multimodal_templates())
    if options.markdown:
        print(templates_summary_markdown(answers), templates_markdown(answers), sep="\n\n")
    else:
        print("\n".join(json.dumps(answer.as_json()) for answer in answers))
    return 0


def templates_markdown(answers) -> str:
    """The per-template table of docs/families.md: one row per multimodal template of LLaMA-Factory's registry."""
    lines = ["| template | `model_type` | answer | why |", "|---|---|---|---|"]
    for answer in answers:
        model_types = ", ".join(f"`{model_type}`" for model_type in answer.model_types)
        lines.append(f"| `{answer.template}` | {model_types} | {answer.status} | {answer.reason} |")
    return "\n".join(lines)


def families_markdown(families) -> str:
    """The "Supported models" table of docs/families.md, from the family table."""
    lines = [
        "| family (`model_type`) | LLaMA-Factory template | image grid | what an image copy masks | positions | fast "
        "step | tiny model |",
        "|---|---|---|---|---|---|---|",
    ]
    for family in families:
        tiny = ", ".join(f"`{spec.name}`" for spec in family.tiny_models)
        templates = ", ".join(f"`{template}`" for template in family.templates)
        fast = "yes" if family.has_fast_step else "no"
        description = family.description
        lines.append(
            f"| {model_types_markdown(family)} | {templates} | {description.grid} | {description.masked} | "
            f"{description.positions} | {fast} | {tiny} |"
        )
    return "\n".join(lines)


def templates_summary_markdown(answers) -> str:
    """The README's table: the templates of each answer, in the registry's order."""
    first_class = [f"`{answer.template}`" for answer in answers if answer.status == "first-class"]
    same_code = [
        f"`{answer.template}` ({answer.status.removeprefix('same code as ')})"
        for answer in answers
        if answer.status.startswith("same code as ")
    ]
    refused = [f"`{answer.template}`" for answer in answers if answer.refused]
    return "\n".join(
        [
            "| answer | templates |",
            "|---|---|",
            f"| first-class: exact, tested with a tiny model | {', '.join(first_class)} |",
            f"| the same code as a family (in brackets): runs, not tested on its own | {', '.join(same_code)} |",
            f"| refused before the model loads, with the reason | {', '.join(refused)} |",
        ]
    )


def model_types_markdown(family) -> str:
    """The family's model types, and the vision towers it takes them with where it names them."""
    types = ", ".join(f"`{model_type}`" for model_type in family.model_types)
    if family.vision_model_types:
        towers = ", ".join(f"`{tower}`" for tower in family.vision_model_types)
        types += f" with a {towers} vision tower"
    return types


def _data_demo(options: argparse.Namespace) -> int:
    from .data.demo import build_demo_dataset

    print(f"demo dataset: {build_demo_dataset(options.out)}")
    return 0


def _eval(options: argparse.Namespace) -> int:
    from .evaluation.metrics import METRIC_KEYS, STYLES, score
    from .evaluation.predictions import PredictionFormatError, read_pairs

    try:
        pairs = read_pairs(options.predictions)
    except (PredictionFormatError, OSError) as err:
        print(f"aimkp eval: {err}", file=sys.stderr)
        return 2
    styles = STYLES if options.style == "both" else (options.style,)
    results = {style: score(pairs, style) for style in styles}
    if options.json:
        print(json.dumps(results if len(styles) > 1 else results[styles[0]], indent=2))
        return 0
    print(f"{options.predictions}: {len(pairs)} predictions")
    print(f"{'metric':<8}" + "".join(f"{style + ' style':>14}" for style in styles))
    for key in METRIC_KEYS:
        print(f"{key.upper():<8}" + "".join(f"{results[style][key]:>14.2f}" for style in styles))
    return 0


def _compare(options: argparse.Namespace) -> int:
    from .evaluation.compare import compare_runs, markdown_table, write_comparison
    from .evaluation.predictions import PredictionFormatError

    try:
        results = compare_runs(options.runs, options.style)
    except (PredictionFormatError, OSError) as err:
        print(f"aimkp compare: {err}", file=sys.stderr)
        return 2
    files = write_comparison(results, options.out)
    print(markdown_table(results))
    print("\n".join(f"{kind}: {path}" for kind, path in files.items()))
    return 0


def _doctor(options: argparse.Namespace) -> int:
    """Report whether the ``.pth`` activation is installed and the patches apply in a fresh LLaMA-Factory import."""
    from . import __version__
    from .integration import patching

    pth = Path(sysconfig.get_paths()["purelib"]) / PTH_NAME
    finder = any(getattr(item, "_aimkp_post_import_finder", False) for item in sys.meta_path)
    report = {
        "aimkp_plugin": __version__,
        "pth_file": str(pth) if pth.is_file() else None,
        "post_import_hook": finder,
        "disabled": os.environ.get("AIMKP_PLUGIN_DISABLE") or None,
    }
    try:
        report["llamafactory"] = patching.installed_llamafactory_version()
        report["llamafactory_problem"] = patching.llamafactory_version_problem(report["llamafactory"])
        status = patching.apply_aimkp_to_llamafactory()
        report.update(applied=status.applied, failed=status.failed, inactive_reason=status.inactive_reason)
    except ImportError as err:
        report["llamafactory"] = None
        report["llamafactory_problem"] = f"llamafactory is not importable: {err}"
    print(json.dumps(report, indent=2))
    healthy = finder and report["pth_file"] and not report.get("failed") and not report.get("inactive_reason")
    return 0 if healthy else 1


def build_parser() -> argparse.ArgumentParser:
    # nothing here imports torch: the tiny models' names are checked when that command runs
    parser = argparse.ArgumentParser(prog="aimkp", description="AimKP for LLaMA-Factory: tools around training.")
    commands = parser.add_subparsers(dest="command", required=True)

    models = commands.add_parser("models", help="Build models.").add_subparsers(dest="what", required=True)
    tiny = models.add_parser("tiny", help="Build tiny random-init multimodal models (offline, cached).")
    tiny.add_argument("--out", required=True, help="Folder; each model goes to OUT/<name>.")
    tiny.add_argument("--name", nargs="+", help="Models (default: all; `aimkp models families` lists them).")
    tiny.add_argument("--force", action="store_true", help="Rebuild even if a matching build exists.")
    tiny.set_defaults(run=_models_tiny)
    families = models.add_parser("families", help="The supported model families, as a markdown table.")
    families.add_argument(
        "--templates",
        action="store_true",
        help="Instead: one JSON line per multimodal template of the installed LLaMA-Factory (template, model_types, "
        "status: first-class, same code as <family> or refused, reason, plugin).",
    )
    families.add_argument("--markdown", action="store_true", help="With --templates: a markdown table instead.")
    families.set_defaults(run=_models_families)

    data = commands.add_parser("data", help="Build datasets.").add_subparsers(dest="what", required=True)
    demo = data.add_parser("demo", help="The demo CMKP dataset: real tiny CMKP records plus generated images.")
    demo.add_argument("--out", required=True, help="Folder for the splits, images and dataset_info.json.")
    demo.set_defaults(run=_data_demo)

    evaluate = commands.add_parser("eval", help="Score keyphrase predictions: F1@1, F1@3, MAP@5 in percent.")
    evaluate.add_argument(
        "predictions", help="generated_predictions.jsonl, or a text file of gold<sep>prediction lines."
    )
    evaluate.add_argument(
        "--style",
        choices=["aimkp", "cmkp", "both"],
        default="aimkp",
        help="aimkp: the AimKP authors' metrics (the paper's); cmkp: the CMKP / MM-MKP evaluator's; both.",
    )
    evaluate.add_argument("--json", action="store_true", help="Print JSON (keys f1@1, f1@3, map@5, n).")
    evaluate.set_defaults(run=_eval)

    compare = commands.add_parser("compare", help="Metrics of several predict runs in one table and bar chart.")
    compare.add_argument(
        "runs", nargs="+", help="Folders with generated_predictions.jsonl (e.g. sft/full aimkp/full)."
    )
    compare.add_argument("--style", choices=["aimkp", "cmkp"], default="aimkp", help="Metric style (see aimkp eval).")
    compare.add_argument("--out", default="aimkp_compare", help="Where compare.md, compare.json, compare.png go.")
    compare.set_defaults(run=_compare)

    doctor = commands.add_parser("doctor", help="Check that the plugin activates inside LLaMA-Factory.")
    doctor.set_defaults(run=_doctor)
    return parser


def main(argv: list[str] | None = None) -> int:
    options = build_parser().parse_args(argv)
    return options.run(options)


if __name__ == "__main__":
    sys.exit(main())
