"""The HTTP server (lightx2v_engine/server.py): LightX2V's task API on a real socket, with a tiny random-weights
pipeline end to end and a controllable fake for the queue's states (503, cancellation)."""
import base64
import io
import json
import os
import re
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from datetime import datetime
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from PIL import Image

from lightx2v_engine import server as S
from lightx2v_engine.video import read_mp4

pytestmark = pytest.mark.usefixtures("torch_ops")


def _wait_until(cond, timeout: float = 30.0) -> None:
    t0 = time.monotonic()
    while not cond():
        assert time.monotonic() - t0 < timeout, "condition not reached"
        time.sleep(0.01)


class Client:
    def __init__(self, app):
        self.httpd = S.serve(app, "127.0.0.1", 0)
        self.base = f"http://127.0.0.1:{self.httpd.server_port}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def call(self, method, path, body=None, raw=None, content_type="application/json"):
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        req = urllib.request.Request(self.base + path, data=data, method=method,
                                     headers={"Content-Type": content_type} if data is not None else {})
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                payload = r.read()
                return r.status, (json.loads(payload) if r.headers["Content-Type"] == "application/json" else payload)
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def wait(self, task_id, timeout=120):
        t0 = time.time()
        while time.time() - t0 < timeout:
            code, info = self.call("GET", f"/v1/tasks/{task_id}/status")
            if info["status"] not in ("pending", "processing"):
                return info
            time.sleep(0.05)
        raise TimeoutError(task_id)

    def close(self, app):
        self.httpd.shutdown()
        self.httpd.server_close()
        app.queue.close()


@pytest.fixture(scope="module")
def t2v_pipe():
    from lightx2v_engine.pipeline import Pipeline
    return Pipeline.random("tiny", {"target_video_length": 5, "target_height": 32, "target_width": 48}, device="cpu")


def test_t2v_task_end_to_end(t2v_pipe, tmp_path):
    app = S.App(S.pipeline_generate(t2v_pipe), output_dir=tmp_path / "out", infer_steps=4, task="t2v",
                metadata={"model": "tiny"})
    c = Client(app)
    try:
        code, created = c.call("POST", "/v1/tasks/video/", {"prompt": "a red car", "seed": 3,
                                                             "save_result_path": "cars/red"})
        assert code == 200 and created["task_status"] == "pending"
        assert created["save_result_path"] == str((tmp_path / "out" / "cars" / "red.mp4").resolve())
        info = c.wait(created["task_id"])
        assert info["status"] == "completed" and info["error"] is None
        # LightX2V's times: ISO 8601 local time (datetime.now().isoformat()), end_time set when finished
        start, end = (datetime.fromisoformat(info[k]) for k in ("start_time", "end_time"))
        assert start.tzinfo is None and start <= end and abs((datetime.now() - end).total_seconds()) < 600
        code, video = c.call("GET", f"/v1/tasks/{created['task_id']}/result")
        assert code == 200 and video[4:8] == b"ftyp"
        (tmp_path / "got.mp4").write_bytes(video)
        frames = read_mp4(tmp_path / "got.mp4")
        assert frames.shape == (5, 32, 48, 3)
        # the same seed through the pipeline directly: the same video
        want = read_mp4(t2v_pipe.generate("a red car", seed=3).save(tmp_path / "want.mp4"))
        np.testing.assert_array_equal(frames, want)
        code, same = c.call("GET", "/v1/files/download/cars/red.mp4")
        assert code == 200 and same == video
        # another size per request; the old alias endpoint
        code, created2 = c.call("POST", "/v1/tasks/", {"prompt": "a boat", "target_shape": [48, 32],
                                                        "target_video_length": 9})
        assert c.wait(created2["task_id"])["status"] == "completed"
        code, video2 = c.call("GET", f"/v1/tasks/{created2['task_id']}/result")
        (tmp_path / "got2.mp4").write_bytes(video2)
        assert read_mp4(tmp_path / "got2.mp4").shape == (9, 48, 32, 3)
        code, listing = c.call("GET", "/v1/tasks/")  # LightX2V's shape: {task_id: status}
        assert set(listing) == {created["task_id"], created2["task_id"]}
        assert listing[created["task_id"]] == c.call("GET", f"/v1/tasks/{created['task_id']}/status")[1]
        assert c.call("GET", "/v1/service/status")[1] == {
            "service_status": "idle", "current_task": None, "active_tasks": [], "pending_tasks": 0, "queue_size": 10,
            "total_tasks": 2, "completed_tasks": 2, "failed_tasks": 0}
        assert c.call("GET", "/v1/service/metadata")[1] == {"model": "tiny", "loras": []}
    finally:
        c.close(app)


@pytest.mark.parametrize("body, status, match", [
    ({"prompt": "x", "promt": "y"}, 400, r"unknown field\(s\) \['promt'\]"),
    ({"prompt": ""}, 400, "prompt must be a non-empty string for a t2v server"),
    ({}, 400, "prompt must be a non-empty string for a t2v server"),
    ({"prompt": 5}, 400, "prompt must be a string, got int"),
    ({"prompt": "a" * (S.MAX_PROMPT_CHARS + 1)}, 400, "prompt has 65537 characters; this server takes at most"),
    ({"prompt": "x", "negative_prompt": "b" * (S.MAX_PROMPT_CHARS + 1)}, 400, "negative_prompt has 65537"),
    ({"prompt": "x", "infer_steps": 8}, 400, "infer_steps 8: this server's models run 4 steps"),
    ({"prompt": "x", "lora_name": "style"}, 400, "lora_name needs a server started with --lora_dir"),
    ({"prompt": "x", "image_path": "a.png"}, 400, "text-to-video: no image is accepted"),
    ({"prompt": "x", "target_shape": [63, 95]}, 400, "target_height.*multiple of 16"),
    ({"prompt": "x", "target_video_length": 10}, 400, "4k\\+1"),
    ({"prompt": "x", "target_video_length": 100001}, 400, "target_video_length must be an integer in"),
    ({"prompt": "x", "target_fps": 24}, 400, "target_fps is not supported by this server: the frame rate"),
    ({"prompt": "x", "save_result_path": 123}, 400, "save_result_path must be a string"),
    ({"prompt": "x", "negative_prompt": 123}, 400, "negative_prompt must be a string"),
    ({"prompt": "x", "seed": -1}, 400, "seed must be a non-negative integer"),
    ({"prompt": "x", "target_shape": [480]}, 400, "target_shape must be"),
    ({"prompt": "x", "save_result_path": "../../evil"}, 400, "leaves the output folder"),
    ({"prompt": "x", "task_id": "a/b"}, 400, "task_id must be"),
    ({"prompt": "x", "task_id": ".."}, 400, "task_id must be"),
    ({"prompt": "x", "save_result_path": "x\r\nSet-Cookie: a=1"}, 400, "control characters are not allowed"),
    ({"prompt": "x", "target_shape": 0}, 400, "target_shape must be"),
    ({"prompt": "x", "infer_steps": 5.5}, 400, "infer_steps 5.5"),
    ({"prompt": "x", "video_duration": 10}, 400, "video_duration is not supported"),
    ({"prompt": "x", "aspect_ratio": "1:1"}, 400, "aspect_ratio is not supported"),
    ({"prompt": "x", "resize_mode": "crop"}, 400, "resize_mode is not supported"),
    ({"prompt": "x", "num_fragments": 2}, 400, "num_fragments is not supported by this server: one fragment"),
    ({"prompt": "x", "num_fragments": 0}, 400, "num_fragments is not supported"),
    ({"prompt": "x", "target_fps": 0}, 400, "target_fps is not supported"),
    ({"prompt": "x", "talk_objects": [{"audio": "a.wav"}]}, 400, "talk_objects is not supported"),
    ({"prompt": "\ud800"}, 400, "prompt: not valid Unicode text"),
    ({"prompt": "x", "negative_prompt": "\udfff"}, 400, "negative_prompt: not valid Unicode text"),
    ({"prompt": "x", "save_result_path": "a" * 5000}, 400, "save_result_path .*: not a usable path"),
])
def test_bad_requests_are_named(tmp_path, body, status, match):
    app = S.App(lambda p, path, cancel: None, output_dir=tmp_path, infer_steps=4, task="t2v")
    c = Client(app)
    try:
        code, resp = c.call("POST", "/v1/tasks/video/", body)
        assert code == status
        assert re.search(match, resp["detail"]), resp
    finally:
        c.close(app)


def test_lightx2v_schema_defaults_and_unusual_names(tmp_path):
    """A client that sends every VideoTaskRequest field with LightX2V's defaults (infer_steps 5, target_fps 16,
    video_duration 5, resize_mode "adaptive", target_shape []) is served; a result name outside ASCII downloads
    with an RFC 5987 file name (and an ASCII fallback), not a broken header."""
    def fake(params, path, cancel):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"video")
    app = S.App(fake, output_dir=tmp_path, infer_steps=4, task="t2v")
    c = Client(app)
    try:
        code, created = c.call("POST", "/v1/tasks/video/", {
            "prompt": "x", "infer_steps": 5, "target_fps": 16, "video_duration": 5, "resize_mode": "adaptive",
            "target_shape": [], "num_fragments": 1, "talk_objects": None, "aspect_ratio": "16:9",
            "save_result_path": "猫 \"cat\""})
        assert code == 200, created
        assert c.wait(created["task_id"])["status"] == "completed"
        req = urllib.request.Request(f"{c.base}/v1/tasks/{created['task_id']}/result")
        with urllib.request.urlopen(req, timeout=60) as r:
            assert r.read() == b"video"
            cd = r.headers["Content-Disposition"]
        assert cd == "attachment; filename=\"_ _cat_.mp4\"; filename*=UTF-8''%E7%8C%AB%20%22cat%22.mp4", cd
    finally:
        c.close(app)


