"""Activation through the ``.pth`` post-import hook: cheap at start, idempotent, switchable off, loud on failure,
and working for a regular (wheel) install as well as the editable install the tests run in."""

from __future__ import annotations

import json
import subprocess
import sys
import sysconfig
import zipfile
from importlib.metadata import version
from pathlib import Path

import pytest
import yaml

from aimkp_plugin.cli import PTH_NAME

from .helpers import REPO, TRAIN_PATCHES, read_trace, run_python, subprocess_env, tiny_train_config


WEBUI_PATCHES = {  # the patches only the web UI process applies (TRAIN_PATCHES: the training ones)
    "_patch_webui_common_clean_cmd",
    "_patch_webui_locales_add_aimkp",
    "_patch_webui_runner_parse_train_args",
    "_patch_webui_runner_initialize",
    "_patch_webui_components_train_create_train_tab",
}
ALL_PATCHES = TRAIN_PATCHES | WEBUI_PATCHES


# Imports LLaMA-Factory (firing the hook), tells whether cmkp got registered, then tries a run with aimkp: true.
TRY_AIMKP_RUN = """
import llamafactory.train.tuner
from llamafactory.data.converter import DATASET_CONVERTERS
print("import ok; cmkp registered:", "cmkp" in DATASET_CONVERTERS)
from llamafactory.train.tuner import run_exp
try:
    run_exp({"model_name_or_path": "m", "output_dir": "o", "aimkp": True})
except Exception as err:
    print(type(err).__name__, err)
"""


@pytest.mark.compat
def test_pth_file_is_installed_next_to_the_packages() -> None:
    pth = Path(sysconfig.get_paths()["purelib"]) / PTH_NAME
    assert pth.read_text().strip() == "import aimkp_plugin._bootstrap"


@pytest.mark.compat
def test_plain_python_start_imports_nothing_heavy() -> None:
    result = run_python(
        """
        import json, sys
        table = ("aimkp_plugin.integration", "aimkp_plugin.integration.touch_points")  # the import-free table
        heavy = sorted(name for name in sys.modules if name.split(".")[0] in ("torch", "llamafactory", "transformers")
                       or name.startswith(("aimkp_plugin.integration", "aimkp_plugin.config", "importlib.util"))
                       and name not in table)
        ours = sorted(name for name in sys.modules if name.startswith("aimkp_plugin"))
        finder = any(getattr(item, "_aimkp_post_import_finder", False) for item in sys.meta_path)
        print(json.dumps({"heavy": heavy, "ours": ours, "finder": finder}))
        """
    )
    report = json.loads(result.stdout)
    ours = [
        "aimkp_plugin",
        "aimkp_plugin._bootstrap",
        "aimkp_plugin.integration",
        "aimkp_plugin.integration.touch_points",
    ]
    assert report == {"heavy": [], "ours": ours, "finder": True}


@pytest.mark.e2e
@pytest.mark.compat
def test_doctor_reports_every_patch_applied() -> None:
    """On the LLaMA-Factory of this environment: 0.9.5 under make test, main (0.9.6.dev0) under make test-compat."""
    result = subprocess.run(["aimkp", "doctor"], env=subprocess_env(), capture_output=True, text=True, cwd=REPO)
    assert "could not patch" not in result.stderr  # the report below is what happened
    report = json.loads(result.stdout)
    assert result.returncode == 0, result.stdout + result.stderr
    assert set(report["applied"]) == ALL_PATCHES and report["failed"] == {} and report["post_import_hook"]
    assert report["llamafactory"] == version("llamafactory") and report["llamafactory_problem"] is None
    assert report["pth_file"] == str(Path(sysconfig.get_paths()["purelib"]) / PTH_NAME)


