"""Serving the web app: Gradio's temp folder private to the workspace, a Host/Origin guard, Gradio's extras off.

    sdtune ui --workspace ws                   # http://127.0.0.1:7860
    python -m webui.server --workspace ws      # the same without the CLI

Gradio is imported only here, inside ``launch``, after ``GRADIO_TEMP_DIR`` points at ``<workspace>/.cache`` (mode
0700): uploads and served copies never land in the system-wide ``<tmp>/gradio``, and Gradio's ``delete_cache``
(``webui.app.DELETE_CACHE``) cleans that folder. ``HostGuard`` wraps the whole ASGI app (outside Gradio's own CORS
middleware, so nothing it refuses carries an ``access-control-allow-origin``).
"""
from __future__ import annotations

import argparse
import ipaddress
import os
import warnings
from pathlib import Path
from urllib.parse import urlsplit

from sdtune.data.intake import DEFAULT_MAX_PIXELS

from .workspace import MAX_ADAPTER_BYTES, Workspace

LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")
FILE_ROUTES = ("/gradio_api/file=", "/gradio_api/file/")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def allowed_hosts(host: str, extra: list[str] | None = None, share: bool = False) -> list[str] | None:
    """Host names a request may address (``Host``/``Origin``), without port; None: any (``share``, or ``*`` in
    ``extra``: the tunnel's or the user's names are not known here). Loopback names always; a bound address too."""
    extra = [h.strip().lower() for h in extra or [] if h.strip()]
    if share or "*" in extra:
        return None
    names = list(LOOPBACK_NAMES)
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
        bound = None if ip.is_unspecified else (f"[{ip}]" if ip.version == 6 else str(ip))
    except ValueError:
        bound = host.lower()
    return list(dict.fromkeys([*names, *([bound] if bound else []), *extra]))


class HostGuard:
    """ASGI middleware: 403 for a request whose ``Host`` is not an allowed name with the served port (DNS rebinding),
    whose ``Origin``, when sent, is not such a host (a foreign web page), or that asks the file route for anything
    outside the workspace. ``hosts`` None: only the file rule."""

    def __init__(self, app, *, hosts: list[str] | None, port: int, root: Path):
        self.app, self.root = app, Path(root).resolve()
        self.hosts = None if hosts is None else {f"{h}:{port}" for h in hosts} | (
            set(hosts) if port == 80 else set())

    def refusal(self, scope) -> str | None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if self.hosts is not None:
            host = headers.get("host", "").lower()
            if host not in self.hosts:
                return f"host {host!r} is not served here"
            origin = headers.get("origin")
            if origin is not None and not (urlsplit(origin.lower()).scheme in ("http", "https")
                                           and urlsplit(origin.lower()).netloc in self.hosts):
                return f"origin {origin!r} is not allowed"
        path = scope.get("path", "")
        for route in FILE_ROUTES:
            if path.startswith(route):
                target = path[len(route):]
                inside = "://" not in target and Path(target).is_absolute() and \
                    Path(target).resolve().is_relative_to(self.root)
                if not inside:
                    return "only files inside the workspace are served"
        return None

    async def __call__(self, scope, receive, send):
        if scope["type"] in ("http", "websocket"):
            reason = self.refusal(scope)
            if reason is not None:
                if scope["type"] == "websocket":
                    await send({"type": "websocket.close", "code": 1008})
                    return
                body = f"refused: {reason}\n".encode()
                await send({"type": "http.response.start", "status": 403,
                            "headers": [(b"content-type", b"text/plain; charset=utf-8"),
                                        (b"content-length", str(len(body)).encode())]})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)


def _guarded_app(**guard):
    """Gradio's FastAPI app with ``HostGuard`` outermost (outside Gradio's CORS middleware)."""
    from gradio.routes import App, ORJSONResponse

    class GuardedApp(App):
        def build_middleware_stack(self):
            return HostGuard(super().build_middleware_stack(), **guard)

    return GuardedApp(default_response_class=ORJSONResponse)


def launch(host: str = "127.0.0.1", port: int = 7860, workspace: str | Path = "sdtune-workspace", share: bool = False,
           model_source=None, block: bool = True, allowed_host: list[str] | None = None,
           max_pixels: int = DEFAULT_MAX_PIXELS):
    """Serve the app (``block=False`` returns the running ``gr.Blocks``; tests). Anything but a loopback host, or
    ``share``, exposes training, file writes and the workspace to the network, hence the warning."""
    ws = Workspace(workspace, max_pixels)
    cache = ws.private_cache()
    os.environ["GRADIO_TEMP_DIR"] = str(cache / "gradio")  # read by Gradio when it makes components and its app
    os.environ["GRADIO_EXAMPLES_CACHE"] = str(cache / "examples")  # else ./.gradio/ is served from the cwd
    hosts = allowed_hosts(host, allowed_host, share)
    if not is_loopback(host) or share:
        check = ("no Host check: any name reaches it" if hosts is None else
                 f"requests must name one of {', '.join(hosts)} (add the names clients use with --allowed-host NAME, "
                 f"or '*' for any)")
        warnings.warn(f"sdtune ui: serving on {host}{' with a public share link' if share else ''}: anyone who can "
                      f"reach it can train, upload and delete files in the workspace; {check}. Use 127.0.0.1 unless "
                      f"you mean it.", stacklevel=2)
    from .app import CSS, build_app  # imports Gradio, after GRADIO_TEMP_DIR is set

    app = build_app(ws.root, model_source, max_pixels)
    app.queue(default_concurrency_limit=1)
    app.launch(server_name=host, server_port=port, share=share, allowed_paths=[str(ws.root)],
               max_file_size=MAX_ADAPTER_BYTES, prevent_thread_lock=not block, quiet=not block, css=CSS,
               enable_monitoring=False, ssr_mode=False, num_workers=0, mcp_server=False,
               _app=_guarded_app(hosts=hosts, port=port, root=ws.root))
    return app


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m webui.server", description="the sdtune web app")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--workspace", default="sdtune-workspace")
    p.add_argument("--model", default=None)
    p.add_argument("--share", action="store_true")
    p.add_argument("--allowed-host", action="append", default=None)
    a = p.parse_args(argv)
    launch(a.host, a.port, a.workspace, a.share, a.model, allowed_host=a.allowed_host)


if __name__ == "__main__":
    main()
