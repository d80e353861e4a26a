"""The AimKP section of LlamaBoard's Train tab: built by LLaMA-Factory's own web UI code, driven in a headless
Chromium against a real ``llamafactory-cli webui``; the YAML that Start writes trained with ``llamafactory-cli``."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from aimkp_plugin.config import IMPLEMENTATIONS, AimkpArguments
from aimkp_plugin.data.demo import build_demo_dataset
from aimkp_plugin.integration.webui import INPUTS, TAB, WARNING

from .helpers import BUILD, REPO, run_llamafactory, run_python, subprocess_env
from .webui_app import build_ui


CHROMIUM = Path("/usr/bin/chromium")
SCREENSHOT = BUILD / "webui_screenshot.png"
SERVER_START_TIMEOUT = 180  # seconds; importing LLaMA-Factory and gradio takes 10-20 s on 2 busy cores
BROWSER_TIMEOUT_MS = 60_000


@pytest.fixture(scope="module")
def ui(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any]:
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(tmp_path_factory.mktemp("llamaboard"))
        return build_ui()


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_demo_dataset(tmp_path_factory.mktemp("demo"))


def form(ui: tuple[Any, Any], values: dict[str, Any]) -> dict[Any, Any]:
    """What gradio passes to Preview/Start/Save: every input bound to "Start" with its initial value, then
    ``values`` (by element id) as a user would set them."""
    engine, blocks = ui
    start = next(fn for fn in blocks.fns.values() if fn.fn == engine.runner.run_train)
    data = {elem: elem.value for elem in start.inputs}
    for elem_id, value in values.items():
        elem = engine.manager.get_elem_by_id(elem_id)
        assert elem in data, f"{elem_id} is not bound to Start"
        data[elem] = value
    return data


def training_form(model: Path, dataset_dir: Path, output_dir: Path, **aimkp: Any) -> dict[str, Any]:
    """A few-step LoRA run of the tiny LLaVA on the demo data, as set in the UI; ``aimkp`` sets the section."""
    extra_args = {"optim": "adamw_torch", "max_steps": 2, "preprocessing_num_workers": 1, "save_strategy": "no"}
    values = {
        "top.lang": "en",
        "top.model_name": "Custom",
        "top.model_path": str(model),
        "top.template": "llava",
        "train.dataset_dir": str(dataset_dir),
        "train.dataset": ["cmkp_demo_train"],
        "train.compute_type": "fp32",
        "train.learning_rate": "1e-3",
        "train.max_samples": "8",
        "train.cutoff_len": 512,
        "train.batch_size": 2,
        "train.gradient_accumulation_steps": 1,
        "train.logging_steps": 1,
        "train.extra_args": json.dumps(extra_args),
        "train.output_dir": str(output_dir),  # a path with a separator is used as it is
        "train.config_path": "aimkp_ui.yaml",
        "train.additional_target": "multi_modal_projector",  # trained, so that the projector's learning rate applies
    }
    return values | {f"train.{name}": value for name, value in aimkp.items()}


def aimkp_items(config: dict[str, Any], prefix: str = "aimkp") -> dict[str, Any]:
    return {key: value for key, value in config.items() if key.startswith(prefix)}


DEFAULTS = AimkpArguments()
SECTION = {  # the section as a user might set it: every value differs from its default (while there is a choice)
    "aimkp_impl": next((impl for impl in IMPLEMENTATIONS if impl != DEFAULTS.aimkp_impl), DEFAULTS.aimkp_impl),
    "aimkp_init_stride": 2,
    "aimkp_text_threshold": 0.25,
    "aimkp_image_threshold": 0.55,
    "aimkp_modalities": ["image"],
    "aimkp_filter": False,
    "aimkp_progressive": False,
    "aimkp_projector_lr": 2e-5,
}


@pytest.mark.compat
def test_section_inputs_are_bound_to_preview_start_save_and_load(ui: tuple[Any, Any]) -> None:
    engine, blocks = ui
    inputs = {engine.manager.get_elem_by_id(f"train.{name}") for name in INPUTS}
    handlers = {fn.fn.__name__: fn for fn in blocks.fns.values() if hasattr(fn.fn, "__self__")}
    for name in ("preview_train", "run_train", "save_args"):
        assert inputs <= set(handlers[name].inputs), name
    assert inputs <= set(handlers["load_args"].outputs)
    assert {name: engine.manager.get_elem_by_id(f"train.{name}").value for name in INPUTS} == {
        name: "" if name == "aimkp_projector_lr" else getattr(DEFAULTS, name)
        for name in INPUTS  # empty: unset
    }


@pytest.mark.compat
@pytest.mark.e2e
def test_start_writes_a_yaml_that_trains_with_the_section_values(
    ui: tuple[Any, Any], tiny_models: dict, demo_data: Path, tmp_path: Path
) -> None:
    from llamafactory.webui.common import save_cmd

    runner = ui[0].runner
    out = tmp_path / "out"
    data = form(ui, training_form(tiny_models["llava"], demo_data, out, aimkp=True, **SECTION))
    assert runner._initialize(data, do_train=True, from_preview=True) == ""  # Start's checks, minus the GPU warning
    config_file = Path(save_cmd(runner._parse_train_args(data)))  # what Start does before llamafactory-cli train
    config = yaml.safe_load(config_file.read_text())
    assert aimkp_items(config) == {"aimkp": True, **SECTION, "aimkp_modalities": "image"}
    if "train_seed" in {name for name, _ in ui[0].manager.get_elem_iter()}:  # LLaMA-Factory main's seed box
        assert config["seed"] == 42  # its default, next to the section's keys

    result = run_llamafactory(config_file, tmp_path)
    assert result.returncode == 0, result.stdout[-4000:]
    assert json.loads((out / "aimkp_state.json").read_text())["init_stride"] == 2
    assert "projector tensors train at lr 2e-05" in result.stdout


@pytest.mark.compat
def test_with_aimkp_off_the_arguments_have_no_aimkp_key(ui: tuple[Any, Any], tmp_path: Path) -> None:
    """Only the projector's learning rate stays (plain SFT takes it), and only while it is set."""
    from llamafactory.webui.common import gen_cmd, save_cmd

    runner = ui[0].runner
    data = form(ui, training_form(tmp_path / "model", tmp_path, tmp_path / "out", aimkp=False, **SECTION))
    args = runner._parse_train_args(data)
    assert aimkp_items(args) == {"aimkp_projector_lr": 2e-5} and "--aimkp " not in gen_cmd(args) + " "
    assert aimkp_items(yaml.safe_load(Path(save_cmd(args)).read_text())) == {"aimkp_projector_lr": 2e-5}
    unset = form(ui, training_form(tmp_path / "model", tmp_path, tmp_path / "out", aimkp=False))
    assert aimkp_items(runner._parse_train_args(unset)) == {}


