"""The LlamaBoard UI the web UI tests build, in a module of its own: the tests build it in-process, and a fresh
interpreter imports it (``from tests.webui_app import build_ui``) without importing any test module."""

from __future__ import annotations

from typing import Any


def build_ui() -> tuple[Any, Any]:
    """The top bar and the Train tab, built the way ``llamafactory.webui.interface.create_ui`` does: (engine, blocks).

    ``Engine()`` writes ``llamaboard_cache`` into the current directory.
    """
    import gradio as gr
    from llamafactory.webui.components import create_top, create_train_tab
    from llamafactory.webui.engine import Engine

    engine = Engine()
    with gr.Blocks() as blocks:
        engine.manager.add_elems("top", create_top())
        with gr.Tab("Train"):
            engine.manager.add_elems("train", create_train_tab(engine))
    return engine, blocks
