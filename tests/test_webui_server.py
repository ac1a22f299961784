"""The web app keeps its rules under attack: the real app on a loopback port, real (and forged) HTTP requests.

One server for the module (127.0.0.1 only, never another address); its workspace holds links out of it from the
start. The requests follow Gradio's own protocol: ``/gradio_api/upload`` then ``/gradio_api/call/<api_name>``.
"""
from __future__ import annotations

import json
import os
import socket
import stat
import tempfile
import threading
import time
import uuid
from pathlib import Path

import httpx
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from sdtune.toy import world as tw
from webui.server import allowed_hosts, is_loopback
from webui.training import form_defaults

OFF_TARGETS = ["off", 8, 0] * 4


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from webui.server import launch

    root = tmp_path_factory.mktemp("sec")
    ws, outside = root / "ws", root / "outside"
    tw.write_instance_folder("sks", outside / "images", n=2)
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(2, 4), "lora_unet_x.lora_up.weight": torch.zeros(4, 2)},
              outside / "adapter.safetensors")
    (outside / "secret.txt").write_text("not for the web")
    tw.write_instance_folder("ohwx", ws / "datasets" / "ohwx", n=2)
    (ws / "datasets" / "linked").symlink_to(outside / "images")  # a link out of the workspace, there at start
    (ws / "dangling").symlink_to(root / "missing")
    (ws / "library").mkdir(parents=True)
    (ws / "library" / "linked.safetensors").symlink_to(outside / "adapter.safetensors")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = launch(port=port, workspace=ws, block=False)
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
        yield client, ws, outside, port
    app.close()


def upload(client, *paths) -> list[str]:
    r = client.post("/gradio_api/upload", files=[("files", (Path(p).name, Path(p).read_bytes())) for p in paths])
    assert r.status_code == 200, r.text
    return r.json()


def file_data(path) -> dict:
    return {"path": str(path), "orig_name": Path(path).name, "meta": {"_type": "gradio.FileData"}}


def call(client, api_name: str, data: list) -> tuple[str, object]:
    """Run one event through Gradio's REST protocol; ("complete", outputs) or ("error", message)."""
    r = client.post(f"/gradio_api/call/{api_name}", json={"data": data})
    assert r.status_code == 200, r.text
    event, payload = None, None
    with client.stream("GET", f"/gradio_api/call/{api_name}/{r.json()['event_id']}") as stream:
        for line in stream.iter_lines():
            if line.startswith("event: "):
                event = line.removeprefix("event: ")
            elif line.startswith("data: ") and event in ("complete", "error"):
                return event, json.loads(line.removeprefix("data: "))
    raise AssertionError(f"no result from {api_name}")


def train_request(images, folder="", steps=2, prompt="a sks star") -> list:
    d = form_defaults("demo")
    targets = [v or 0 for p in ("attn", "resnet", "sample", "te") for v in d.targets[p]]
    return ["demo", images, folder, prompt, "", steps, d.lr, d.lr_text, 0, "x", *targets]


def files_under(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()]


def test_gradio_temp_folder_is_private_to_the_workspace(server):
    client, ws, _, _ = server
    (path,) = upload(client, *tw.write_instance_folder("sks", ws.parent / "src", n=1))
    cache = ws / ".cache"
    assert Path(path).resolve().is_relative_to(cache) and stat.S_IMODE(cache.stat().st_mode) == 0o700
    assert client.get(f"/gradio_api/file={path}").status_code == 200  # the app serves what it received
    # a file this server never received, in the system-wide Gradio folder another app would use
    other = Path(tempfile.gettempdir()) / "gradio" / f"other-{uuid.uuid4().hex}"
    other.mkdir(parents=True)
    try:
        (other / "private.txt").write_text("another app's upload")
        Image.new("RGB", (64, 64)).save(other / "private.png")
        for target in (other / "private.txt", ws.parent / "outside" / "secret.txt", Path("/etc/hostname")):
            r = client.get(f"/gradio_api/file={target}")
            assert r.status_code == 403 and "another app" not in r.text
        event, message = call(client, "train_start", train_request([file_data(other / "private.png")]))
        assert event == "error"
    finally:
        for p in other.iterdir():
            p.unlink()
        other.rmdir()
    assert files_under(ws / "uploads") == [] and files_under(ws / "runs") == []


@pytest.mark.parametrize("host, origin", [("rebind.evil.example:{port}", "http://rebind.evil.example:{port}"),
                                          ("127.0.0.1:{port}", "http://evil.example"),
                                          ("127.0.0.1:{port}", "null"),
                                          ("127.0.0.1:1", None)])
