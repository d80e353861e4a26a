"""The patch mechanism: replacing an attribute of a LLaMA-Factory module reversibly, applying the patches of the
touch-point table (:mod:`~aimkp_plugin.integration.touch_points`), version support, and what happened.

``_bootstrap.PostImportFinder`` calls :func:`on_module_imported` right after each hooked module executed. Applying a
patch twice is a no-op, and :func:`revert_all` puts every original back. The patch modules import this module; this
module imports them only through the table's names, when their LLaMA-Factory module is imported.
"""

from __future__ import annotations

import functools
import importlib
import json
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

from .. import __version__
from ..config import plugin_disabled
from .touch_points import GUARD_PATCHES, PATCHES


# [lowest, first unsupported), compared by release number, so 0.9.6's pre-releases (main's 0.9.6.dev0) are in
SUPPORTED_LLAMAFACTORY = ((0, 9, 5), (0, 9, 7))
SUPPORTED_LLAMAFACTORY_TEXT = ">=0.9.5,<0.9.7"
FIX_COMMAND = "pip install 'llamafactory>=0.9.5,<0.9.7'"
PATCH_MARKER = "__aimkp_patch__"
TRACE_ENV = "AIMKP_PLUGIN_TRACE"


class AimkpNotActiveError(RuntimeError):
    """AimKP was asked for, but the plugin's patches are not (all) in place in this process."""


@dataclass
class PatchStatus:
    """What happened to the patches in this process."""

    applied: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    inactive_reason: str | None = None  # set when the plugin is disabled or LLaMA-Factory is unsupported
    originals: list[tuple[Any, str, Any]] = field(default_factory=list)  # (owner, attribute, original) to revert


STATUS = PatchStatus()
_version_checked = False
# LLaMA-Factory modules imported while an integration module that their patches need is still importing; their
# patches run when it is done (hold_patches, release_patches)
_held: list[ModuleType] | None = None


def installed_llamafactory_version() -> str:
    from importlib.metadata import version

    return version("llamafactory")


def _release(version: str) -> tuple[int, int, int]:
    """``"0.9.5.dev0"`` -> ``(0, 9, 5)``; missing parts count as 0."""
    match = re.match(r"(\d+)(?:\.(\d+))?(?:\.(\d+))?", version)
    major, minor, micro = match.groups() if match else ("0", None, None)
    return int(major), int(minor or 0), int(micro or 0)


def llamafactory_version_problem(version: str) -> str | None:
    """Why ``version`` is unsupported (with the supported range and the fixing pip command), or None."""
    low, high = SUPPORTED_LLAMAFACTORY
    if low <= _release(version) < high:
        return None
    return (
        f"llamafactory {version} is not supported by aimkp-plugin {__version__} "
        f"(supported: llamafactory{SUPPORTED_LLAMAFACTORY_TEXT}). Fix: {FIX_COMMAND}"
    )


def trace(module: str, patch: str, outcome: str) -> None:
    """Append one JSON line per patch event to ``$AIMKP_PLUGIN_TRACE`` (for checking every process is reached)."""
    path = os.environ.get(TRACE_ENV)
    if not path:
        return
    event = {"pid": os.getpid(), "rank": os.environ.get("RANK"), "module": module, "patch": patch, "outcome": outcome}
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(event) + "\n")


def replace_attribute(owner: Any, name: str, patch_name: str, make_replacement: Callable[[Any], Any]) -> bool:
    """Replace ``owner.name`` by ``make_replacement(original)``; False (and no change) if already replaced.

    The replacement is marked with the patch name and keeps ``__wrapped__``, so a second application is detected
    and :func:`revert_all` can restore the original.
    """
    original = getattr(owner, name)  # AttributeError here means LLaMA-Factory changed: reported as a failed patch
    if getattr(original, PATCH_MARKER, None) == patch_name:
        return False
    replacement = make_replacement(original)
    if callable(original) and not isinstance(original, type):
        functools.update_wrapper(replacement, original)
    setattr(replacement, PATCH_MARKER, patch_name)
    setattr(owner, name, replacement)
    STATUS.originals.append((owner, name, original))
    return True


def wrap_function(owner: Any, name: str, patch_name: str, wrapper: Callable[..., Any]) -> bool:
    """Replace the function ``owner.name`` by ``wrapper(original, *args, **kwargs)``."""

    def make(original: Callable[..., Any]) -> Callable[..., Any]:
        def patched(*args: Any, **kwargs: Any) -> Any:
            return wrapper(original, *args, **kwargs)

        return patched

    return replace_attribute(owner, name, patch_name, make)


def _resolve(table: dict[str, tuple[str, ...]], *modules: str) -> dict[str, tuple[Callable[[ModuleType], None], ...]]:
    """The entries of ``modules`` (all when none is named), each ``"<module>:<function>"`` replaced by that function
    of ``aimkp_plugin.integration``. Only the named entries' integration modules are imported."""
    resolved = {}
    for hooked in modules or tuple(table):
        functions = []
        for name in table.get(hooked, ()):
            module_name, function = name.split(":")
            functions.append(getattr(importlib.import_module(f"{__package__}.{module_name}"), function))
        resolved[hooked] = tuple(functions)
    return resolved