def test_queued_images_are_kept_encoded(tmp_path):
    """A waiting I2V task holds the image's encoded bytes (also those of a server path: the file as checked,
    not as it may be when the task runs), not its decoded pixels: a large image in a queue of tasks would
    otherwise hold gigabytes."""
    seen, release = [], threading.Event()

    def fake(params, path, cancel):
        seen.append(params["image"])
        release.wait(60)
    app = S.App(fake, output_dir=tmp_path, infer_steps=4, task="i2v", default_size=(32, 48))
    c = Client(app)
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (10, 200, 30)).save(buf, format="PNG")
    (tmp_path / "in.png").write_bytes(buf.getvalue())
    try:
        ids = [c.call("POST", "/v1/tasks/video/", {"prompt": "x", "image_path": image})[1]["task_id"]
               for image in (base64.b64encode(buf.getvalue()).decode(), str(tmp_path / "in.png"))]
        (tmp_path / "in.png").write_bytes(b"changed after the request")
        assert app.queue.get(ids[1]).params["image"] == buf.getvalue()
        release.set()
        for t in ids:
            assert c.wait(t)["status"] == "completed"
        assert seen == [buf.getvalue(), buf.getvalue()]
    finally:
        release.set()
        c.close(app)


def test_queue_full_cancel_and_unknown_routes(tmp_path):
    """One task runs (held by an event) and two wait: max_queue_size 3 pending or processing (LightX2V's
    rule), the next is a 503; a pending task is dropped on cancel, the running one stops at its next step;
    unknown tasks are 404 (cancelling one is LightX2V's 200 "do_nothing"), image tasks 501. The queue and
    service status have LightX2V's keys."""
    release, started = threading.Event(), threading.Event()

    def generate(params, path, cancel):
        started.set()
        while not release.is_set():  # a denoising loop checking for cancellation between steps
            if cancel.is_set():
                raise S.TaskCancelled()
            time.sleep(0.01)
        path.write_bytes(b"video")

    app = S.App(generate, output_dir=tmp_path, infer_steps=4, task="t2v", max_queue_size=3)
    c = Client(app)
    try:
        created = [c.call("POST", "/v1/tasks/video/", {"prompt": f"p{i}", "task_id": f"t{i}"})[1] for i in range(3)]
        assert [r["task_id"] for r in created] == ["t0", "t1", "t2"] and started.wait(10)
        assert all(r["task_status"] == "pending" for r in created)
        code, resp = c.call("POST", "/v1/tasks/video/", {"prompt": "t3"})
        assert code == 503 and "3 tasks pending or processing" in resp["detail"], resp
        # (a full queue refuses before reading the request: a duplicate id is then a 503 too)
        assert c.call("POST", "/v1/tasks/video/", {"prompt": "dup", "task_id": "t0"})[0] == 503
        q = c.call("GET", "/v1/tasks/queue/status")[1]
        assert q == {"is_processing": True, "current_task": "t0", "pending_count": 2, "active_count": 3,
                     "queue_size": 3, "queue_available": 0, "pending_task_ids": ["t1", "t2"]}
        assert c.call("GET", "/v1/service/status")[1] == {
            "service_status": "busy", "current_task": "t0", "active_tasks": ["t0"], "pending_tasks": 2,
            "queue_size": 3, "total_tasks": 3, "completed_tasks": 0, "failed_tasks": 0}
        assert c.call("DELETE", "/v1/tasks/t1")[1]["stop_status"] == "success"
        assert c.call("GET", "/v1/tasks/t1/status")[1]["status"] == "cancelled"
        assert c.call("GET", "/v1/tasks/t1/result")[0] == 404
        assert c.call("DELETE", "/v1/tasks/t0")[1]["reason"].startswith("stopping")
        assert c.wait("t0")["status"] == "cancelled"
        release.set()
        assert c.wait("t2")["status"] == "completed"
        assert c.call("GET", "/v1/tasks/t2/result")[1] == b"video"
        assert c.call("DELETE", "/v1/tasks/t2")[1]["stop_status"] == "do_nothing"
        assert c.call("DELETE", "/v1/tasks/all/running")[1]["stop_status"] == "do_nothing"
        assert c.call("GET", f"/v1/tasks/{uuid.uuid4().hex}/status")[0] == 404
        assert c.call("DELETE", "/v1/tasks/nope") == (200, {"stop_status": "do_nothing", "reason": "no task 'nope'"})
        st = c.call("GET", "/v1/service/status")[1]
        assert (st["total_tasks"], st["completed_tasks"], st["failed_tasks"]) == (3, 1, 0)  # (cancelled: neither)
        assert c.call("GET", "/v1/tasks/queue/status")[1]["queue_available"] == 3
        assert c.call("POST", "/v1/tasks/video/", {"prompt": "dup", "task_id": "t0"})[0] == 400  # (room now)
        assert c.call("POST", "/v1/tasks/image/", {"prompt": "x"})[0] == 501
        assert c.call("GET", "/v1/nothing")[0] == 404
        assert c.call("POST", "/v1/tasks/video/", raw=b"{not json")[0] == 400
    finally:
        c.close(app)


def test_a_failing_task_is_reported_and_the_server_goes_on(tmp_path):
    calls = []

    def generate(params, path, cancel):
        calls.append(params["prompt"])
        if params["prompt"] == "bad":
            raise ValueError("height 30 is not a multiple of 16")
        path.write_bytes(b"ok")

    app = S.App(generate, output_dir=tmp_path, infer_steps=4, task="t2v")
    c = Client(app)
    try:
        bad = c.call("POST", "/v1/tasks/video/", {"prompt": "bad"})[1]["task_id"]
        good = c.call("POST", "/v1/tasks/video/", {"prompt": "good"})[1]["task_id"]
        info = c.wait(bad)
        assert info["status"] == "failed" and info["error"] == "ValueError: height 30 is not a multiple of 16"
        assert c.wait(good)["status"] == "completed"
        code, resp = c.call("GET", f"/v1/tasks/{bad}/result")
        assert code == 404 and "failed: ValueError" in resp["detail"]
    finally:
        c.close(app)


def test_i2v_image_as_upload_and_as_base64(tmp_path):
    from lightx2v_engine.pipeline import Pipeline
    pipe = Pipeline.random("tiny-i2v", {"target_video_length": 5, "target_height": 32, "target_width": 48},
                           device="cpu")
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 56, 3), dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    png = buf.getvalue()
    app = S.App(S.pipeline_generate(pipe), output_dir=tmp_path, infer_steps=4, task="i2v", default_size=(32, 48))
    c = Client(app)
    try:
        assert c.call("POST", "/v1/tasks/video/", {"prompt": "x"})[0] == 400  # no image
        # the image alone (LightX2V's schema defaults the prompt to ""): accepted by an i2v server
        code, alone = c.call("POST", "/v1/tasks/video/", {"seed": 1, "image_path": "data:image/png;base64,"
                                                          + base64.b64encode(png).decode()})
        assert code == 200 and c.wait(alone["task_id"])["status"] == "completed"
        code, a = c.call("POST", "/v1/tasks/video/", {"prompt": "a cat", "seed": 1,
                                                      "image_path": "data:image/png;base64," + base64.b64encode(png).decode()})
        assert code == 200
        boundary = "----lx2vtest"
        parts = [("prompt", "a cat"), ("seed", "1")]
        body = b"".join(f"--{boundary}\r\nContent-Disposition: form-data; name=\"{k}\"\r\n\r\n{v}\r\n".encode()
                        for k, v in parts)
        body += (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image_file\"; filename=\"a.png\"\r\n"
                 f"Content-Type: image/png\r\n\r\n").encode() + png + f"\r\n--{boundary}--\r\n".encode()
        code, b = c.call("POST", "/v1/tasks/video/form", raw=body,
                         content_type=f"multipart/form-data; boundary={boundary}")
        assert code == 200, b
        for t in (a, b):
            assert c.wait(t["task_id"])["status"] == "completed"
        va, vb = (c.call("GET", f"/v1/tasks/{t['task_id']}/result")[1] for t in (a, b))
        assert va == vb  # the same image, seed and prompt either way
        (tmp_path / "v.mp4").write_bytes(va)
        assert read_mp4(tmp_path / "v.mp4").shape[0] == 5
        (tmp_path / "img.png").write_bytes(png)  # a path on the server works too
        code, p = c.call("POST", "/v1/tasks/video/", {"prompt": "a cat", "seed": 1, "image_path": str(tmp_path / "img.png")})
        assert c.wait(p["task_id"])["status"] == "completed"
        assert c.call("GET", f"/v1/tasks/{p['task_id']}/result")[1] == va
        thin = io.BytesIO()
        Image.new("RGB", (300, 1)).save(thin, format="PNG")
        code, resp = c.call("POST", "/v1/tasks/video/", {"prompt": "x", "image_path": base64.b64encode(thin.getvalue()).decode()})
        assert code == 400 and "aspect ratio" in resp["detail"]  # refused before queueing
        (tmp_path / "notes.txt").write_text("not an image")
        code, resp = c.call("POST", "/v1/tasks/video/", {"prompt": "x", "image_path": str(tmp_path / "notes.txt")})
        assert code == 400 and "not a readable image" in resp["detail"]
        code, resp = c.call("POST", "/v1/tasks/video/", {"prompt": "x", "image_path": str(tmp_path / "nope.png")})
        assert code == 400 and "not a URL, base64 image data or a file on the server" in resp["detail"]
        long = "A" * 5000  # neither a file (too long a name) nor an image: a 400 that does not echo it all
        code, resp = c.call("POST", "/v1/tasks/video/", {"prompt": "x", "image_path": long})
        assert code == 400 and len(resp["detail"]) < 300
        # a tiny upload (its base64 is short) and URL-safe base64 both work
        small = io.BytesIO()
        Image.new("RGB", (8, 8), (200, 10, 10)).save(small, format="PNG")
        body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"prompt\"\r\n\r\nx\r\n"
                f"--{boundary}\r\nContent-Disposition: form-data; name=\"image_file\"; filename=\"s.png\"\r\n"
                f"Content-Type: image/png\r\n\r\n").encode() + small.getvalue() + f"\r\n--{boundary}--\r\n".encode()
        code, t = c.call("POST", "/v1/tasks/video/form", raw=body, content_type=f"multipart/form-data; boundary={boundary}")
        assert code == 200, t
        code, t = c.call("POST", "/v1/tasks/video/", {"prompt": "x", "image_path": base64.urlsafe_b64encode(png).decode()})
        assert code == 200, t
    finally:
        c.close(app)