def test_foreign_host_or_origin_is_refused(server, host, origin):
    client, ws, _, port = server
    headers = {"Host": host.format(port=port)} | ({"Origin": origin.format(port=port)} if origin else {})
    r = client.get("/", headers=headers)
    assert r.status_code == 403
    assert "access-control-allow-origin" not in r.headers
    before = files_under(ws / ".cache")
    r = client.post("/gradio_api/upload", headers=headers, files=[("files", ("a.png", b"\x89PNG"))])
    assert r.status_code == 403 and files_under(ws / ".cache") == before  # nothing stored


def test_loopback_names_with_the_port_are_served(server):
    client, _, _, port = server
    for name in ("127.0.0.1", "localhost", "[::1]"):
        r = client.get("/", headers={"Host": f"{name}:{port}", "Origin": f"http://{name}:{port}"})
        assert r.status_code == 200
        assert r.headers.get("access-control-allow-origin") in (None, f"http://{name}:{port}")
    assert client.get("/monitoring/summary").status_code in (403, 404)  # Gradio's monitoring endpoint is off


def test_a_safetensors_without_adapter_modules_is_not_imported(server):
    client, ws, _, _ = server
    foo = ws.parent / "foo.safetensors"
    save_file({"foo": torch.zeros(3)}, foo)
    (path,) = upload(client, foo)
    event, message = call(client, "library_import", [[file_data(path)]])
    assert event == "error"
    assert not (ws / "library" / "foo.safetensors").exists() and not Path(path).exists()  # nothing kept


def test_a_refused_form_leaves_no_file(server):
    client, ws, _, _ = server
    paths = upload(client, *tw.write_instance_folder("sks", ws.parent / "src2", n=2))
    for bad in (dict(steps=0), dict(steps=2, prompt="")):
        event, _ = call(client, "train_start", train_request([file_data(p) for p in paths], **bad))
        assert event == "error"
    big = ws.parent / "big.png"
    big.write_bytes(b"\x89PNG" + os.urandom(21 * 2**20))
    (big_path,) = upload(client, big)
    event, message = call(client, "train_start", train_request([file_data(p) for p in [*paths, big_path]]))
    assert event == "error" and not Path(big_path).exists()  # a refused file is not kept in the cache either
    assert files_under(ws / "uploads") == [] and files_under(ws / "runs") == []


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_a_large_pixel_png_is_refused_from_its_header(server):
    client, ws, _, _ = server
    huge = ws.parent / "huge.png"
    Image.new("1", (13_000, 13_000)).save(huge)  # 169 megapixels, a few kB on disk: over the 50 MP cap
    assert huge.stat().st_size < 1_000_000
    (path,) = upload(client, huge)
    peak, stop = [_rss_mb()], threading.Event()

    def watch():
        while not stop.is_set():
            peak.append(_rss_mb())
            time.sleep(0.005)

    watcher = threading.Thread(target=watch)
    watcher.start()
    t0 = time.perf_counter()
    event, message = call(client, "train_start", train_request([file_data(path)]))
    seconds = time.perf_counter() - t0
    stop.set()
    watcher.join()
    assert event == "error" and "megapixels" in str(message)
    assert seconds < 2.0 and max(peak) - peak[0] < 100  # decoded, it would take 507 MB (RGB) and seconds
    assert files_under(ws / "uploads") == []


def test_links_out_of_the_workspace_are_skipped_and_refused(server):
    client, ws, _, _ = server
    config = client.get("/config").text  # the app started, and lists what it holds
    assert "datasets/ohwx" in config and "datasets/linked" not in config and "linked.safetensors" not in config
    event, message = call(client, "train_start", train_request(None, folder="datasets/linked"))
    assert event == "error" and "outside" in str(message)
    assert str(ws) not in str(message)  # messages name workspace-relative paths


def test_allowed_hosts_follow_the_bound_address():
    assert allowed_hosts("127.0.0.1") == ["127.0.0.1", "localhost", "[::1]"]
    assert allowed_hosts("0.0.0.0", ["studio.lan"]) == ["127.0.0.1", "localhost", "[::1]", "studio.lan"]
    assert allowed_hosts("192.168.1.5")[-1] == "192.168.1.5" and allowed_hosts("::1")[2] == "[::1]"
    assert allowed_hosts("0.0.0.0", ["*"]) is None and allowed_hosts("127.0.0.1", share=True) is None
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5")
