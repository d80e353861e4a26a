"""Helpers shared by the test modules (the fixtures are in ``conftest.py``; test modules import no other test
module): the repository's paths and a user's shell environment, LLaMA-Factory configs, data and runs on the tiny
models, and what the tests know about the model families, derived from the package's family table: adding a family
to ``aimkp_plugin.families.FAMILIES`` puts it into every per-family test.

Cheap to import: LLaMA-Factory, transformers and safetensors are imported inside the functions that use them."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from types import MethodType
from typing import Any

import torch
import yaml

from aimkp_plugin.families import FAMILIES, ModelFamily
from aimkp_plugin.method.state import STATE_FILE


# ---------------------------------------------------------------- the repository and a user's shell


REPO = Path(__file__).resolve().parents[1]
BUILD = REPO / "build"
SHARED = Path(os.environ.get("AIMKP_SHARED_DIR", REPO.parent / "shared"))
CMKP = SHARED / "data" / "cmkp"
VENV_BIN = Path(sys.executable).parent
TINY_DIR = BUILD / "tiny"
WIDE_IMAGE = (224, 96)  # Qwen3-VL: a 3×7 merged grid; InternVL: 3 tiles of 112 px plus a thumbnail
JSON_SUBSET = 24  # AimKP-JSON records (from the real validation split) used in the workspace


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment of a user's shell: the venv's bin on PATH, offline hub, caches under build/."""
    env = os.environ.copy()
    env.pop("AIMKP_PLUGIN_DISABLE", None)
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("HF_HOME", str(BUILD / "cache" / "huggingface"))
    env.setdefault("HF_DATASETS_CACHE", str(BUILD / "cache" / "datasets"))
    env.setdefault("MPLCONFIGDIR", str(BUILD / "cache" / "matplotlib"))
    env.setdefault("TORCH_EXTENSIONS_DIR", str(BUILD / "cache" / "torch_extensions"))  # DeepSpeed's CPU comm op
    env["HF_HUB_OFFLINE"] = "1"
    env["TOKENIZERS_PARALLELISM"] = "false"
    env.update(extra)
    return env


TRAIN_PATCHES = {  # the patches a training process (llamafactory-cli train, torchrun ranks) applies
    "_patch_hparams_parser_read_args",
    "_patch_data_parser_dataset_attr_join",
    "_patch_data_converter_register_cmkp",
    "_patch_data_loader_load_single_dataset",
    "_patch_train_tuner_training_function",
    "_patch_train_tuner_run_exp",
    "_patch_train_sft_workflow_trainer",
}


def run_python(*code: str, cwd: Path = REPO, python: str = sys.executable, **env: str) -> subprocess.CompletedProcess:
    """Run the code parts (each dedented on its own) in a fresh interpreter of the test environment."""
    script = "\n".join(textwrap.dedent(part) for part in code)
    return subprocess.run([python, "-c", script], cwd=cwd, env=subprocess_env(**env), capture_output=True, text=True)


# ---------------------------------------------------------------- LLaMA-Factory configs, data and runs


def tiny_train_config(model: Path, template: str, dataset_dir: Path, output_dir: Path, **overrides: Any) -> dict:
    """A few-step LoRA SFT config on the tiny model; ``lm_head`` trains too so the loss can move."""
    config = {
        "model_name_or_path": str(model),
        "stage": "sft",
        "do_train": True,
        "finetuning_type": "lora",
        "lora_rank": 4,
        "lora_target": "all",
        "additional_target": "lm_head",
        "dataset": "raw_train",
        "dataset_dir": str(dataset_dir),
        "media_dir": str(dataset_dir / "images"),
        "template": template,
        "cutoff_len": 512,
        "max_samples": 16,
        "output_dir": str(output_dir),
        "overwrite_output_dir": True,
        "per_device_train_batch_size": 2,
        "max_steps": 3,
        "learning_rate": 1.0e-3,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "preprocessing_num_workers": 1,
        "seed": 7,
    }
    config.update(overrides)
    return config


