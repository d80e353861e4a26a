"""Interpreter-start bootstrap, run by ``aimkp_plugin.pth`` in every Python process of the environment.

It only installs a post-import finder on ``sys.meta_path`` (using nothing but ``sys`` and the import-free table of
hooked modules), so a program that never imports LLaMA-Factory pays two small module imports and nothing else. When
one of ``HOOKED_MODULES`` finishes executing, ``aimkp_plugin.integration.patching.on_module_imported`` patches it.
This reaches ``llamafactory-cli train``, the torchrun children of ``FORCE_TORCHRUN=1``, LlamaBoard and the training
process it starts, none of which offers a plugin API. Any error in a patch is printed as one line and never
propagates into the importing program.
"""

import sys

from aimkp_plugin.integration.touch_points import HOOKED_MODULES  # the touch-point table; imports nothing


FINDER_MARKER = "_aimkp_post_import_finder"


class _PatchingLoader:
    """Wraps a module's real loader and runs the plugin's patches right after the module body executed."""

    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        _run_patches(module)

    def __getattr__(self, name):  # get_source, is_package, get_code, ... stay the real loader's
        return getattr(self._loader, name)


class PostImportFinder:
    """A ``sys.meta_path`` finder that never finds anything itself: it wraps the loader of hooked modules."""

    def __init__(self):
        setattr(self, FINDER_MARKER, True)
        self._resolving = set()

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in HOOKED_MODULES or fullname in self._resolving:
            return None
        self._resolving.add(fullname)
        try:
            spec = None
            for finder in sys.meta_path:
                find_spec = getattr(finder, "find_spec", None)
                if finder is self or find_spec is None:
                    continue
                spec = find_spec(fullname, path, target)
                if spec is not None:
                    break
        finally:
            self._resolving.discard(fullname)
        if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _PatchingLoader(spec.loader)
        return spec

    def invalidate_caches(self):
        return None


def _run_patches(module):
    try:
        from aimkp_plugin.integration.patching import on_module_imported

        on_module_imported(module)
    except Exception as err:  # a broken plugin must never break the program importing LLaMA-Factory
        print(f"aimkp-plugin: could not patch {module.__name__} ({type(err).__name__}: {err})", file=sys.stderr)


def install():
    """Put the finder first on ``sys.meta_path``; a second call (or a second copy of the plugin) is a no-op."""
    if not any(getattr(finder, FINDER_MARKER, False) for finder in sys.meta_path):
        sys.meta_path.insert(0, PostImportFinder())


install()