def test_server_flags():
    args = S.build_parser().parse_args(["--random-weights", "--preset", "tiny", "--host", "127.0.0.1", "--port", "0",
                                        "--max_queue_size", "3", "--lora_dir", "/l", "--metric_port", "9"])
    assert (args.host, args.port, args.max_queue_size) == ("127.0.0.1", 0, 3)


def test_http_edge_cases(tmp_path, monkeypatch):
    """Bad Content-Length (negative, text, absent) is answered at once; a non-UTF-8 form field is a 400; an
    odd download name is a 404; an internal error is a generic 500; finished tasks drop their inputs and
    only the last MAX_FINISHED stay."""
    import socket
    monkeypatch.setattr(S, "MAX_FINISHED", 2)
    app = S.App(lambda p, path, cancel: path.write_bytes(b"v"), output_dir=tmp_path, infer_steps=4, task="t2v")
    c = Client(app)
    try:
        def raw_request(head: bytes) -> bytes:
            with socket.create_connection(("127.0.0.1", c.httpd.server_port), timeout=10) as sock:
                sock.sendall(head)
                sock.shutdown(socket.SHUT_WR)
                return sock.recv(4096)
        for length, status in ((b"-1", b"400"), (b"abc", b"400"), (None, b"411")):
            head = b"POST /v1/tasks/video/ HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            head += (b"Content-Length: " + length + b"\r\n" if length is not None else b"") + b"\r\n"
            assert raw_request(head).split(b" ")[1] == status, length
        boundary = "b0"
        body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"prompt\"\r\n\r\n").encode() + b"\xff\xfe" + \
            f"\r\n--{boundary}--\r\n".encode()
        code, resp = c.call("POST", "/v1/tasks/video/form", raw=body, content_type=f"multipart/form-data; boundary={boundary}")
        assert code == 400 and "not UTF-8" in resp["detail"]
        assert c.call("GET", "/v1/files/download/a%00b")[0] == 404
        assert c.call("GET", "/v1/files/download/" + "x" * 5000)[0] == 404
        ids = [c.call("POST", "/v1/tasks/video/", {"prompt": f"p{i}"})[1]["task_id"] for i in range(4)]
        _wait_until(lambda: not c.call("GET", "/v1/tasks/queue/status")[1]["active_count"], 60)
        listing = c.call("GET", "/v1/tasks/")[1]
        kept = list(listing)
        assert kept == ids[-2:] and all(listing[t]["task_id"] == t for t in kept)
        assert all(not app.queue.get(t).params for t in kept)
        for raw, why in ((b"[" * 100000, "deep nesting"), (b'{"prompt": "x", "seed": ' + b"9" * 5000 + b"}", "long int")):
            assert c.call("POST", "/v1/tasks/video/", raw=raw)[0] == 400, why
        head = "POST /v1/tasks/video/ HTTP/1.1\r\nHost: x\r\nContent-Length: \u00b2\r\n\r\n".encode("latin-1")
        assert raw_request(head).split(b" ")[1] == b"400"
        monkeypatch.setattr(S, "MAX_IMAGE_PIXELS", 100)  # (a decompression bomb is refused the same way)
        small = io.BytesIO()
        Image.new("RGB", (20, 20)).save(small, format="PNG")
        app.task = "i2v"
        code, resp = c.call("POST", "/v1/tasks/video/", {"prompt": "x", "image_path": base64.b64encode(small.getvalue()).decode()})
        assert code == 400 and "over 100 pixels" in resp["detail"]
        app.task = "t2v"
        monkeypatch.setattr(app, "route", lambda *a: (_ for _ in ()).throw(RuntimeError("secret /path/detail")))
        code, resp = c.call("GET", "/v1/tasks/")
        assert code == 500 and "secret" not in resp["detail"]
    finally:
        c.close(app)


def test_extra_key_value_pairs_are_config_keys():
    """LightX2V's server accepts extra --key value pairs as config keys; they reach the pipeline's config
    (JSON values parsed) and a mistyped key is the config parser's error."""
    from lightx2v_engine.infer import load_pipeline
    args, extra = S.build_parser().parse_known_args(["--random-weights", "--preset", "tiny", "--sample_shift", "3",
                                                     "--enable_cfg", "true"])
    args.config_overrides = S.config_pairs(extra)
    assert args.config_overrides == {"sample_shift": 3, "enable_cfg": True}
    pipe = load_pipeline(args)
    assert pipe.run_cfg.sample_shift == 3.0 and pipe.run_cfg.enable_cfg
    args.config_overrides = S.config_pairs(["--sample_shfit", "3"])
    with pytest.raises(ValueError, match="did you mean 'sample_shift'"):
        load_pipeline(args)
    with pytest.raises(ValueError, match="key value pairs"):
        S.config_pairs(["--lonely"])


def test_a_result_path_of_a_live_task_and_a_stalled_client(tmp_path, monkeypatch):
    """Two live tasks may not write one file (409); a client that stalls mid-body is dropped after the
    handler's timeout and the server keeps answering."""
    import socket
    release = threading.Event()
    app = S.App(lambda p, path, cancel: (release.wait(10), path.write_bytes(b"v")), output_dir=tmp_path,
                infer_steps=4, task="t2v")
    monkeypatch.setattr(S.Handler, "timeout", 1)
    c = Client(app)
    try:
        assert c.call("POST", "/v1/tasks/video/", {"prompt": "a", "save_result_path": "same"})[0] == 200
        code, resp = c.call("POST", "/v1/tasks/video/", {"prompt": "b", "save_result_path": "same.mp4"})
        assert code == 409 and "has not finished" in resp["detail"]
        release.set()
        t0 = time.time()
        with socket.create_connection(("127.0.0.1", c.httpd.server_port), timeout=10) as sock:
            sock.sendall(b"POST /v1/tasks/video/ HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n{}")
            assert sock.recv(100) == b""  # closed by the server, nothing written
        assert time.time() - t0 < 8
        assert c.call("GET", "/v1/service/status")[0] == 200
    finally:
        c.close(app)