def llamafactory_data(model: Path, template: str, dataset_dir: Path, out: Path, **overrides: Any):
    """What ``run_sft`` does before the model: parse args, load tokenizer/processor and template, tokenize the data.

    Returns ``(train_dataset, tokenizer_module, template)``.
    """
    from llamafactory.data import get_dataset, get_template_and_fix_tokenizer
    from llamafactory.hparams import get_train_args
    from llamafactory.model import load_tokenizer

    config = tiny_train_config(model, template, dataset_dir, out, **overrides)
    model_args, data_args, training_args, _, _ = get_train_args(config)
    tokenizer_module = load_tokenizer(model_args)
    template_obj = get_template_and_fix_tokenizer(tokenizer_module["tokenizer"], data_args)
    dataset = get_dataset(template_obj, model_args, data_args, training_args, stage="sft", **tokenizer_module)
    return dataset["train_dataset"], tokenizer_module, template_obj


def run_llamafactory(
    config: dict | Path, workdir: Path, *cli_overrides: str, timeout: int = 600, **env: str
) -> subprocess.CompletedProcess:
    """Run ``llamafactory-cli train CONFIG`` as a user would; ``config`` is a dict (written as YAML) or a file.

    A run whose environment differs from a user's shell only in ``cli_server.RUNTIME_VARIABLES`` goes to the warm
    CLI (``WarmCli``): the same entry point in the same environment, without importing LLaMA-Factory anew. Every
    other run (``FORCE_TORCHRUN``, DeepSpeed's variables) starts the ``llamafactory-cli`` script itself."""
    if isinstance(config, dict):
        path = workdir / "config.yaml"
        workdir.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(config))
    else:
        path = config
    argv = ["llamafactory-cli", "train", str(path), *cli_overrides]

    run_env = subprocess_env(**env)
    if WarmCli.takes(run_env):
        return WarmCli.shared().run(argv, REPO, run_env, workdir, timeout)
    return subprocess.run(
        argv,
        cwd=REPO,
        env=run_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,  # LLaMA-Factory logs to stdout, Python errors go to stderr: read them together
        text=True,
        timeout=timeout,
    )


