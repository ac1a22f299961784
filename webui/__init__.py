"""The sdtune web app: ``launch()`` serves it (``webui/server.py``); ``build_app(workspace)`` returns the Gradio Blocks.

Gradio is imported only when the app is built, so that ``launch`` first points its temp folder into the workspace.
"""
from .server import launch

__all__ = ["build_app", "launch"]


def __getattr__(name: str):
    if name == "build_app":
        from .app import build_app

        return build_app
    raise AttributeError(f"module 'webui' has no attribute {name!r}")