def test_per_request_loras(tmp_path):
    """lora_name picks a file in --lora_dir for one request: its video is the one of the same LoRA merged
    offline; a request without it gets the base video back; bad names are 400s before queueing; a LoRA
    that fails to merge fails its task only."""
    from safetensors.torch import save_file
    from lightx2v_engine.lora import merge_lora_, read_lora
    from lightx2v_engine.pipeline import Pipeline
    tiny = {"target_video_length": 5, "target_height": 32, "target_width": 48}
    pipe = Pipeline.random("tiny", tiny, device="cpu", seed=5)
    lora_dir = tmp_path / "loras"
    (lora_dir / "sub").mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    w = pipe.dit.blocks[0].self_attn.q.weight
    style = {"diffusion_model.blocks.0.self_attn.q.lora_up.weight": torch.randn(w.shape[0], 4, generator=g),
             "diffusion_model.blocks.0.self_attn.q.lora_down.weight": torch.randn(4, w.shape[1], generator=g)}
    save_file(style, str(lora_dir / "sub" / "style.safetensors"))
    save_file({"diffusion_model.nowhere.lora_up.weight": torch.zeros(2, 2),
               "diffusion_model.nowhere.lora_down.weight": torch.zeros(2, 2)}, str(lora_dir / "broken.safetensors"))
    (tmp_path / "outside.safetensors").write_bytes(b"x")
    ref = Pipeline.random("tiny", tiny, device="cpu", seed=5)
    merge_lora_(ref.dit, read_lora(lora_dir / "sub" / "style.safetensors"), 0.5)
    want_lora = ref.generate("a red car", seed=3).frames.numpy()
    want_base = Pipeline.random("tiny", tiny, device="cpu", seed=5).generate("a red car", seed=3).frames.numpy()
    app = S.App(S.pipeline_generate(pipe), output_dir=tmp_path / "out", infer_steps=4, task="t2v", lora_dir=lora_dir)
    c = Client(app)
    try:
        assert c.call("GET", "/v1/service/metadata")[1]["loras"] == ["broken.safetensors", "sub/style.safetensors"]
        code, resp = c.call("POST", "/v1/tasks/video/", {"prompt": "a red car", "lora_strength": 0.5, "seed": 1,
                                                          "save_result_path": "strength_only"})
        assert code == 200 and c.wait(resp["task_id"])["status"] == "completed"  # a strength alone: no LoRA
        (lora_dir / "escape.safetensors").symlink_to(tmp_path / "outside.safetensors")
        assert "escape.safetensors" not in c.call("GET", "/v1/service/metadata")[1]["loras"]
        for body, match in (({"lora_name": "nope"}, "no such LoRA file"),
                            ({"lora_name": "escape.safetensors"}, "no such LoRA file"),
                            ({"lora_name": "../outside.safetensors"}, "no such LoRA file"),
                            ({"lora_name": "sub/style", "lora_strength": "strong"}, "lora_strength must be a finite"),
                            ({"lora_name": 3}, "lora_name must be a string")):
            code, resp = c.call("POST", "/v1/tasks/video/", {"prompt": "a red car", **body})
            assert code == 400 and match in resp["detail"], resp
        videos = {}
        for name, body in (("lora", {"lora_name": "sub/style", "lora_strength": 0.5}), ("base", {}),
                           ("broken", {"lora_name": "broken.safetensors"}),
                           ("again", {"lora_name": "sub/style.safetensors", "lora_strength": "0.5"})):  # (lax)
            code, created = c.call("POST", "/v1/tasks/video/", {"prompt": "a red car", "seed": 3,
                                                                 "save_result_path": name, **body})
            assert code == 200, created
            info = c.wait(created["task_id"])
            if name == "broken":
                assert info["status"] == "failed" and "nowhere" in info["error"], info
                continue
            assert info["status"] == "completed", info
            videos[name] = read_mp4(tmp_path / "out" / f"{name}.mp4")
    finally:
        c.close(app)
    # the mp4 encoder is deterministic: equal frames in, equal frames out
    assert np.array_equal(videos["lora"], videos["again"])
    assert not np.array_equal(videos["lora"], videos["base"])
    ref_dir = tmp_path / "ref"
    ref_dir.mkdir()
    from lightx2v_engine.video import save_mp4
    for name, frames in (("lora", want_lora), ("base", want_base)):
        save_mp4(frames, ref_dir / f"{name}.mp4", fps=16)
        assert np.array_equal(videos[name], read_mp4(ref_dir / f"{name}.mp4")), name


def test_expect_100_continue_is_answered(tmp_path):
    """A client that asks 'Expect: 100-continue' (curl, for bodies over 1 MB) gets the interim 100 before it
    sends the body, instead of waiting out its own timeout (about 1 s per upload)."""
    import socket
    app = S.App(lambda p, path, cancel: None, output_dir=tmp_path, infer_steps=4, task="t2v")
    c = Client(app)
    try:
        body = json.dumps({"prompt": "a cat"}).encode()
        with socket.create_connection(("127.0.0.1", c.httpd.server_port), timeout=30) as sock:
            sock.sendall(b"POST /v1/tasks/video/ HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Expect: 100-continue\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n")
            assert sock.recv(64).startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
            sock.sendall(body)
            reply = b""
            while chunk := sock.recv(4096):
                reply += chunk
        assert b" 200 " in reply.split(b"\r\n", 1)[0] and b'"task_status": "pending"' in reply
    finally:
        c.close(app)


def test_image_sources_confine_files_and_refuse_urls(tmp_path):
    """--image_dir: image_path files only inside it (relative paths from it; a path outside, or a link or
    '..' out of it, is not read and is refused like a non-image); --no_image_urls: no download. Base64
    data works either way; the defaults read any file (LightX2V's behaviour)."""
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(buf, format="PNG")
    png = buf.getvalue()
    inside, outside = tmp_path / "images", tmp_path / "private"
    inside.mkdir()
    outside.mkdir()
    (inside / "a.png").write_bytes(png)
    (outside / "b.png").write_bytes(png)
    (inside / "link.png").symlink_to(outside / "b.png")
    confined = S.ImageSources(image_dir=inside, urls=False)
    assert S.read_image_input(str(inside / "a.png"), confined)[0] == png
    assert S.read_image_input("a.png", confined)[0] == png  # relative to the folder
    (tmp_path / "loop.png").symlink_to(tmp_path / "loop.png")  # a symlink loop outside: refused, not a 500
    (inside / "loop.png").symlink_to(inside / "loop.png")
    for bad in (str(outside / "b.png"), "../private/b.png", "link.png", str(tmp_path / "loop.png"), "loop.png"):
        with pytest.raises(S.RequestError, match="a file in the server's --image_dir"):
            S.read_image_input(bad, confined)
    # a path whose text leaves the folder is refused before the file system is looked at
    seen = []
    real_resolve = Path.resolve
    def spy(self, *a, **k):
        seen.append(str(self))
        return real_resolve(self, *a, **k)
    with mock.patch.object(Path, "resolve", spy):
        assert S._file_inside(inside, str(outside / "b.png")) is None
        assert S._file_inside(inside, "../private/b.png") is None
    assert not any(str(outside) in p for p in seen), seen
    # a link swapped in after the path was checked: the open descriptor is checked too
    with pytest.raises(OSError, match="no longer lies inside"):
        S._read_inside(inside / "link.png", inside, 100)
    assert S.read_image_input(str(outside / "b.png"))[0] == png  # the default: any file
    with pytest.raises(S.RequestError, match="does not download URLs"):
        S.read_image_input("http://127.0.0.1:9/x.png", confined)
    assert S.read_image_input(base64.b64encode(png).decode(), confined)[0] == png
    # through the app and the CLI's flags
    app = S.App(lambda p, path, cancel: None, output_dir=tmp_path / "out", infer_steps=4, task="i2v",
                default_size=(32, 48), image_sources=confined)
    c = Client(app)
    try:
        code, resp = c.call("POST", "/v1/tasks/video/", {"prompt": "x", "image_path": str(outside / "b.png")})
        assert code == 400 and "--image_dir" in resp["detail"]
        assert c.call("POST", "/v1/tasks/video/", {"prompt": "x", "image_path": "a.png"})[0] == 200
    finally:
        c.close(app)
    args = S.build_parser().parse_args(["--image_dir", str(inside), "--no_image_urls"])
    assert S.image_sources(args) == confined
    with pytest.raises(ValueError, match="not a folder"):
        S.image_sources(S.build_parser().parse_args(["--image_dir", str(tmp_path / "missing")]))
    assert S.image_sources(S.build_parser().parse_args([])) == S.ImageSources()


def test_a_result_path_through_a_file_is_refused_before_the_task_runs(tmp_path):
    """save_result_path "taken.mp4/clip" where taken.mp4 is a file (or a name that is a folder) is a 400 when
    the request arrives, not a task that fails after generating."""
    ran = []
    app = S.App(lambda p, path, cancel: ran.append(path), output_dir=tmp_path, infer_steps=4, task="t2v")
    (tmp_path / "taken.mp4").write_bytes(b"x")
    (tmp_path / "folder.mp4").mkdir()
    c = Client(app)
    try:
        code, resp = c.call("POST", "/v1/tasks/video/", {"prompt": "x", "save_result_path": "taken.mp4/clip"})
        assert code == 400 and re.search(r"taken\.mp4 is a file, not a folder", resp["detail"]), resp
        code, resp = c.call("POST", "/v1/tasks/video/", {"prompt": "x", "save_result_path": "folder"})
        assert code == 400 and "is a directory" in resp["detail"], resp
        code, resp = c.call("POST", "/v1/tasks/video/", {"prompt": "x", "save_result_path": "new/sub/clip"})
        assert code == 200, resp  # (folders that do not exist yet are made)
        assert c.wait(resp["task_id"])["status"] == "completed"
        assert ran == [tmp_path.resolve() / "new" / "sub" / "clip.mp4"]
    finally:
        c.close(app)


def test_trickled_headers_and_too_many_connections_are_cut(tmp_path, monkeypatch):
    """A request line and headers sent a byte at a time, each within the per-read timeout, held a thread
    for as long as the client liked (now HEADER_DEADLINE in all); and every connection got a thread, without
    limit (now MAX_CONNECTIONS; more are closed as they come, and a freed slot serves again)."""
    import socket
    monkeypatch.setattr(S, "HEADER_DEADLINE", 1)
    monkeypatch.setattr(S, "MAX_CONNECTIONS", 3)
    app = S.App(lambda p, path, cancel: None, output_dir=tmp_path, infer_steps=4, task="t2v")
    c = Client(app)
    port = c.httpd.server_port
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            t0 = time.monotonic()
            closed = False
            for byte in b"GET /v1/service/status HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"y" * 100:
                try:
                    sock.sendall(bytes([byte]))
                except OSError:
                    closed = True
                    break
                time.sleep(0.1)
            if not closed:
                try:
                    assert sock.recv(100) == b""  # closed by the server, nothing answered
                except ConnectionResetError:
                    pass
            assert time.monotonic() - t0 < 6
        # a request sent at once is not cut (its headers come within the deadline; the handler takes longer)
        assert c.call("GET", "/v1/service/status")[0] == 200
        held = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(3)]
        try:
            _wait_until(lambda: c.httpd._slots._value == 0)  # (each accepted, held by a thread waiting for its
            # request line: polled, not a fixed sleep a loaded machine could outlast)
            with socket.create_connection(("127.0.0.1", port), timeout=10) as extra:
                try:  # closed at once, no slot (a reset where the request came before the close)
                    extra.sendall(b"GET /v1/service/status HTTP/1.1\r\nHost: x\r\n\r\n")
                    assert extra.recv(100) == b""
                except ConnectionResetError:
                    pass
        finally:
            for sock in held:
                sock.close()
        _wait_until(lambda: c.httpd._slots._value == 3)
        assert c.call("GET", "/v1/service/status")[0] == 200  # the slots are free again
    finally:
        c.close(app)


