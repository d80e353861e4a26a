"""Tiny, random-init multimodal models that LLaMA-Factory loads offline, one or more per model family.

Each family module (``aimkp_plugin.families``) lists its tiny models and builds them: a complete model folder
(weights, config, tokenizer trained locally with ``tokenizers``, processor and chat template) written with
``save_pretrained``, so ``llamafactory-cli`` loads it with ``HF_HUB_OFFLINE=1``. Builds are deterministic (fixed
seeds, a fixed training corpus) and cached: a folder whose ``aimkp_build.json`` matches the requested spec is reused
as it is.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

from ..families import FAMILIES, FAMILY_BY_NAME
from .building import TinyModelSpec


BUILD_MARKER = "aimkp_build.json"
TINY_MODELS: dict[str, TinyModelSpec] = {spec.name: spec for family in FAMILIES for spec in family.tiny_models}
# earlier names of tiny models (recipes and scripts use them); each family's first tiny model carries its name now
TINY_ALIASES: dict[str, str] = {"qwen2vl": "qwen2_vl", "qwen2_5vl": "qwen2_5_vl", "qwen3vl": "qwen3_vl"}


def tiny_spec(name: str) -> TinyModelSpec:
    """The spec of tiny model ``name`` (or of an alias of it)."""
    spec = TINY_MODELS.get(TINY_ALIASES.get(name, name))
    if spec is None:
        known = [*TINY_MODELS, *TINY_ALIASES]
        raise ValueError(f"Unknown tiny model {name!r}; choose one of: {', '.join(known)}.")
    return spec


def is_built(spec: TinyModelSpec, out: Path) -> bool:
    marker = out / BUILD_MARKER
    if not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text()).get("fingerprint") == spec.fingerprint()
    except (OSError, ValueError):
        return False


def build_tiny_model(name: str, out: str | os.PathLike[str], force: bool = False) -> Path:
    """Build the tiny model ``name`` (one of ``TINY_MODELS``, or an alias) into ``out``; reuse a matching earlier
    build."""
    spec = tiny_spec(name)
    out = Path(out)
    if not force and is_built(spec, out):
        return out

    import torch

    out.mkdir(parents=True, exist_ok=True)
    (out / BUILD_MARKER).unlink(missing_ok=True)
    torch.manual_seed(spec.seed)
    FAMILY_BY_NAME[spec.family].build_tiny(spec, out)
    marker = {"fingerprint": spec.fingerprint(), "spec": asdict(spec), "template": spec.template}
    (out / BUILD_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    return out


def build_tiny_models(out_root: str | os.PathLike[str], names: list[str] | None = None, force: bool = False) -> dict:
    """Build several tiny models under ``out_root/<name>``; returns ``{name: path}``."""
    return {name: build_tiny_model(name, Path(out_root) / name, force=force) for name in names or list(TINY_MODELS)}
