"""The sdtune web app: ``build_app(workspace)`` returns the Gradio Blocks, ``launch()`` serves it."""
from .app import build_app, launch

__all__ = ["build_app", "launch"]