def test_a_result_path_with_a_container_extension_keeps_it(tmp_path):
    """save_result_path "clip.mkv" wrote clip.mkv.mp4 (LightX2V keeps a given suffix); the CLI's containers
    are kept now, each downloaded with its own Content-Type, and ".mp4" is added to any other name."""
    def fake(params, path, cancel):
        path.write_bytes(path.suffix.encode())
    app = S.App(fake, output_dir=tmp_path, infer_steps=4, task="t2v")
    c = Client(app)
    try:
        for name, stored, ctype in (("a.mkv", "a.mkv", "video/x-matroska"), ("b.MOV", "b.MOV", "video/quicktime"),
                                    ("c.m4v", "c.m4v", "video/mp4"), ("d.avi", "d.avi.mp4", "video/mp4"),
                                    ("e", "e.mp4", "video/mp4")):
            code, created = c.call("POST", "/v1/tasks/video/", {"prompt": "x", "save_result_path": name})
            assert code == 200 and created["save_result_path"] == str(tmp_path.resolve() / stored), created
            assert c.wait(created["task_id"])["status"] == "completed"
            with urllib.request.urlopen(f"{c.base}/v1/tasks/{created['task_id']}/result", timeout=60) as r:
                assert r.headers["Content-Type"] == ctype and r.read() == Path(stored).suffix.encode(), name
    finally:
        c.close(app)


def test_result_paths_that_could_not_be_written_or_sent_are_refused_when_asked(tmp_path):
    """A path 1000 folders deep was accepted and failed after its run (RecursionError in mkdir); "clip" and
    "clip.mp4/x" of two live tasks were both accepted (one needs the other's file as a folder); a lone
    surrogate in the name was written, then its download sent a 200 with a 500 inside its headers."""
    release = threading.Event()
    app = S.App(lambda p, path, cancel: (release.wait(10), path.write_bytes(b"v")), output_dir=tmp_path,
                infer_steps=4, task="t2v")
    c = Client(app)
    try:
        code, resp = c.call("POST", "/v1/tasks/video/", {"prompt": "x", "save_result_path": "a/" * 1000 + "clip"})
        assert code == 400 and f"more than {S.MAX_RESULT_DEPTH} folders deep" in resp["detail"], resp
        deep = "a/" * S.MAX_RESULT_DEPTH + "clip"
        assert c.call("POST", "/v1/tasks/video/", {"prompt": "x", "save_result_path": deep})[0] == 200
        assert c.call("POST", "/v1/tasks/video/", {"prompt": "x", "save_result_path": "clip.mp4/x"})[0] == 200
        code, resp = c.call("POST", "/v1/tasks/video/", {"prompt": "x", "save_result_path": "clip"})
        assert code == 409 and "'clip.mp4' clashes with 'x.mp4' (one inside the other)" in resp["detail"], resp
        raw = json.dumps({"prompt": "x", "save_result_path": "bad\udc80name"}).encode()
        code, resp = c.call("POST", "/v1/tasks/video/", raw=raw)
        assert code == 400 and "not valid Unicode text" in resp["detail"], resp
    finally:
        release.set()
        c.close(app)
    # a file name that cannot be percent-encoded as UTF-8 still gets a whole reply
    assert S.content_disposition("bad\udc80.mp4").endswith("filename*=UTF-8''bad%3F.mp4")


def test_a_malformed_reply_to_an_image_download_is_a_400(tmp_path):
    """An image_path URL whose server answers something that is not HTTP (http.client.BadStatusLine, not an
    OSError) is a 400 naming the download, not a 500."""
    import socket
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()

    def answer():
        conn, _ = srv.accept()
        conn.recv(65536)
        conn.sendall(b"garbage\r\n\r\n")
        conn.close()
    t = threading.Thread(target=answer, daemon=True)
    t.start()
    app = S.App(lambda p, path, cancel: None, output_dir=tmp_path, infer_steps=4, task="i2v")
    c = Client(app)
    try:
        url = f"http://127.0.0.1:{srv.getsockname()[1]}/a.png"
        code, resp = c.call("POST", "/v1/tasks/video/", {"prompt": "x", "image_path": url})
        assert code == 400 and "download failed (BadStatusLine" in resp["detail"], resp
    finally:
        c.close(app)
        srv.close()