class WarmCli:
    """The client of ``tests/cli_server.py``: one server per test session, started on the first run it takes and
    stopped by the session fixture ``warm_cli``. ``AIMKP_TESTS_COLD_CLI=1`` sends every run to the script instead."""

    _shared: WarmCli | None = None
    _lock = threading.Lock()

    def __init__(self) -> None:
        self.env = subprocess_env()
        script = shutil.which("llamafactory-cli", path=self.env["PATH"])
        if script is None:
            raise RuntimeError("llamafactory-cli is not on PATH: run the tests in the venv (make test)")
        python = Path(script).read_text().splitlines()[0].removeprefix("#!").strip()
        self.folder = Path(tempfile.mkdtemp(prefix="aimkp-warm-cli-"))
        self.socket = str(self.folder / "cli.sock")
        self.process = subprocess.Popen(
            [python, str(Path(__file__).with_name("cli_server.py")), self.socket],
            cwd=REPO,
            env=self.env,
            stdin=subprocess.PIPE,  # the server exits when this closes, with the tests
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        first = self.process.stdout.readline()
        if first.strip() != "ready":
            self.process.kill()
            raise RuntimeError(f"the warm llamafactory-cli did not start: {first}{self.process.stdout.read()}")
        self.count = 0

    @staticmethod
    def takes(env: dict[str, str]) -> bool:
        if os.environ.get("AIMKP_TESTS_COLD_CLI") == "1":
            return False
        from .cli_server import RUNTIME_VARIABLES

        base = subprocess_env()
        keys = (set(env) | set(base)) - set(RUNTIME_VARIABLES)
        return all(env.get(key) == base.get(key) for key in keys)

    @classmethod
    def shared(cls) -> WarmCli:
        with cls._lock:
            if cls._shared is None or cls._shared.process.poll() is not None:
                cls._shared = cls()
            return cls._shared

    @classmethod
    def stop_shared(cls) -> None:
        with cls._lock:
            if cls._shared is not None:
                cls._shared.process.kill()
                cls._shared.process.wait()
                shutil.rmtree(cls._shared.folder, ignore_errors=True)
                cls._shared = None

    def run(
        self, argv: list[str], cwd: Path, env: dict[str, str], workdir: Path, timeout: int
    ) -> subprocess.CompletedProcess:
        workdir.mkdir(parents=True, exist_ok=True)
        with self._lock:
            self.count += 1
            log = workdir / f"llamafactory-cli-{self.count}.log"
        request = {"argv": argv, "cwd": str(cwd), "env": env, "log": str(log)}
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as connection:
            connection.connect(self.socket)
            connection.settimeout(timeout)
            connection.sendall((json.dumps(request) + "\n").encode())
            replies = connection.makefile("r")
            pid = int(replies.readline())
            try:
                status = replies.readline()
            except TimeoutError:
                os.kill(pid, signal.SIGKILL)
                raise subprocess.TimeoutExpired(argv, timeout, output=log.read_text(errors="replace")) from None
        output = log.read_text(errors="replace")
        if not status.strip():  # the child died without reporting (a signal)
            return subprocess.CompletedProcess(argv, -9, stdout=output + "\n[tests] the warm CLI's child died\n")
        return subprocess.CompletedProcess(argv, int(status), stdout=output)


def run_side_by_side(runs: dict[str, dict], workdir: Path) -> dict[str, subprocess.CompletedProcess]:
    """``llamafactory-cli train`` on each named config, two at a time with one thread each (runs that only compare
    results with one another: all of them see the same thread count); name -> result."""

    def run(name: str) -> subprocess.CompletedProcess:
        return run_llamafactory(runs[name], workdir / f"{name}_config", OMP_NUM_THREADS="1")

    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip(runs, pool.map(run, runs), strict=True))