@pytest.mark.compat
@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"train.aimkp_modalities": []}, "aimkp_modalities must name one or more of: text, image"),
        ({"train.compute_type": "fp16"}, "aimkp: true cannot be combined with fp16: true"),
        ({"train.training_stage": "DPO"}, "aimkp: true needs stage one of: sft"),
        ({"train.aimkp_projector_lr": "fast"}, "aimkp_projector_lr must be a number, got 'fast'"),
    ],
)
def test_bad_aimkp_settings_are_reported_in_the_train_tab(
    ui: tuple[Any, Any], tmp_path: Path, change: dict, message: str
) -> None:
    values = training_form(tmp_path / "model", tmp_path, tmp_path / "out", aimkp=True) | change
    error = ui[0].runner._initialize(form(ui, values), do_train=True, from_preview=True)
    assert error.startswith("AimKP: ") and message in error


@pytest.mark.compat
@pytest.mark.parametrize(
    ("stage", "offload", "message"),  # message: the error expected, none for ""
    [
        ("2", False, ""),
        ("2", True, ""),
        ("3", False, ""),
        ("3", True, ""),
    ],
)
def test_deepspeed_stage_with_aimkp_in_the_train_tab(
    ui: tuple[Any, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stage: str, offload: bool, message: str
) -> None:
    """ZeRO-2 and ZeRO-3, with or without LlamaBoard's offload, pass the AimKP checks of the Train tab."""
    from llamafactory.webui.common import create_ds_config

    monkeypatch.chdir(tmp_path)
    create_ds_config()  # what LlamaBoard writes into its working directory at start
    values = training_form(tmp_path / "model", tmp_path, tmp_path / "out", aimkp=True)
    values |= {"train.ds_stage": stage, "train.ds_offload": offload}
    error = ui[0].runner._initialize(form(ui, values), do_train=True, from_preview=True)
    assert error == "" if not message else error.startswith("AimKP: ") and message in error, error


@pytest.mark.compat
def test_every_language_labels_the_section(ui: tuple[Any, Any]) -> None:
    from llamafactory.webui.locales import LOCALES

    engine = ui[0]
    choices = [value for _, value in engine.manager.get_elem_by_id("top.lang").choices]
    assert {"en", "zh", "ru", "ko", "ja"} <= set(choices)
    enable = engine.manager.get_elem_by_id("train.aimkp")
    tab = engine.manager.get_elem_by_id(f"train.{TAB}")
    for lang in choices:
        updates = engine.change_lang(lang)  # raises KeyError for a missing LOCALES entry
        assert all(updates[engine.manager.get_elem_by_id(f"train.{name}")].label for name in INPUTS)
        expected = {"zh": ("使用 AimKP", "AimKP 参数设置")}.get(lang, ("Use AimKP", "AimKP configurations"))
        assert (updates[enable].label, updates[tab].label) == expected
    assert LOCALES["aimkp"]["a-future-language"] == LOCALES["aimkp"]["en"]


@pytest.mark.compat
def test_save_and_load_arguments_round_trip_the_section(
    ui: tuple[Any, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # save_args writes into llamaboard_config/ of the current directory
    engine = ui[0]
    saved = {"aimkp": True, **SECTION}
    engine.runner.save_args(form(ui, training_form(tmp_path / "model", tmp_path, tmp_path / "out", **saved)))
    saved_file = yaml.safe_load((tmp_path / "llamaboard_config" / "aimkp_ui.yaml").read_text())
    assert aimkp_items(saved_file, "train.aimkp") == {f"train.{name}": value for name, value in saved.items()}
    loaded = engine.runner.load_args("en", "aimkp_ui.yaml")
    assert {name: loaded[engine.manager.get_elem_by_id(f"train.{name}")] for name in INPUTS} == saved


# Builds the UI in a fresh process (the .pth hook patches it there) and reports what the Train tab got.
REPORT_TRAIN_TAB = """
import json
from tests.webui_app import build_ui
engine, _ = build_ui()
names = [name for name, _ in engine.manager.get_elem_iter()]
warning = engine.manager.get_elem_by_id("train.aimkp_warning") if "aimkp_warning" in names else None
siblings = warning.parent.children if warning else []
before = siblings[siblings.index(warning) - 1] if warning else None
print(json.dumps({"names": names, "warning": warning and warning.value,
                  "after": before and engine.manager.get_id_by_elem(before)}))
"""
BREAK_A_PATCH = """
import aimkp_plugin.integration.patching as patching
def _patch_broken(module):
    raise AttributeError("no LOCALES")
original = patching.registry
patching.registry = lambda *names: {**original(*names), "llamafactory.webui.locales": (_patch_broken,)}
"""


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("setup", "env", "reason"),
    [
        ("", {"AIMKP_PLUGIN_DISABLE": "1"}, "it is disabled by AIMKP_PLUGIN_DISABLE=1"),
        (BREAK_A_PATCH, {}, "some aimkp-plugin patches failed: _patch_broken (AttributeError: no LOCALES)"),
    ],
    ids=["disabled", "failed-patch"],  # an unsupported LLaMA-Factory takes the disabled path
)
def test_train_tab_shows_why_aimkp_is_off(setup: str, env: dict, reason: str, tmp_path: Path) -> None:
    result = run_python(setup, REPORT_TRAIN_TAB, cwd=tmp_path, PYTHONPATH=str(REPO), **env)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(result.stdout.splitlines()[-1])
    assert WARNING in report["names"] and not set(INPUTS + (TAB,)) & set(report["names"])
    assert report["warning"].startswith("**AimKP is off in this web UI**") and reason in report["warning"]
    assert report["after"] == "train.badam_tab"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def webui(tmp_path: Path) -> Iterator[str]:
    """``llamafactory-cli webui`` on a free loopback port, run from a scratch folder; yields its URL.

    The folder's user config preselects a custom model path, as a user's earlier session would have.
    """
    (tmp_path / "llamaboard_cache").mkdir()
    user_config = {"lang": "en", "last_model": "Custom", "path_dict": {"Custom": str(tmp_path / "model")}}
    (tmp_path / "llamaboard_cache" / "user_config.yaml").write_text(yaml.safe_dump(user_config))
    port = free_port()
    env = subprocess_env(
        GRADIO_SERVER_NAME="127.0.0.1",
        GRADIO_SERVER_PORT=str(port),
        GRADIO_ANALYTICS_ENABLED="False",
        BROWSER="true",  # launch(inbrowser=True) must not open anything
    )
    log = open(tmp_path / "webui.log", "w")
    server = subprocess.Popen(
        ["llamafactory-cli", "webui"],
        cwd=tmp_path,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT
        while True:
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"llamafactory-cli webui did not come up:\n{(tmp_path / 'webui.log').read_text()[-4000:]}")
            time.sleep(1)
        yield url
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()


@pytest.mark.compat
@pytest.mark.e2e
def test_browser_preview_shows_the_section_values(webui: str, tmp_path: Path) -> None:
    if not CHROMIUM.is_file():
        pytest.fail(f"{CHROMIUM} is missing: run `make browser` (apt-get install chromium).")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"]
        )
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(BROWSER_TIMEOUT_MS)
        try:
            page.goto(webui)
            train = page.get_by_role("tabpanel").filter(visible=True)  # the Train tab is the first
            train.get_by_text("AimKP configurations").wait_for()

            # The cmkp datasets of the repository's data/dataset_info.json appear in the picker for its folder.
            train.get_by_label("Data dir").fill(str(REPO / "data"))
            train.get_by_label("Dataset", exact=True).click()  # its focus event lists the folder's datasets
            page.get_by_role("option", name="cmkp_demo_train").wait_for()
            listed = set(page.get_by_role("option").all_inner_texts())
            assert set(json.loads((REPO / "data" / "dataset_info.json").read_text())) <= listed
            page.get_by_role("option", name="cmkp_demo_train").click()

            # The section sits right after the other method sections (BAdam), before SwanLab's logging one.
            heights = [
                train.get_by_text(f"{name} configurations", exact=True).bounding_box()["y"]
                for name in ("APOLLO", "BAdam", "AimKP", "SwanLab")
            ]
            assert heights == sorted(heights)

            train.get_by_text("AimKP configurations").click()
            train.get_by_label("Use AimKP").check()
            for label, value in (("Text threshold", "0.25"), ("Image threshold", "0.55")):
                train.get_by_role("spinbutton", name=label).fill(value)
                train.get_by_role("spinbutton", name=label).press("Tab")
            train.get_by_role("button", name="Preview command").click()
            preview = train.locator("code").filter(has_text="llamafactory-cli train")
            lines = [line.rstrip(" \\").strip() for line in preview.inner_text().splitlines()]

            assert [line for line in lines if line.startswith("--aimkp")] == [
                "--aimkp True",
                f"--aimkp_impl {DEFAULTS.aimkp_impl}",
                f"--aimkp_init_stride {DEFAULTS.aimkp_init_stride}",
                "--aimkp_text_threshold 0.25",
                "--aimkp_image_threshold 0.55",
                f"--aimkp_modalities {','.join(DEFAULTS.aimkp_modalities)}",
                "--aimkp_filter True",
                "--aimkp_progressive True",
            ]
            assert f"--dataset_dir {REPO / 'data'}" in lines and "--dataset cmkp_demo_train" in lines

            for close in page.locator(".toast-close").all():  # gradio's notices would cover the section
                close.click()
        finally:
            page.screenshot(path=tmp_path / "webui.png", full_page=True)  # also when it failed
            SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(tmp_path / "webui.png", SCREENSHOT)
            browser.close()