def test_server_start_errors_are_one_line_and_a_taken_port_is_found_before_loading(tmp_path, capsys, monkeypatch):
    """Start-up errors end like the CLI's: one "error:" line, exit 2, no traceback. The port is bound before
    the models load: a taken port fails at once (the pipeline is never loaded)."""
    import socket
    monkeypatch.chdir(tmp_path)
    assert S.main(["--random-weights", "--preset", "tiny", "--cpu_offload", "True", "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert "error: config key 'cpu_offload' = 'True'" in err and "Traceback" not in err, err
    assert S.main(["--model_path", str(tmp_path / "nowhere"), "--port", "0"]) == 2
    assert capsys.readouterr().err.startswith("error: ")
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    loads = []
    import lightx2v_engine.infer as infer
    monkeypatch.setattr(infer, "load_pipeline", lambda args: loads.append(args))
    try:
        port = taken.getsockname()[1]
        assert S.main(["--random-weights", "--preset", "tiny", "--host", "127.0.0.1", "--port", str(port)]) == 2
    finally:
        taken.close()
    err = capsys.readouterr().err
    assert f"(--host 127.0.0.1 --port {port})" in err and "in use" in err, err
    assert loads == []


def test_close_cancels_the_pending_tasks_and_stops_the_running_one(tmp_path):
    """TaskQueue.close cancels the pending tasks and the running one (its cancel event: it stops before its
    next step) and joins the worker, so that no thread is inside the model at interpreter shutdown; a run
    that ignores the cancel is waited for `timeout` seconds only (close says so: False)."""
    started = threading.Event()

    def run(task):  # ~30 s of "denoising steps" unless cancelled
        started.set()
        for _ in range(3000):
            if task.cancel.is_set():
                raise S.TaskCancelled()
            time.sleep(0.01)
    q = S.TaskQueue(run, max_queue_size=5)
    tasks = [q.submit(S.Task(f"t{i}", {"prompt": "x"}, tmp_path / f"t{i}.mp4")) for i in range(3)]
    assert started.wait(10)
    # (DELETE /v1/tasks/all/running's answer: it counted the running task among the cancelled ones, though it
    # may still complete if past its last step)
    # every read of the running task is under the queue's lock (the worker clears it under the lock: a read
    # outside it, as cancel_all's second one was, can find None between a check and a use)
    reads = []
    unlocked = type(q).__dict__.get("current")
    assert unlocked is None  # (a plain attribute: stood in for by a property on a subclass)
    cls = type("Watched", (S.TaskQueue,), {"current": property(
        lambda self: (reads.append(self._cond._is_owned()), self.__dict__["current"])[1],
        lambda self, v: self.__dict__.__setitem__("current", v))})
    q.__class__ = cls
    assert q.cancel_all() == {"stop_status": "success", "reason": "cancelled 2 pending task(s), stopping the "
                                                                  "running one before its next denoising step"}
    q.__class__ = S.TaskQueue
    assert reads and all(reads), reads
    t0 = time.time()
    assert q.close(timeout=20) is True
    assert time.time() - t0 < 10 and not q._worker.is_alive()
    assert [t.status for t in tasks] == ["cancelled"] * 3
    assert all(t.end_time is not None and t.params == {} for t in tasks)
    with pytest.raises(S.RequestError, match="stopping") as e:
        q.submit(S.Task("late", {"prompt": "x"}, tmp_path / "late.mp4"))
    assert e.value.status == 503
    release, started = threading.Event(), threading.Event()
    stuck = S.TaskQueue(lambda task: (started.set(), release.wait(30)), max_queue_size=5)
    stuck.submit(S.Task("s", {"prompt": "x"}, tmp_path / "s.mp4"))
    try:
        assert started.wait(10)
        t0 = time.time()
        assert stuck.close(timeout=0.2) is False and time.time() - t0 < 5
    finally:
        release.set()


def test_sigterm_while_a_task_runs_exits_cleanly(tmp_path):
    """SIGTERM to a server whose worker is inside a task: the task is cancelled at its next step, the worker
    joined, exit code 0 (it was SIGABRT, "terminate called without an active exception": the daemon worker
    was still inside torch at interpreter shutdown). /v1/service/metadata carries nproc_per_node."""
    import signal
    import subprocess
    import sys
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}  # (SIGABRT: every thread's stack)
    proc = subprocess.Popen([sys.executable, "-m", "lightx2v_engine.server", "--random-weights", "--preset", "tiny",
                             "--device", "cpu", "--host", "127.0.0.1", "--port", "0", "--output_dir",
                             str(tmp_path / "out"), "--target_shape", "256", "256", "--num_frames", "9",
                             "--sampler", "unipc", "--infer_steps", "200"],  # (~0.06 s a step on the CPU: ~20 s)
                            stderr=subprocess.PIPE, text=True, env=env)
    lines, up = [], threading.Event()

    def read():
        for line in proc.stderr:
            lines.append(line)
            if " serving " in line:
                up.set()
    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert up.wait(60), "".join(lines)[-3000:]
        port = int(re.search(r"http://127\.0\.0\.1:(\d+)", "".join(lines)).group(1))

        def call(method, path, body=None):
            req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method,
                                         data=json.dumps(body).encode() if body is not None else None,
                                         headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=30) as r:
                return json.loads(r.read())
        assert call("GET", "/v1/service/metadata")["nproc_per_node"] == 1
        task = call("POST", "/v1/tasks/video/", {"prompt": "a red fox", "seed": 1})["task_id"]
        _wait_until(lambda: call("GET", f"/v1/tasks/{task}/status")["status"] != "pending")
        time.sleep(1)  # (into the denoising steps: the text encoder is done)
        assert call("GET", f"/v1/tasks/{task}/status")["status"] == "processing"
        proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:  # (seen once on a loaded CI machine: the threads' stacks, to see where)
            proc.send_signal(signal.SIGABRT)
            proc.wait(timeout=30)
            reader.join(10)
            pytest.fail("the server did not exit within 30 s of SIGTERM:\n" + "".join(lines)[-6000:])
        assert rc == 0, "".join(lines)[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    reader.join(10)
    log = "".join(lines)
    assert "terminate called" not in log and "did not stop" not in log, log[-3000:]
    assert f"task {task} cancelled" in log


def test_task_ids_that_look_like_routes(tmp_path):
    """A task named image1 (or queue1) is queried and cancelled like any other (only POST to exactly
    /v1/tasks/image/ and /v1/tasks/image/form is a 501); the ids the routes use (queue, all, video, image)
    are refused with a 400 naming them."""
    app = S.App(lambda p, path, cancel: path.write_bytes(b"v"), output_dir=tmp_path, infer_steps=4, task="t2v")
    c = Client(app)
    try:
        for name in ("image1", "queue1", "imagery"):
            code, created = c.call("POST", "/v1/tasks/video/", {"prompt": "x", "task_id": name})
            assert code == 200, created
            assert c.wait(name)["status"] == "completed"
            assert c.call("GET", f"/v1/tasks/{name}/result") == (200, b"v")
            assert c.call("DELETE", f"/v1/tasks/{name}")[1]["stop_status"] == "do_nothing"
        for name in ("queue", "all", "video", "image"):
            code, resp = c.call("POST", "/v1/tasks/video/", {"prompt": "x", "task_id": name})
            assert code == 400 and f"task_id {name!r} is reserved" in resp["detail"], resp
            assert "'all', 'image', 'queue', 'video'" in resp["detail"]
        assert c.call("GET", "/v1/tasks/queue/status")[1]["pending_count"] == 0
        for path in ("/v1/tasks/image", "/v1/tasks/image/", "/v1/tasks/image/form"):
            assert c.call("POST", path, {"prompt": "x"})[0] == 501, path
        assert c.call("POST", "/v1/tasks/image1", {"prompt": "x"})[0] == 404
    finally:
        c.close(app)


def test_downloads_stay_inside_the_output_folder(tmp_path):
    """/v1/files/download/ serves files inside --output_dir only: a file beside the folder (which exists,
    unlike /etc/passwd seen from a deep tmp folder) is a 404 through '..', an encoded '..', an absolute path
    and a link inside the folder that points to it."""
    out = tmp_path / "out"
    (out / "sub").mkdir(parents=True)
    (tmp_path / "secret").write_bytes(b"the secret")
    (out / "inside.bin").write_bytes(b"inside")
    (out / "sub" / "clip.mp4").write_bytes(b"clip")
    (out / "link.mp4").symlink_to(tmp_path / "secret")
    (out / "sub" / "link").symlink_to("../../secret")
    app = S.App(lambda p, path, cancel: None, output_dir=out, infer_steps=4, task="t2v")
    c = Client(app)
    try:
        assert c.call("GET", "/v1/files/download/inside.bin") == (200, b"inside")
        assert c.call("GET", "/v1/files/download/sub/clip.mp4") == (200, b"clip")
        assert c.call("GET", "/v1/files/download/sub/../inside.bin") == (200, b"inside")
        for probe in ("../secret", "..%2fsecret", "%2e%2e/secret", "%2E%2E%2Fsecret", "sub/../../secret",
                      "sub/..%2f..%2fsecret", "link.mp4", "sub/link", urllib.parse.quote(str(tmp_path / "secret"))):
            code, resp = c.call("GET", "/v1/files/download/" + probe)
            assert code == 404 and "no file" in resp["detail"], (probe, code, resp)
    finally:
        c.close(app)


def test_start_options_are_checked_before_loading(tmp_path, capsys, monkeypatch):
    """--max_queue_size < 1, a --port outside 0..65535 (was an OverflowError traceback), --max_request_tokens
    < 1 and an --output_dir that cannot be created or written (was a traceback after loading) are one
    "error:" line and exit code 2, before the models load."""
    import lightx2v_engine.infer as infer
    loads = []
    monkeypatch.setattr(infer, "load_pipeline", lambda args: loads.append(args))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("x")
    for argv, message in ((["--max_queue_size", "0"], "--max_queue_size must be at least 1, got 0"),
                          (["--port", "70000"], "--port must be in 0..65535, got 70000"),
                          (["--port", "-1"], "--port must be in 0..65535, got -1"),
                          (["--max_request_tokens", "0"], "--max_request_tokens must be at least 1, got 0"),
                          (["--output_dir", str(tmp_path / "afile" / "out")],
                           f"--output_dir {str(tmp_path / 'afile' / 'out')!r} cannot be created or written (Not a "
                           f"directory)"),
                          (["--output_dir", str(tmp_path / "afile")],
                           f"--output_dir {str(tmp_path / 'afile')!r} cannot be created or written (File exists)"),
                          # (these three exited 1 with a bare message, or - --lora_dir - failed each request)
                          (["--image_dir", str(tmp_path / "none")], f"--image_dir {str(tmp_path / 'none')!r} is not "
                                                                    f"a folder"),
                          (["--lora_dir", str(tmp_path / "afile")], f"--lora_dir {str(tmp_path / 'afile')!r} is not "
                                                                    f"a folder"),
                          (["--lonely"], "unrecognized arguments ['--lonely']; extra config keys go as --key value "
                                         "pairs")):
        assert S.main(["--random-weights", "--preset", "tiny", "--host", "127.0.0.1", "--port", "0", *argv]) == 2
        assert capsys.readouterr().err == f"error: {message}\n"
    # no ffmpeg: every task would have failed after its run, when its video is written
    monkeypatch.setenv("IMAGEIO_FFMPEG_EXE", str(tmp_path / "no-ffmpeg"))
    assert S.main(["--random-weights", "--preset", "tiny", "--host", "127.0.0.1", "--port", "0",
                   "--output_dir", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == (f"error: server: the ffmpeg executable {str(tmp_path / 'no-ffmpeg')!r} does "
                                       f"not exist or is not executable (IMAGEIO_FFMPEG_EXE, or the imageio-ffmpeg "
                                       f"package's binary)\n")
    assert loads == []


def test_per_video_cli_flags_are_a_warning(tmp_path, caplog):
    """LightX2V's server takes its CLI's arguments, so its start scripts may pass --prompt or --seed: they
    were a start-up error here (a drop-in start failed). Now a warning names them as not used."""
    args = S.build_parser().parse_args(["--random-weights", "--preset", "tiny", "--prompt", "a cat", "--seed", "5",
                                        "--output_dir", str(tmp_path / "out")])
    with caplog.at_level("WARNING"):
        S.check_options(args)
    assert "--prompt, --seed: per-video settings of the CLI, not used by the server" in caplog.text


def test_request_work_is_capped_by_its_tokens(tmp_path):
    """A request's DiT tokens (latent frames x H/16 x W/16) are capped: by default Wan's 720p x 81 frames
    (75,600) or the default size's if more, else --max_request_tokens; the 400 names both numbers. I2V counts
    the size the image's aspect ratio gives."""
    def app_for(**kw):
        return S.App(lambda p, path, cancel: None, output_dir=tmp_path, infer_steps=4, **kw)
    assert S.request_tokens(81, 720, 1280) == S.WAN_720P_TOKENS == 75600
    assert app_for(task="t2v", default_size=(32, 48), default_frames=5).max_request_tokens == 75600
    assert app_for(task="t2v", default_size=(1024, 1024), default_frames=81).max_request_tokens == 21 * 64 * 64
    assert app_for(task="t2v", max_request_tokens=7).max_request_tokens == 7
    app = app_for(task="t2v", default_size=(32, 48), default_frames=5)
    c = Client(app)
    try:
        code, resp = c.call("POST", "/v1/tasks/video/", {"prompt": "x", "target_shape": [2048, 2048],
                                                          "target_video_length": 321})
        assert code == 400 and resp["detail"].startswith(
            "the request asks for 1327104 tokens (2048x2048, 321 frames: 81 latent frames x 128 x 128); this "
            "server takes at most 75600 per request (--max_request_tokens)"), resp
        assert c.call("POST", "/v1/tasks/video/", {"prompt": "x", "target_shape": [720, 1280],
                                                    "target_video_length": 81})[0] == 200
        code, resp = c.call("POST", "/v1/tasks/video/", {"prompt": "x", "target_shape": [720, 1280],
                                                          "target_video_length": 85})
        assert code == 400 and "79200 tokens" in resp["detail"]
    finally:
        c.close(app)
    # I2V: a square image at the area of 480x832 is 624x624 (2 x 39 x 39 = 3042 tokens at 5 frames; 480x832
    # itself would be 3120)
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(buf, format="PNG")
    image = base64.b64encode(buf.getvalue()).decode()
    for cap, status in ((3042, 200), (3041, 400)):
        app = app_for(task="i2v", default_size=(480, 832), default_frames=5, max_request_tokens=cap)
        c = Client(app)
        try:
            code, resp = c.call("POST", "/v1/tasks/video/", {"prompt": "x", "image_path": image})
            assert code == status, resp
            if status == 400:
                assert "3042 tokens (624x624, 5 frames" in resp["detail"] and "at most 3041" in resp["detail"]
        finally:
            c.close(app)


def test_early_refusals_reach_the_client(tmp_path, monkeypatch):
    """A refusal sent before the body is read (413, 501, unknown endpoint) first reads (up to MAX_DRAIN) the
    body the client is still sending: the client gets the reason, not a broken pipe."""
    monkeypatch.setattr(S, "MAX_BODY", 1 << 20)
    app = S.App(lambda p, path, cancel: None, output_dir=tmp_path, infer_steps=4, task="t2v")
    c = Client(app)
    try:
        body = b" " * (6 << 20)
        for path, status, detail in (("/v1/tasks/video/", 413, "request body over 1 MiB"),
                                     ("/v1/tasks/image/", 501, "image tasks are not supported"),
                                     ("/v1/nothing", 404, "no endpoint POST /v1/nothing")):
            code, resp = c.call("POST", path, raw=body)
            assert code == status and resp["detail"].startswith(detail), (path, code, resp)
        assert c.call("GET", "/v1/tasks/queue/status")[0] == 200
    finally:
        c.close(app)


def test_create_requests_parse_two_at_a_time(tmp_path, monkeypatch):
    """Parsing create bodies (multipart takes ~10x the upload) and checking them (an image's download and
    decode) is bounded: at most MAX_PARSING requests at once, the others wait their turn (reading bodies has
    its own, wider bound, MAX_READING, and a deadline)."""
    lock, now, peak = threading.Lock(), [0], [0]

    def tracked(fn):
        def wrapper(*a, **k):
            with lock:
                now[0] += 1
                peak[0] = max(peak[0], now[0])
            try:
                time.sleep(0.2)
                return fn(*a, **k)
            finally:
                with lock:
                    now[0] -= 1
        return wrapper
    monkeypatch.setattr(S, "check_request", tracked(S.check_request))
    monkeypatch.setattr(S, "parse_multipart", tracked(S.parse_multipart))
    app = S.App(lambda p, path, cancel: None, output_dir=tmp_path, infer_steps=4, task="t2v", max_queue_size=100)
    c = Client(app)
    boundary = "b1"
    form = f"--{boundary}\r\nContent-Disposition: form-data; name=\"prompt\"\r\n\r\nx\r\n--{boundary}--\r\n".encode()
    codes = []

    def post(i):
        if i % 2:
            codes.append(c.call("POST", "/v1/tasks/video/form", raw=form,
                                content_type=f"multipart/form-data; boundary={boundary}")[0])
        else:
            codes.append(c.call("POST", "/v1/tasks/video/", {"prompt": "x"})[0])
    try:
        threads = [threading.Thread(target=post, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert codes == [200] * 6 and peak[0] == S.MAX_PARSING == 2, (codes, peak)
    finally:
        c.close(app)


def test_a_download_sends_the_file_it_opened(tmp_path, monkeypatch):
    """The download's Content-Length is the opened file's size (fstat), not that of whatever the path names
    a moment later (a result rewritten meanwhile): header and body agree."""
    (tmp_path / "clip.mp4").write_bytes(b"old video")
    real_open = open

    def open_then_replace(path, mode="r", *a, **k):
        f = real_open(path, mode, *a, **k)
        if str(path).endswith("clip.mp4"):
            (tmp_path / "new.mp4").write_bytes(b"a new, longer video")
            os.replace(tmp_path / "new.mp4", tmp_path / "clip.mp4")
        return f
    monkeypatch.setattr(S, "open", open_then_replace, raising=False)
    app = S.App(lambda p, path, cancel: None, output_dir=tmp_path, infer_steps=4, task="t2v")
    c = Client(app)
    try:
        assert c.call("GET", "/v1/files/download/clip.mp4") == (200, b"old video")
    finally:
        c.close(app)


def test_health_lax_integers_and_float_images(tmp_path):
    """LightX2V's GET /health; integer and boolean fields as its pydantic schema takes them ("42", 9.0, "false");
    a 32-bit float image is a 400 when the request comes (it was a task failing in the worker)."""
    seen = []
    app = S.App(lambda p, path, cancel: seen.append(p), output_dir=tmp_path, infer_steps=4, task="i2v",
                default_size=(32, 48))
    c = Client(app)
    try:
        assert c.call("GET", "/health") == (200, {"status": "ok"})
        png = io.BytesIO()
        Image.new("RGB", (64, 48), (10, 200, 30)).save(png, format="PNG")
        image = base64.b64encode(png.getvalue()).decode()
        code, created = c.call("POST", "/v1/tasks/video/", {"prompt": "x", "image_path": image, "seed": "42",
                                                             "target_video_length": 9.0, "infer_steps": "4"})
        assert code == 200, created
        c.wait(created["task_id"])
        assert seen[0]["seed"] == 42 and seen[0]["num_frames"] == 9
        for bad in ({"seed": "4.5"}, {"seed": True}, {"target_video_length": 9.5}, {"use_prompt_enhancer": "yes"},
                    {"use_prompt_enhancer": 1}, {"target_fps": 16.5}, {"target_fps": "24"}):
            code, resp = c.call("POST", "/v1/tasks/video/", {"prompt": "x", "image_path": image, **bad})
            assert code == 400, (bad, resp)
        # booleans and the schema's defaults as pydantic's lax mode reads them (they were 400s): off, and 16
        for ok in ({"use_prompt_enhancer": "false"}, {"use_prompt_enhancer": 0}, {"target_fps": 16.0},
                   {"target_fps": "16", "video_duration": 5.0, "num_fragments": "1"}):
            code, resp = c.call("POST", "/v1/tasks/video/", {"prompt": "x", "image_path": image, **ok})
            assert code == 200, (ok, resp)
        boundary = "lax"  # (requests sends Python's False as the text "False")
        form = "".join(f"--{boundary}\r\nContent-Disposition: form-data; name=\"{k}\"\r\n\r\n{v}\r\n"
                       for k, v in (("prompt", "x"), ("image_path", image), ("use_prompt_enhancer", "False"),
                                    ("target_fps", "16.0"))) + f"--{boundary}--\r\n"
        code, resp = c.call("POST", "/v1/tasks/video/form", raw=form.encode(),
                            content_type=f"multipart/form-data; boundary={boundary}")
        assert code == 200, resp
        tif = io.BytesIO()
        Image.fromarray(np.random.rand(48, 64).astype(np.float32), mode="F").save(tif, format="TIFF")
        code, resp = c.call("POST", "/v1/tasks/video/", {"prompt": "x",
                                                          "image_path": base64.b64encode(tif.getvalue()).decode()})
        assert code == 400 and "32-bit float images (PIL mode F)" in resp["detail"], resp
    finally:
        c.close(app)


def test_full_queue_refuses_before_reading_or_decoding(tmp_path, monkeypatch):
    """With the queue full, a create request is a 503 before its body is read and its image decoded (images
    were decoded for requests refused anyway: 8 at once took 2 GB)."""
    release = threading.Event()
    app = S.App(lambda p, path, cancel: release.wait(60), output_dir=tmp_path, infer_steps=4, task="i2v",
                default_size=(32, 48), max_queue_size=1)
    opened = []
    real_open = S._open_image
    monkeypatch.setattr(S, "_open_image", lambda data, what: opened.append(what) or real_open(data, what))
    c = Client(app)
    try:
        png = io.BytesIO()
        Image.new("RGB", (64, 48)).save(png, format="PNG")
        body = {"prompt": "x", "image_path": base64.b64encode(png.getvalue()).decode()}
        assert c.call("POST", "/v1/tasks/video/", body)[0] == 200 and len(opened) == 1
        code, resp = c.call("POST", "/v1/tasks/video/", body)
        assert code == 503 and "queue is full" in resp["detail"] and len(opened) == 1
    finally:
        release.set()
        c.close(app)


def test_a_trickling_body_is_cut_at_its_deadline(tmp_path, monkeypatch):
    """A client sending its body a byte now and then held a reading slot for good (each read had its own
    60 s timeout): two such clients made every create request wait, then a 503. The body has a deadline of
    its own now (BODY_MIN_S, or its size at BODY_RATE): past it, a 408 and the slot is free."""
    import socket
    monkeypatch.setattr(S, "BODY_MIN_S", 1)
    app = S.App(lambda p, path, cancel: path.write_bytes(b"v"), output_dir=tmp_path, infer_steps=4, task="t2v")
    c = Client(app)
    socks = []
    try:
        t0 = time.time()
        for _ in range(S.MAX_READING):  # every reading slot taken by a trickling client
            s = socket.create_connection(("127.0.0.1", c.httpd.server_port))
            s.sendall(b"POST /v1/tasks/video HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 1000\r\n\r\n{")
            socks.append(s)
        time.sleep(0.3)
        for s in socks:
            s.sendall(b" ")
        time.sleep(1.2)
        for s in socks:  # a byte after the deadline: the server answers 408 and frees the slot
            s.sendall(b" ")
        replies = []
        for s in socks:
            s.settimeout(10)
            replies.append(s.recv(200))
        assert all(r.startswith(b"HTTP/1.0 408") or r.startswith(b"HTTP/1.1 408") for r in replies), replies[:2]
        code, created = c.call("POST", "/v1/tasks/video/", {"prompt": "x"})
        assert code == 200 and time.time() - t0 < 30
    finally:
        for s in socks:
            s.close()
        c.close(app)


def test_request_lines_are_logged_with_control_characters_escaped(caplog):
    """A request line holding ESC / CR wrote them raw into the log (forged lines, terminal escapes)."""
    h = S.Handler.__new__(S.Handler)
    h.client_address = ("127.0.0.1", 1)
    with caplog.at_level("INFO", logger="lightx2v_engine.server"):
        h.log_message('"%s" %s', "GET /x\x1b[31mRED\rFAKE HTTP/1.0", "400")
    assert "\x1b" not in caplog.text and "\r" not in caplog.text and "\\x1b[31mRED\\x0dFAKE" in caplog.text


def test_server_flags_default_to_lightx2v_environment_variables(monkeypatch):
    monkeypatch.setenv("LIGHTX2V_HOST", "127.0.0.1")
    monkeypatch.setenv("LIGHTX2V_PORT", "9123")
    monkeypatch.setenv("LIGHTX2V_MAX_QUEUE_SIZE", "33")
    args = S.build_parser().parse_args([])
    assert (args.host, args.port, args.max_queue_size) == ("127.0.0.1", 9123, 33)
    assert S.build_parser().parse_args(["--port", "7"]).port == 7  # (a flag wins)
    monkeypatch.setenv("LIGHTX2V_PORT", "eighty")
    assert S.build_parser().parse_args([]).port == 8000


def _trickle(wfile, data: bytes, pause: float = 0.2) -> None:
    """Writes `data` a byte at a time, `pause` seconds apart, until done or the reader goes away."""
    for i in range(len(data)):
        try:
            wfile.write(data[i:i + 1])
            wfile.flush()
        except OSError:
            return
        time.sleep(pause)


def _image_server(handler):
    """A local HTTP server (serving in a thread) whose GETs `handler(request_handler)` answers."""
    import http.server

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            handler(self)

        def log_message(self, *a):
            pass
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_slow_image_downloads_hit_their_deadline_outside_the_parsing_slots(tmp_path, monkeypatch):
    """An image_path URL served a byte now and then: the download has a deadline of its own (a blocking
    read of 64 KiB never looked at it), and it runs outside the two parsing slots (two such requests made
    every other create request wait, then a 503)."""
    monkeypatch.setattr(S, "DOWNLOAD_DEADLINE", 2)
    monkeypatch.setattr(S, "PARSE_WAIT", 0.5)  # a request kept out of the slots gets its 503 within 0.5 s
    started, lock, downloads = threading.Event(), threading.Lock(), []

    def slow_body(h):
        with lock:
            downloads.append(1)
            if len(downloads) == S.MAX_PARSING:
                started.set()
        h.send_response(200)
        h.send_header("Content-Length", "100000")
        h.end_headers()
        _trickle(h.wfile, b"x" * 40)
    slow = _image_server(slow_body)
    app = S.App(lambda p, path, cancel: None, output_dir=tmp_path, infer_steps=4, task="i2v", default_size=(32, 48))
    c = Client(app)
    results = []
    try:
        url = f"http://127.0.0.1:{slow.server_port}/img.png"
        threads = [threading.Thread(target=lambda: results.append(
            c.call("POST", "/v1/tasks/video/", {"prompt": "x", "image_path": url}))) for _ in range(S.MAX_PARSING)]
        for t in threads:
            t.start()
        assert started.wait(10)  # every slow download is under way (in the slots, before the fix)
        png = io.BytesIO()
        Image.new("RGB", (64, 48)).save(png, format="PNG")
        code, resp = c.call("POST", "/v1/tasks/video/", {"prompt": "x",
                                                          "image_path": base64.b64encode(png.getvalue()).decode()})
        assert code == 200, (code, resp)
        assert not results  # (the slow ones still download)
        for t in threads:
            t.join(30)
        assert len(results) == S.MAX_PARSING
        assert all(code == 400 and "not received within 2 s" in r["detail"] for code, r in results), results
    finally:
        slow.shutdown()
        slow.server_close()
        c.close(app)


def test_an_image_download_whose_headers_trickle_is_cut_at_the_deadline(tmp_path, monkeypatch):
    """The download's deadline covered its body only: a server sending its status line and headers a byte
    every 0.2 s held the request (and a reading slot) for as long as it liked, each byte within urlopen's
    per-read timeout. Now the whole download, redirects included, is cut at DOWNLOAD_DEADLINE."""
    monkeypatch.setattr(S, "DOWNLOAD_DEADLINE", 2)
    head = b"HTTP/1.0 200 OK\r\nContent-Type: image/png\r\nX-Pad: " + b"x" * 200 + b"\r\n\r\n"

    def trickled_headers(h):
        if h.path == "/hop":  # (a redirect first: the deadline spans both connections)
            h.send_response(302)
            h.send_header("Location", "/img.png")
            h.send_header("Content-Length", "0")
            h.end_headers()
            return
        _trickle(h.wfile, head)
    slow = _image_server(trickled_headers)
    app = S.App(lambda p, path, cancel: None, output_dir=tmp_path, infer_steps=4, task="i2v", default_size=(32, 48))
    c = Client(app)
    try:
        t0 = time.monotonic()
        code, resp = c.call("POST", "/v1/tasks/video/", {"prompt": "x",
                                                          "image_path": f"http://127.0.0.1:{slow.server_port}/hop"})
        took = time.monotonic() - t0
        assert code == 400 and "not received within 2 s" in resp["detail"], resp
        assert took < 10, took  # (the headers alone take ~45 s to arrive)
    finally:
        slow.shutdown()
        slow.server_close()
        c.close(app)


@pytest.mark.usefixtures("torch_ops")
def test_lora_dynamic_apply_config_loras_are_the_tasks_default_and_a_request_lora_replaces_them(tmp_path):
    """lora_dynamic_apply: the config's LoRAs are every task's default; a task's lora_name replaces them (as
    LightX2V's server, whose worker removes the dynamic LoRAs before registering the request's: here both were
    merged, e.g. two distill LoRAs at once); a task without one gets them back."""
    from safetensors.torch import save_file
    from lightx2v_engine.config import get_preset, parse_run_config
    from lightx2v_engine.pipeline import Pipeline
    dim = get_preset("tiny").dim
    g = torch.Generator().manual_seed(0)
    for name in ("a", "b"):
        save_file({"diffusion_model.blocks.0.self_attn.q.lora_up.weight": torch.randn(dim, 4, generator=g) * 0.3,
                   "diffusion_model.blocks.0.self_attn.q.lora_down.weight": torch.randn(4, dim, generator=g) * 0.3},
                  str(tmp_path / f"{name}.safetensors"))
    size = {"target_video_length": 5, "target_height": 32, "target_width": 48}

    def latents(pipe):
        return S._run_task(pipe, {"prompt": "a cat", "seed": 1}, lambda: False).latents

    ref = {name: latents(Pipeline.random("tiny", {**size, "lora_configs": [{"path": str(tmp_path / f"{name}.safetensors")}]},
                                         device="cpu", seed=0)) for name in ("a", "b")}
    run = parse_run_config({**size, "lora_dynamic_apply": True, "lora_configs": [{"path": "a.safetensors"}]})
    run2, defaults = S.dynamic_loras(run, str(tmp_path))  # (a relative path: under the model folder)
    assert run2.lora_configs == () and defaults[0].path == str((tmp_path / "a.safetensors").resolve())
    pipe = Pipeline.random("tiny", run2, device="cpu", seed=0)
    pipe.default_request_loras = defaults
    pipe.set_request_loras(defaults)
    torch.testing.assert_close(latents(pipe), ref["a"], rtol=0, atol=0)
    b = S._run_task(pipe, {"prompt": "a cat", "seed": 1, "loras": S.request_loras("b", None, tmp_path)},
                    lambda: False).latents
    torch.testing.assert_close(b, ref["b"], rtol=0, atol=0)
    torch.testing.assert_close(latents(pipe), ref["a"], rtol=0, atol=0)
    assert S.dynamic_loras(parse_run_config({**size, "lora_configs": [{"path": "x.safetensors"}]}))[1] == ()
