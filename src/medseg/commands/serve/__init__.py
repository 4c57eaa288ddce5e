"""``medseg serve``: one trained model behind a local web page and an HTTP endpoint.

The model is loaded once (`ServedModel`: a run folder, a checkpoint, a safetensors or ONNX
export, through the Predictor `medseg predict` uses). One FastAPI application serves the page
(Gradio, `medseg.commands.serve.page`) at ``/`` and the endpoint for scripts
(`medseg.commands.serve.endpoint`) at ``/v1/``; it listens on the loopback address unless
another host is asked for. Everything an upload leaves (the file, Gradio's copies, the files
offered for download) is in one temporary folder, removed when the server stops. Nothing is
fetched from the network: analytics are off and the page's scripts and fonts are Gradio's own.
Gradio is the optional extra ``medseg[serve]``.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from medseg.commands.serve.about import card_text, example_images
from medseg.commands.serve.model import MAX_UPLOAD_BYTES, ServedModel
from medseg.core.optional import require
from medseg.data.io import MAX_PIXELS

LOOPBACK = ("127.0.0.1", "localhost", "::1")
# Set while a server runs (and restored after): Gradio keeps its files in our temporary
# folder and reports nothing; huggingface_hub, which it imports, stays offline.
QUIET_ENVIRONMENT = {
    "GRADIO_ANALYTICS_ENABLED": "False",
    "HF_HUB_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
}


def require_serving():
    """Gradio (with FastAPI and uvicorn, which it brings), or the one line naming the extra."""
    return require("gradio", extra="medseg[serve]", purpose="medseg serve (the web page)")


@dataclass
class Server:
    """A server running in a background thread (`running`): its address and its model."""

    url: str
    served: ServedModel
    folder: Path  # the temporary folder of its uploads, removed when it stops


def serve(
    checkpoint: str | os.PathLike, *, host: str = "127.0.0.1", port: int = 7860,
    device: str = "auto", precision: str = "auto", max_pixels: int = MAX_PIXELS,
) -> None:  # fmt: skip
    """Serve ``checkpoint`` until Ctrl-C (or SIGTERM); then its temporary folder is removed.

    Prints where the page is; for a host other than the loopback address, a one-line warning
    on stderr that the page has no login.
    """
    with server_folder() as folder:  # first: Gradio names its folders when imported
        require_serving()
        served = ServedModel(checkpoint, device=device, precision=precision, max_pixels=max_pixels)
        app = build_app(served, folder)
        sock = bind(host, port)
        address, warning = startup_lines(served, host, sock.getsockname()[1])
        print(address, flush=True)
        if warning:
            print(warning, file=sys.stderr, flush=True)
        with contextlib.suppress(KeyboardInterrupt):  # uvicorn re-raises Ctrl-C once stopped
            uvicorn_server(app).run(sockets=[sock])


@contextlib.contextmanager
def running(
    checkpoint: str | os.PathLike, *, host: str = "127.0.0.1", port: int = 0, **options
) -> Iterator[Server]:
    """`serve` in a background thread, for tests and notebooks: yields the `Server` once it
    answers, stops it on exit. ``port`` 0 takes a free one; ``options`` as `ServedModel`'s."""
    with server_folder() as folder:
        require_serving()
        served = ServedModel(checkpoint, **options)
        sock = bind(host, port)
        server = uvicorn_server(build_app(served, folder))
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        try:
            while not server.started and thread.is_alive():
                threading.Event().wait(0.05)
            url_host = f"[{host}]" if ":" in host else host
            yield Server(f"http://{url_host}:{sock.getsockname()[1]}", served, folder)
        finally:
            server.should_exit = True
            thread.join(timeout=30)
            sock.close()


def build_app(served: ServedModel, folder: Path):
    """The FastAPI application: the endpoint's routes at /v1/, the page at /."""
    import gradio as gr
    from fastapi import FastAPI

    from medseg.commands.serve.endpoint import add_routes
    from medseg.commands.serve.page import build_page

    app = FastAPI(title="medseg serve", docs_url=None, redoc_url=None, openapi_url=None)
    add_routes(app, served, uploads=folder / "uploads")
    config = served.predictor.config
    page = build_page(
        served,
        card=card_text(served.source, config, given=served.checkpoint),
        examples=example_images(served.source, config),
        downloads=folder / "gradio" / "downloads",  # in Gradio's cache: deleted with it
    )
    page.queue(default_concurrency_limit=1)  # one request at a time reaches the model
    return gr.mount_gradio_app(
        app, page, path="/", ssr_mode=False, max_file_size=served.max_upload_bytes,
        footer_links=["settings"], pwa=False, mcp_server=False, enable_monitoring=False,
    )  # fmt: skip


@contextlib.contextmanager
def server_folder() -> Iterator[Path]:
    """A new temporary folder for everything uploads leave, Gradio's files included, with the
    quiet environment set; the folder is removed and the environment restored on exit."""
    with tempfile.TemporaryDirectory(prefix="medseg-serve-") as name:
        folder = Path(name)
        for sub in ("uploads", "gradio"):
            (folder / sub).mkdir()
        settings = {**QUIET_ENVIRONMENT, "GRADIO_TEMP_DIR": str(folder / "gradio")}
        saved = {key: os.environ.get(key) for key in settings}
        os.environ.update(settings)
        try:
            yield folder
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host``:``port``; a port in use is named in one line."""
    from medseg.core.errors import MedsegError

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as error:
        sock.close()
        raise MedsegError(
            f"cannot listen on {host}:{port} ({error.strerror or error}); pass another --port "
            f"(or --host)"
        ) from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def uvicorn_server(app):
    import uvicorn

    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5)
    return uvicorn.Server(config)


def startup_lines(served: ServedModel, host: str, port: int) -> tuple[str, str | None]:
    """Where the page is and what it serves; for a non-loopback host, the one-line warning."""
    shown = f"[{host}]" if ":" in host else host
    address = (
        f"medseg serve: {served.source.describe()} ({served.checkpoint}) on "
        f"http://{shown}:{port} (the page; POST /v1/segment for scripts); Ctrl-C stops it"
    )
    if host in LOOPBACK:
        return address, None
    return address, (
        f"medseg: warning: listening on {host}, not only on this computer: the page has no "
        f"login, so anyone who can reach {host}:{port} can send images to it"
    )


__all__ = ["MAX_UPLOAD_BYTES", "Server", "ServedModel", "running", "serve"]