@pytest.mark.e2e
@pytest.mark.parametrize(
    "program",
    [
        "import aimkp_plugin.integration.trainer",  # the trainer first: it imports LLaMA-Factory's SFT workflow
        "from aimkp_plugin.integration.patching import apply_aimkp_to_llamafactory; apply_aimkp_to_llamafactory()",
        "import llamafactory.train.sft.workflow",  # LLaMA-Factory first, as llamafactory-cli does
    ],
)
def test_no_import_order_leaves_a_patch_half_done(program: str) -> None:
    """Whichever module comes first (the benchmarks import the trainer or apply the patches themselves), every
    patch applies, none prints "could not patch", and the workflow builds the AimKP trainer (through
    ``trainer_for_run``, which hands it the run's AimKP options)."""
    probe = (
        f"{program}\nimport llamafactory.train.sft.workflow as workflow\n"
        "from aimkp_plugin.integration.patching import STATUS\n"
        "print(workflow.CustomSeq2SeqTrainer.__name__, STATUS.failed)"
    )
    result = subprocess.run([sys.executable, "-c", probe], env=subprocess_env(), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "could not" not in result.stderr and "failed" not in result.stderr
    assert result.stdout.split("\n")[-2] == "trainer_for_run {}"  # builds the AimKP trainer with the run's options


@pytest.mark.compat
def test_patches_are_idempotent_and_revertible() -> None:
    from llamafactory.data import converter, loader
    from llamafactory.hparams import parser

    from aimkp_plugin.integration import patching

    patching.apply_aimkp_to_llamafactory()
    patched = parser.read_args
    assert getattr(patched, patching.PATCH_MARKER) == "read_args"
    assert not hasattr(patched.__wrapped__, patching.PATCH_MARKER)  # wrapped exactly once
    patching.apply_aimkp_to_llamafactory()
    assert parser.read_args is patched and "cmkp" in converter.DATASET_CONVERTERS
    try:
        patching.revert_all()
        assert not hasattr(parser.read_args, patching.PATCH_MARKER)
        assert not hasattr(loader._load_single_dataset, patching.PATCH_MARKER)
    finally:
        patching.apply_aimkp_to_llamafactory()
    assert getattr(parser.read_args, patching.PATCH_MARKER) == "read_args"


@pytest.mark.e2e
def test_disable_switch_turns_the_plugin_off_but_never_trains_without_aimkp(tmp_path: Path) -> None:
    trace = tmp_path / "trace.jsonl"
    result = run_python(
        TRY_AIMKP_RUN,
        AIMKP_PLUGIN_DISABLE="1",
        ALLOW_EXTRA_ARGS="1",  # LLaMA-Factory would silently ignore the aimkp key with this
        AIMKP_PLUGIN_TRACE=str(trace),
    )
    assert "import ok; cmkp registered: False" in result.stdout
    assert "AimkpNotActiveError" in result.stdout and "disabled by AIMKP_PLUGIN_DISABLE=1" in result.stdout
    assert {event["patch"] for event in read_trace(trace)} == {"_patch_hparams_parser_refuse_aimkp"}


@pytest.mark.e2e
def test_failing_patch_prints_one_line_and_aimkp_refuses_to_train() -> None:
    result = run_python(
        """
        import aimkp_plugin.integration.patching as patching
        def _patch_broken(module):
            raise AttributeError("module has no attribute 'DatasetConverter'")
        original = patching.registry
        patching.registry = lambda *names: {**original(*names), "llamafactory.data.converter": (_patch_broken,)}
        """,
        TRY_AIMKP_RUN,
    )
    assert "import ok; cmkp registered: False" in result.stdout
    lines = [line for line in result.stderr.splitlines() if line.startswith("aimkp-plugin:")]
    assert lines == [
        "aimkp-plugin: patch _patch_broken failed on llamafactory.data.converter (AttributeError: module has no "
        "attribute 'DatasetConverter'); AimKP will refuse to train in this process."
    ]
    assert "AimkpNotActiveError" in result.stdout and "_patch_broken" in result.stdout


@pytest.mark.e2e
def test_unsupported_llamafactory_version_is_named_with_the_fix() -> None:
    result = run_python(
        """
        import aimkp_plugin.integration.patching as patching
        patching.installed_llamafactory_version = lambda: "0.9.4"
        """,
        TRY_AIMKP_RUN,
    )
    assert "import ok; cmkp registered: False" in result.stdout
    lines = [line for line in result.stderr.splitlines() if line.startswith("aimkp-plugin:")]
    assert len(lines) == 1
    for part in ("llamafactory 0.9.4 is not supported", "llamafactory>=0.9.5,<0.9.7", "pip install"):
        assert part in lines[0] and part in result.stdout


@pytest.mark.parametrize(
    ("release", "supported"),
    [("0.9.4", False), ("0.9.5", True), ("0.9.6.dev0", True), ("0.9.6rc1", True), ("0.9.6", True)]
    + [("0.9.7.dev0", False), ("0.9.7", False), ("0.10.0", False)],
)
def test_supported_llamafactory_versions_include_the_next_release_and_its_pre_releases(
    release: str, supported: bool
) -> None:
    """0.9.5 (make test) and main's 0.9.6.dev0 (make test-compat) are tested; 0.9.6 is the release main becomes."""
    from aimkp_plugin.integration.patching import llamafactory_version_problem

    problem = llamafactory_version_problem(release)
    assert (problem is None) == supported, problem
    if problem:
        assert "llamafactory>=0.9.5,<0.9.7" in problem and "pip install 'llamafactory>=0.9.5,<0.9.7'" in problem


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(REPO)],
        check=True,
        env=subprocess_env(),
    )
    return next(out.glob("aimkp_plugin-*.whl"))


@pytest.mark.e2e
def test_wheel_ships_the_pth_and_package_data(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    assert PTH_NAME in names
    assert zipfile.ZipFile(wheel).read(PTH_NAME).decode().strip() == "import aimkp_plugin._bootstrap"
    assert "aimkp_plugin/resources/cmkp_tiny/train_src.txt" in names


@pytest.mark.e2e
def test_regular_install_activates_in_llamafactory_cli_train(
    wheel: Path, tmp_path: Path, tiny_models: dict, cmkp_workspace: Path
) -> None:
    """Install the wheel (not editable) into a fresh venv that borrows the heavy dependencies, then train."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    purelib = Path(
        subprocess.run(
            [str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(purelib), str(wheel)],
        check=True,
        env=subprocess_env(),
    )
    # A plain path line: the dependencies become importable, but that folder's .pth files (our editable install
    # among them) are not executed, so only the wheel's own aimkp_plugin.pth can activate the plugin.
    (purelib / "zz_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    config = tiny_train_config(tiny_models["llava"], "llava", cmkp_workspace, tmp_path / "out", max_steps=1)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    trace = tmp_path / "trace.jsonl"
    result = run_python(
        f"""
        import sys, aimkp_plugin
        print("plugin from:", aimkp_plugin.__file__)
        sys.argv = ["llamafactory-cli", "train", {str(tmp_path / "config.yaml")!r}]
        from llamafactory.cli import main
        main()
        """,
        cwd=tmp_path,
        python=str(venv / "bin" / "python"),
        AIMKP_PLUGIN_TRACE=str(trace),
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert f"plugin from: {purelib}/aimkp_plugin/__init__.py" in result.stdout
    assert {event["patch"] for event in read_trace(trace)} == TRAIN_PATCHES
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()