def read_trace(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def load_through_llamafactory(model: Path, template: str, dataset_dir: Path, dataset: str, tmp_path: Path, **extra):
    """The tokenized training set of ``dataset`` and its tokenizer, as ``run_sft`` builds them."""
    extra.setdefault("max_samples", None)
    train, tokenizer_module, _ = llamafactory_data(
        model, template, dataset_dir, tmp_path / "out", dataset=dataset, **extra
    )
    return train, tokenizer_module["tokenizer"]


def llamafactory_batch(
    model_path: Path,
    template: str,
    workspace: Path,
    tmp_path: Path,
    size: int,
    images: str = "images",
    pad_to_multiple_of: int | None = None,
):
    """A real SFT batch of the first ``size`` raw test posts, built by LLaMA-Factory's own data pipeline."""
    from llamafactory.data import SFTDataCollatorWith4DAttentionMask

    train, tokenizer_module, template_obj = llamafactory_data(
        model_path,
        template,
        workspace,
        tmp_path / "out",
        dataset="raw_test",
        max_samples=size,
        media_dir=str(workspace / images),
    )
    features = [dict(train[index]) for index in range(size)]
    model = None
    from llamafactory.extras.constants import MROPE_MODELS
    from transformers import AutoConfig, AutoModelForImageTextToText

    if AutoConfig.from_pretrained(model_path).model_type in MROPE_MODELS:  # the collator computes m-rope positions
        model = AutoModelForImageTextToText.from_pretrained(model_path)  # with the model
    collator = SFTDataCollatorWith4DAttentionMask(
        template=template_obj,
        model=model,
        pad_to_multiple_of=pad_to_multiple_of,
        label_pad_token_id=-100,
        **tokenizer_module,
    )
    batch = collator(features)
    return batch, tokenizer_module["tokenizer"]


def aimkp_config(model: Path, template: str, workspace: Path, out: Path, **overrides) -> dict:
    settings = {
        "aimkp": True,
        "max_samples": 8,
        "num_train_epochs": 3,
        "per_device_train_batch_size": 2,
        "logging_steps": 2,
        "save_strategy": "epoch",
    }
    settings.update(overrides)
    config = tiny_train_config(model, template, workspace, out, **settings)
    config.pop("max_steps")
    return config


def read_state(folder: Path) -> dict:
    return json.loads((folder / STATE_FILE).read_text())


def assert_same_adapter(first: Path, second: Path, rtol: float = 1e-5) -> None:
    """Every saved tensor of ``second`` within ``rtol`` of ``first``, relative in L2 norm.

    Elementwise checks would fail on float32 rounding alone: two computations that sum in different orders differ
    by about 1e-7, and Adam's first step (about ``lr · sign(g)``) turns that into a full ``lr`` for the few elements
    whose gradient is near its ε.
    """
    from safetensors.torch import load_file

    first_weights = load_file(first / "adapter_model.safetensors")
    second_weights = load_file(second / "adapter_model.safetensors")
    assert first_weights.keys() == second_weights.keys()
    for name, tensor in first_weights.items():
        difference = float((second_weights[name] - tensor).norm() / tensor.norm())
        assert difference <= rtol, f"{name}: relative difference {difference:.2e} > {rtol:.0e}"


# ---------------------------------------------------------------- the model families


FAMILY_NAMES: tuple[str, ...] = tuple(family.name for family in FAMILIES)  # also each family's first tiny model
FAMILY_BY_NAME: dict[str, ModelFamily] = {family.name: family for family in FAMILIES}
# families whose tests read wide pictures: non-square merged grids (Qwen3 generation, GLM-4V, LFM2-VL), tiles
# (InternVL), unpadded anyres areas (LLaVA-NeXT), non-square grids with row breaks (Mistral 3, an odd patch row
# merged away; Pixtral), several tiles (Mllama)
WIDE_PICTURES = {
    "qwen3_vl",
    "qwen3_vl_moe",
    "qwen3_5",
    "glm4v",
    "internvl",
    "llava_next",
    "mistral3",
    "pixtral",
    "lfm2_vl",
    "mllama",
}


def template_of(family: str) -> str:
    """The LLaMA-Factory template the family's tiny model trains with."""
    return FAMILY_BY_NAME[family].tiny_models[0].template


def images_of(family: str) -> str:
    """The workspace's image folder for the family's tests."""
    return "images_wide" if family in WIDE_PICTURES else "images"


# family -> (LLaMA-Factory template, image folder of the workspace): the Qwen3 generation and InternVL read wide
# pictures, so that their grids are not square (3×7 merged tokens) and their images are tiled (tiles plus a
# thumbnail); LLaVA-NeXT's anyres unpadding makes the wide picture lose rows
FAMILY_INPUTS = {family: (template_of(family), images_of(family)) for family in FAMILY_NAMES}


def language_model_of(model: torch.nn.Module) -> torch.nn.Module:
    """The decoder stack that receives ``inputs_embeds``: ``model.model.language_model``, or Llama 4's text model
    (``language_model.model``: Llama 4 has no ``model.model``)."""
    return model.model.language_model if hasattr(model, "model") else model.language_model.model


def own_masks(module: torch.nn.Module, kwargs: dict) -> dict | None:
    """The masks a text model that builds its own per layer type (Llama 4: causal for the NoPE layers, chunked for the
    others, by token index) would build over the whole sequence, with transformers' own functions; None for the other
    models (their masks reach the language model built, or are plain causal)."""
    if type(module).__name__ != "Llama4TextModel" or isinstance(kwargs.get("attention_mask"), dict):
        return None
    from transformers.masking_utils import create_causal_mask, create_chunked_causal_mask

    arguments = {
        "config": module.config,
        "inputs_embeds": kwargs["inputs_embeds"],
        "attention_mask": kwargs.get("attention_mask"),
        "past_key_values": None,
        "position_ids": kwargs["position_ids"],
    }
    return {
        "full_attention": create_causal_mask(**arguments),
        "chunked_attention": create_chunked_causal_mask(**arguments),
    }


@contextmanager
def deleting(model: torch.nn.Module, keep: torch.Tensor) -> Iterator[None]:
    """While active, ``model``'s language model runs on the positions ``keep`` only: the sequence with every other
    token deleted (after the model has put the image features in place), each kept token at its original position
    ids, the model's own masks (causal, Gemma 3's image blocks and sliding windows, Llama 4's attention chunks, built
    over the whole sequence in original positions) restricted to the kept tokens (a 2-D mask of ones where the model
    passes none), Qwen3-VL's DeepStack features of the kept image tokens, and Mllama's cross-attention mask rows
    of the kept tokens. Written apart from the plugin's own
    removal (``aimkp_plugin.method.step.TokenRemoval``)."""

    def restrict(mask: torch.Tensor | None) -> torch.Tensor | None:
        if mask is None:
            return None
        return mask[..., keep] if mask.dim() == 2 else mask[..., keep, :][..., keep]

    def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        assert not args, "the language model is called with keyword arguments"
        kwargs = dict(kwargs)
        assert kwargs.get("position_ids") is not None, "pass the original position ids: deleting would renumber them"
        mask = own_masks(module, kwargs)
        mask = kwargs.get("attention_mask") if mask is None else mask
        if kwargs.get("inputs_embeds") is None:  # Mllama's language model embeds the ids itself
            kwargs["input_ids"] = kwargs["input_ids"][:, keep]
        else:
            kwargs["inputs_embeds"] = kwargs["inputs_embeds"][:, keep]
        kwargs["position_ids"] = kwargs["position_ids"][..., keep]
        if isinstance(mask, dict):
            kwargs["attention_mask"] = {name: restrict(value) for name, value in mask.items()}
        elif mask is None:  # ones, or without a cache transformers reads the position jumps as packed sequences
            kwargs["attention_mask"] = torch.ones(1, len(keep), dtype=torch.long)
        else:
            kwargs["attention_mask"] = restrict(mask)
        visual = kwargs.get("visual_pos_masks")
        if visual is not None:  # DeepStack: one feature row per image token, in order
            ranks = visual[0].cumsum(0) - 1
            kept_images = ranks[keep][visual[0, keep]]
            kwargs["visual_pos_masks"] = visual[:, keep]
            kwargs["deepstack_visual_embeds"] = [rows[kept_images] for rows in kwargs["deepstack_visual_embeds"]]
        for name in ("cross_attention_mask", "full_text_row_masked_out_mask"):  # Mllama: (1, 1, L, keys or 1)
            if kwargs.get(name) is not None:
                kwargs[name] = kwargs[name][:, :, keep]
        return args, kwargs

    handle = language_model_of(model).register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def deleting_keys(model: torch.nn.Module, hidden: list[int]) -> Iterator[None]:
    """While active, Mllama's language model reads none of the vision keys ``hidden`` (indices into its
    ``cross_attention_states`` flattened to ``(1, keys, D)``): they are deleted from the states and from the columns
    of the cross-attention mask the model prepared."""

    def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        states = kwargs["cross_attention_states"]
        keep = kept_positions(states.shape[0] * states.shape[1], hidden)
        kwargs = dict(kwargs)
        kwargs["cross_attention_states"] = states.reshape(1, -1, states.shape[-1])[:, keep]
        kwargs["cross_attention_mask"] = kwargs["cross_attention_mask"][..., keep]
        return args, kwargs

    handle = language_model_of(model).register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def kept_positions(length: int, hidden: list[int]) -> torch.Tensor:
    keep = torch.ones(length, dtype=torch.bool)
    keep[hidden] = False
    return keep.nonzero().squeeze(1)


def norms_in_input_dtype(model: torch.nn.Module) -> torch.nn.Module:
    """Gemma's RMSNorms compute in float32 whatever the model's dtype; for float64 comparisons of two computations
    that differ in rounding (a deleted sequence against a masked one), compute them in the input's dtype instead,
    by the same formula (Gemma, Gemma 2 and Gemma 3: ``x̂ · (1 + w)``; Gemma 4: ``x̂ · w``, or ``x̂`` without a
    scale). Likewise Llama 4's rotary embedding: its angles come as complex64, and the rotation of the
    float32-rounded queries and keys by them in complex64 rounds differently with the tensors' layout (a packed shared
    prefix against the rows apart: 1e-7); the same angles as complex128 make that product exact for float64 inputs."""

    def gemma3(self: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        return self._norm(x) * (1.0 + self.weight)

    def gemma4(self: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        return self._norm(x) * self.weight if self.with_scale else self._norm(x)

    def llama4_rotary(self: torch.nn.Module, x: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        angles = type(self).forward(self, x, position_ids)
        return angles.to(torch.complex128) if x.dtype == torch.float64 else angles

    rules = {
        "Gemma3RMSNorm": gemma3,
        "Gemma4RMSNorm": gemma4,
        "GemmaRMSNorm": gemma3,
        "Gemma2RMSNorm": gemma3,
        "Llama4TextRotaryEmbedding": llama4_rotary,
    }
    for module in model.modules():
        rule = rules.get(type(module).__name__)
        if rule is not None:
            module.forward = MethodType(rule, module)
    return model


def qwen3_5_moe_model(tiny_qwen3_5: Path, out: Path) -> Path:
    """A tiny Qwen3.5-MoE (``qwen3_5_moe``) next to the tiny Qwen3.5: the same tokenizer, processor, vision tower and
    layer pattern, every MLP a sparse block of 4 experts (top 2) with a shared expert, routers random."""
    import shutil

    from transformers import AutoConfig, Qwen3_5MoeConfig, Qwen3_5MoeForConditionalGeneration

    if (out / "model.safetensors").is_file():
        return out
    shutil.copytree(tiny_qwen3_5, out, ignore=shutil.ignore_patterns("model.safetensors", "config.json"))
    dense = AutoConfig.from_pretrained(tiny_qwen3_5).to_dict()
    text = {
        key: value for key, value in dense["text_config"].items() if key not in ("model_type", "intermediate_size")
    }
    text |= {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 64}
    text |= {"shared_expert_intermediate_size": 64}
    tokens = {key: dense[key] for key in ("image_token_id", "video_token_id", "vision_start_token_id")}
    config = Qwen3_5MoeConfig(
        text_config=text,
        vision_config=dense["vision_config"],
        vision_end_token_id=dense["vision_end_token_id"],
        tie_word_embeddings=False,
        **tokens,
    )
    torch.manual_seed(5)
    model = Qwen3_5MoeForConditionalGeneration(config)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                parameter.normal_(0.0, 0.5)
    model.save_pretrained(out)
    return out


def paligemma_gemma_model(tiny_paligemma: Path, out: Path) -> Path:
    """A tiny PaliGemma (1) next to the tiny PaliGemma 2: the same tokenizer, processor, vision tower and widths, with
    a Gemma text model instead of Gemma 2 (no layer types: one attention mask for every layer)."""
    from transformers import AutoConfig, GemmaConfig, PaliGemmaConfig, PaliGemmaForConditionalGeneration

    if (out / "model.safetensors").is_file():
        return out
    shutil.copytree(tiny_paligemma, out, ignore=shutil.ignore_patterns("model.safetensors", "config.json"))
    config = AutoConfig.from_pretrained(tiny_paligemma)
    text = config.text_config
    names = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    names += ("num_key_value_heads", "head_dim", "pad_token_id", "eos_token_id", "bos_token_id")
    gemma = GemmaConfig(**{name: getattr(text, name) for name in names}, tie_word_embeddings=False)
    paligemma = PaliGemmaConfig(
        text_config=gemma,
        vision_config=config.vision_config,
        image_token_index=config.image_token_index,
        vocab_size=config.vocab_size,
        projection_dim=config.projection_dim,
        hidden_size=config.hidden_size,
        tie_word_embeddings=False,
    )
    torch.manual_seed(6)
    PaliGemmaForConditionalGeneration(paligemma).save_pretrained(out)
    return out