def registry(*modules: str) -> dict[str, tuple[Callable[[ModuleType], None], ...]]:
    """The patches of the hooked ``modules`` (all when none is named), as functions."""
    return _resolve(PATCHES, *modules)


def guard_registry(*modules: str) -> dict[str, tuple[Callable[[ModuleType], None], ...]]:
    """The patches applied instead while the plugin is inactive."""
    return _resolve(GUARD_PATCHES, *modules)


def _check_activation() -> str | None:
    """Why the plugin is inactive in this process (disabled, unsupported LLaMA-Factory), or None; checked once."""
    global _version_checked
    if plugin_disabled():
        STATUS.inactive_reason = "it is disabled by AIMKP_PLUGIN_DISABLE=1"
    elif not _version_checked:
        _version_checked = True
        problem = llamafactory_version_problem(installed_llamafactory_version())
        if problem is not None:
            STATUS.inactive_reason = problem
            print(f"aimkp-plugin: {problem}. AimKP is off in this process.", file=sys.stderr)
    return STATUS.inactive_reason


def apply_patch(patch: Callable[[ModuleType], None], module: ModuleType) -> bool:
    """Apply one patch; a failure is recorded and printed as one line, never raised."""
    try:
        patch(module)
    except Exception as err:
        reason = f"{type(err).__name__}: {err}"
        STATUS.failed[patch.__name__] = reason
        trace(module.__name__, patch.__name__, "failed")
        print(
            f"aimkp-plugin: patch {patch.__name__} failed on {module.__name__} ({reason}); "
            "AimKP will refuse to train in this process.",
            file=sys.stderr,
        )
        return False
    if patch.__name__ not in STATUS.applied:
        STATUS.applied.append(patch.__name__)
    trace(module.__name__, patch.__name__, "applied")
    return True


def on_module_imported(module: ModuleType) -> None:
    """Entry point of the post-import hook: patch ``module`` if the registry names it (later, while patches are held).
    A patch that cannot even be found is recorded as failed, as one that raises is."""
    if _held is not None:
        _held.append(module)
        return
    try:
        patches = (guard_registry if _check_activation() else registry)(module.__name__)
    except Exception as err:  # the patch's integration module failed to import: report it, as a failed patch
        reason = f"{type(err).__name__}: {err}"
        STATUS.failed[module.__name__] = reason
        print(f"aimkp-plugin: the patches of {module.__name__} could not be loaded ({reason}).", file=sys.stderr)
        return
    for patch in patches.get(module.__name__, ()):
        apply_patch(patch, module)


def hold_patches() -> None:
    """Hold back the patches of the LLaMA-Factory modules imported from now on, until :func:`release_patches`.

    For an integration module that imports LLaMA-Factory modules whose own patches need that integration module
    complete: ``trainer`` subclasses LLaMA-Factory's trainer, and importing it imports LLaMA-Factory's SFT workflow,
    whose patch installs the subclass. Without holding, that patch would find the trainer module half-initialised."""
    global _held
    if _held is None:
        _held = []


def release_patches() -> None:
    """Apply the patches held since :func:`hold_patches`."""
    global _held
    held, _held = _held or [], None
    for module in held:
        on_module_imported(module)


def apply_aimkp_to_llamafactory() -> PatchStatus:
    """Import the hooked LLaMA-Factory modules and patch them now (also those imported before the hook existed).

    Needed only by programs that run without the ``.pth`` activation (for example ``python -S``); calling it again
    changes nothing.
    """
    table = guard_registry() if _check_activation() else registry()
    for module_name, patches in table.items():
        module = importlib.import_module(module_name)
        for patch in patches:
            apply_patch(patch, module)
    return STATUS


def revert_all() -> None:
    """Put every patched attribute back to LLaMA-Factory's original, newest first."""
    while STATUS.originals:
        owner, name, original = STATUS.originals.pop()
        setattr(owner, name, original)
    STATUS.applied.clear()


def require_active() -> None:
    """Raise a clear error unless every patch that has run so far succeeded and the plugin is active."""
    if _held:
        raise AimkpNotActiveError(
            "This config asks for aimkp: true, but aimkp-plugin's patches of "
            f"{', '.join(module.__name__ for module in _held)} are still held (an integration module failed to "
            "finish importing)."
        )
    if STATUS.inactive_reason:
        raise AimkpNotActiveError(
            f"This config asks for aimkp: true, but aimkp-plugin is not active: {STATUS.inactive_reason}."
        )
    if STATUS.failed:
        failures = "; ".join(f"{name} ({reason})" for name, reason in STATUS.failed.items())
        raise AimkpNotActiveError(
            f"This config asks for aimkp: true, but some aimkp-plugin patches failed: {failures}. "
            f"Supported: llamafactory{SUPPORTED_LLAMAFACTORY_TEXT}; {FIX_COMMAND}"
        )
