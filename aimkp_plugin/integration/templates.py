"""LLaMA-Factory's template registry, read at run time: which templates have a multimodal plugin.

``llamafactory.data.template.TEMPLATES`` maps a template name to its ``Template``, whose ``mm_plugin`` is a
``BasePlugin`` for text-only templates and a subclass of it for templates that lay out images, videos or audio.
Read, never patched. Tested on llamafactory 0.9.5 and main (0.9.6.dev0).
"""

from __future__ import annotations


TEXT_ONLY_PLUGIN = "BasePlugin"


def multimodal_templates() -> dict[str, str]:
    """Every registered template with a multimodal plugin: template name → the plugin's class name, in the
    registry's order."""
    from llamafactory.data.template import TEMPLATES

    plugins = {name: type(template.mm_plugin).__name__ for name, template in TEMPLATES.items()}
    return {name: plugin for name, plugin in plugins.items() if plugin != TEXT_ONLY_PLUGIN}
