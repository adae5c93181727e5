"""HTTP server with LightX2V's task API (lightx2v.md §5), on the standard library's ThreadingHTTPServer.

    python -m lightx2v_engine.server --model_path /models/Wan2.1-T2V-1.3B --config_json cfg.json --port 8000
    python -m lightx2v_engine.server --random-weights --preset tiny          # no weights: the tiny preset

Like LightX2V's server it takes the CLI's arguments (the per-video ones - --prompt, --seed, --image_path,
--save_result_path, ... - are not used, with a warning: each request carries them) plus --host, --port,
--max_queue_size, --lora_dir, --metric_port, and extra `--key value` pairs as config keys (e.g. --sample_shift
3); --max_request_tokens caps a request's work (its DiT tokens, latent frames x H/16 x W/16: by default Wan's
720p x 81 frames, 75,600, or the default size's if more; a 400 beyond). Like LightX2V's, a
request's image_path may name any file on the server or any URL (the server downloads it); a server open to
others can confine files to --image_dir and refuse URLs with --no_image_urls (base64 data and uploads
always work).

The models load once at start. Tasks queue (at most --max_queue_size pending or processing: HTTP 503 beyond)
and run one at a time on one worker thread, like LightX2V's server. A request carries LightX2V's VideoTaskRequest
fields; the ones this engine cannot honour per request (another step count, a last frame) are a 400
naming the field, as are sizes the model cannot take (checked before the task is queued). `lora_name`
names a file in --lora_dir, merged for that request on top of the config's LoRAs and taken off again
exactly before a request with another (or none) - see lora.LoraSwitch; consecutive requests with the same
LoRA pay nothing. Results are
written under --output_dir; a request's save_result_path must stay inside it. The last MAX_FINISHED
finished tasks stay queryable. Stopping the server (SIGTERM, Ctrl-C) cancels the pending tasks and the
running one (before its next step) and waits STOP_WAIT seconds for it.

Endpoints: POST /v1/tasks/video/ (JSON), POST /v1/tasks/video/form (multipart: image_file + form fields),
POST /v1/tasks/ (old alias), GET /v1/tasks/, GET /v1/tasks/queue/status, GET /v1/tasks/{id}/status,
GET /v1/tasks/{id}/result, DELETE /v1/tasks/{id}, DELETE /v1/tasks/all/running,
GET /v1/files/download/{path}, GET /v1/service/status, GET /v1/service/metadata. POST /v1/tasks/image/
and /v1/tasks/image/form answer 501: this engine generates video. The answers have LightX2V's shapes: the
task list is {task_id: status}, a status is {task_id, status, start_time, end_time, error,
save_result_path} with ISO 8601 local times, the queue and service status carry LightX2V's keys (its
queue_size is max_queue_size), and DELETE of an unknown or finished task is 200 "do_nothing".
"""
from __future__ import annotations

import argparse
import base64
import binascii
import collections
import email.parser
import email.policy
import http.client
import io
import json
import logging
import math
import os
import re
import secrets
import signal
import socket
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable

import torch

from lightx2v_engine.schedulers import MAX_SEED, latent_shape

log = logging.getLogger(__name__)

MAX_BODY = 64 << 20      # request bodies (a base64 or uploaded image fits)
# prompt characters: umT5 reads 512 tokens (~2-3k characters of English); text cleaning (ftfy) and
# tokenising a body-sized prompt would hold the worker for seconds to minutes for nothing
MAX_PROMPT_CHARS = 1 << 16
MAX_DOWNLOAD = 32 << 20  # image_path URLs
MAX_SIDE, MAX_FRAMES = 2048, 321  # per-request sizes (720p is 1280 x 720, 81 frames)
MAX_FINISHED = 1000      # finished tasks kept for status queries (oldest dropped first)
MAX_RESULT_DEPTH = 16    # folders in a request's save_result_path (a path 1000 folders deep failed after its run)
MAX_IMAGE_PIXELS = 64_000_000  # input images (decoded in the request thread)
WAN_720P_TOKENS = 21 * 45 * 80  # request_tokens(81, 720, 1280): the least per-request cap by default
MAX_DRAIN = 8 << 20      # unread request body read (and dropped) before an early refusal
MAX_PARSING = 2          # create requests parsing their bodies and images at once (multipart takes ~10x the body)
PARSE_WAIT = 60          # seconds a create request waits for a parsing slot before a 503
MAX_READING = 16         # create requests in progress at once (memory: at most 16 bodies of MAX_BODY)
BODY_RATE = 256 << 10    # bytes/s a body must arrive at, on average (a deadline of its own beside the per-read
BODY_MIN_S = 60          # timeout: a client sending a byte now and then held a slot for good), at least 60 s
DOWNLOAD_DEADLINE = 60   # seconds an image_path URL's download may take in all
HEADER_DEADLINE = 60     # seconds a request's line and headers may take in all (each read also has its timeout)
MAX_CONNECTIONS = 256    # connections served at once (a thread each); more are closed as they come
STOP_WAIT = 5.0          # seconds a stopping server waits for the running task to stop
# task ids that would clash with the routes under /v1/tasks/ (queue/status, all/running, video/, image/)
RESERVED_IDS = ("all", "image", "queue", "video")
# VideoTaskRequest fields this server cannot honour per request: a 400 naming them when set (to anything but
# LightX2V's schema default, which clients that send every field send: it asks for nothing)
UNSUPPORTED = {"last_frame_path": "FLF2V is not supported (Wan2.1 T2V/I2V)", "audio_path": "audio is not supported",
               "target_fps": "the frame rate is the config's fps", "video_duration": "use target_video_length",
               "resize_mode": "I2V resizes as Wan does", "use_prompt_enhancer": "no prompt enhancer",
               "num_fragments": "one fragment per task (multi-fragment audio tasks are not supported)",
               "talk_objects": "talking-head tasks are not supported",
               "aspect_ratio": "the video's shape is target_shape (LightX2V's aspect_ratio is for text-to-image)"}
SCHEMA_DEFAULTS = {"target_fps": 16, "video_duration": 5, "resize_mode": "adaptive", "num_fragments": 1,
                   "aspect_ratio": "16:9"}
LIGHTX2V_DEFAULT_STEPS = 5  # VideoTaskRequest.infer_steps' default (no effect on a built Wan scheduler there)
# VideoTaskRequest fields (LightX2V's server/schema.py); unknown fields are a 400 naming them
FIELDS = {"task_id", "prompt", "negative_prompt", "image_path", "last_frame_path", "audio_path", "save_result_path",
          "infer_steps", "seed", "target_shape", "target_video_length", "lora_name", "lora_strength",
          "use_prompt_enhancer", "video_duration", "target_fps", "resize_mode", "num_fragments", "talk_objects",
          "aspect_ratio"}


class RequestError(ValueError):
    """A bad request: answered with HTTP 400 (or `status`) and this message."""

    def __init__(self, message: str, status: HTTPStatus = HTTPStatus.BAD_REQUEST):
        super().__init__(message)
        self.status = status


class TaskCancelled(Exception):
    """Raised between denoising steps of a task whose cancellation was requested."""


@dataclass
class Task:
    task_id: str
    params: dict               # checked generation parameters (see check_request)
    save_result_path: Path
    status: str = "pending"    # pending | processing | completed | failed | cancelled
    # (local time, as LightX2V's: set when created, reset when it starts processing)
    start_time: datetime = field(default_factory=datetime.now)
    end_time: datetime | None = None
    error: str | None = None
    cancel: threading.Event = field(default_factory=threading.Event, repr=False)

    def info(self) -> dict:
        """LightX2V's task status (times as ISO 8601 text, as its FastAPI server writes them)."""
        return {"task_id": self.task_id, "status": self.status, "start_time": self.start_time.isoformat(),
                "end_time": self.end_time.isoformat() if self.end_time else None, "error": self.error,
                "save_result_path": str(self.save_result_path)}


class TaskQueue:
    """Tasks in arrival order, run one at a time by one worker thread through `run(task)`; at most
    max_queue_size pending or processing (LightX2V's rule)."""

    def __init__(self, run: Callable[[Task], None], max_queue_size: int = 10):
        self._run, self.max_queue_size = run, max_queue_size
        self._tasks: dict[str, Task] = {}
        self._pending: collections.deque[Task] = collections.deque()
        self._cond = threading.Condition()
        self.current: Task | None = None
        self._stop = False
        self.total = self.completed = self.failed = 0  # tasks created, completed, failed since the start
        self._worker = threading.Thread(target=self._loop, name="lx2v-worker", daemon=True)
        self._worker.start()

    def submit(self, task: Task) -> Task:
        with self._cond:
            if task.task_id in self._tasks:
                raise RequestError(f"task_id {task.task_id!r} exists already")
            mine = task.save_result_path
            for other in self._tasks.values():
                theirs = other.save_result_path
                if other.status in ("pending", "processing") and (
                        theirs == mine or theirs.is_relative_to(mine) or mine.is_relative_to(theirs)):
                    # (the same file, or one that the other's would need as a folder: "a.mp4/x" and "a.mp4")
                    raise RequestError(f"save_result_path {mine.name!r} " + (
                        "belongs to" if theirs == mine else f"clashes with {theirs.name!r} (one inside the other) of")
                        + f" task {other.task_id}, which has not finished", HTTPStatus.CONFLICT)
            self._refuse_if_full()
            self._tasks[task.task_id] = task
            self._pending.append(task)
            self.total += 1
            self._cond.notify()
        return task

    def check_room(self) -> None:
        """RequestError 503 when a new task could not be queued now (full, or stopping): asked before a
        request's body and image are read, so that refused requests cost no memory."""
        with self._cond:
            self._refuse_if_full()

    def _refuse_if_full(self) -> None:
        """(caller holds the lock) RequestError 503 when stopping or full."""
        if self._stop:
            raise RequestError("the server is stopping", HTTPStatus.SERVICE_UNAVAILABLE)
        if self._active() >= self.max_queue_size:
            raise RequestError(f"the queue is full ({self._active()} tasks pending or processing, "
                               f"max_queue_size {self.max_queue_size}); retry later", HTTPStatus.SERVICE_UNAVAILABLE)

    def _active(self) -> int:
        """Tasks pending or processing (caller holds the lock)."""
        return len(self._pending) + (self.current is not None)

    def get(self, task_id: str) -> Task:
        with self._cond:
            if task_id not in self._tasks:
                raise RequestError(f"no task {_short(task_id)!r}", HTTPStatus.NOT_FOUND)
            return self._tasks[task_id]

    def info(self, task_id: str) -> dict:
        """A consistent snapshot of one task's state."""
        with self._cond:
            return self.get(task_id).info()

    def all(self) -> dict[str, dict]:
        """LightX2V's task list: {task_id: status, ...}."""
        with self._cond:
            return {t.task_id: t.info() for t in self._tasks.values()}

    def status(self) -> dict:
        """LightX2V's /v1/tasks/queue/status (+ pending_task_ids, in order: this server's own)."""
        with self._cond:
            running = self.current.task_id if self.current else None
            return {"is_processing": running is not None, "current_task": running,
                    "pending_count": len(self._pending), "active_count": self._active(),
                    "queue_size": self.max_queue_size, "queue_available": self.max_queue_size - self._active(),
                    "pending_task_ids": [t.task_id for t in self._pending]}

    def service_status(self) -> dict:
        """LightX2V's /v1/service/status."""
        with self._cond:
            running = self.current.task_id if self.current else None
            return {"service_status": "busy" if running else "idle", "current_task": running,
                    "active_tasks": [running] if running else [], "pending_tasks": len(self._pending),
                    "queue_size": self.max_queue_size, "total_tasks": self.total,
                    "completed_tasks": self.completed, "failed_tasks": self.failed}

    def cancel(self, task_id: str) -> dict:
        """A pending task is dropped; a running one stops before its next denoising step; an unknown or
        finished one is left as it is ("do_nothing", as LightX2V answers)."""
        with self._cond:
            task = self._tasks.get(task_id)
            if task is None:
                return {"stop_status": "do_nothing", "reason": f"no task {_short(task_id)!r}"}
            if task.status == "pending":
                self._drop_pending(task)
                self._forget_old()
                return {"stop_status": "success", "reason": "cancelled before it started"}
            if task.status == "processing":
                task.cancel.set()
                return {"stop_status": "success", "reason": "stopping before its next denoising step (a task "
                                                            "past its last step completes)"}
            return {"stop_status": "do_nothing", "reason": f"task is {task.status}"}

    def cancel_all(self) -> dict:
        with self._cond:  # (one snapshot: the worker may clear self.current at any moment after it)
            pending = [t.task_id for t in self._pending]
            running = self.current.task_id if self.current is not None else None
        ids = pending + ([running] if running is not None else [])
        for task_id in ids:
            self.cancel(task_id)
        return {"stop_status": "success" if ids else "do_nothing",
                "reason": f"cancelled {len(pending)} pending task(s)"
                          + (", stopping the running one before its next denoising step" if running else "")}

    def close(self, timeout: float | None = STOP_WAIT) -> bool:
        """Stops the worker: pending tasks are cancelled, the running one stops before its next denoising
        step; waits up to `timeout` seconds for the worker to end. True if it has ended (a worker still
        inside the model at interpreter shutdown aborts the process)."""
        with self._cond:
            self._stop = True
            while self._pending:
                self._drop_pending(self._pending[0])
            if self.current is not None:
                self.current.cancel.set()
            self._forget_old()
            self._cond.notify_all()
        self._worker.join(timeout)
        return not self._worker.is_alive()

    def _drop_pending(self, task: Task) -> None:
        """A pending task cancelled (caller holds the lock)."""
        self._pending.remove(task)
        task.status, task.end_time, task.params = "cancelled", datetime.now(), {}

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._stop:
                    self._cond.wait()
                if self._stop:
                    return
                task = self.current = self._pending.popleft()
                task.status, task.start_time = "processing", datetime.now()
            try:
                self._run(task)
                status, error = "completed", None
            except TaskCancelled:
                status, error = "cancelled", None
                log.info("task %s cancelled", task.task_id)
            except BaseException as e:  # noqa: BLE001 - a failed task is reported, the worker goes on
                log.exception("task %s failed", task.task_id)
                status, error = "failed", f"{type(e).__name__}: {str(e)[:500]}"
            with self._cond:
                task.status, task.error, task.end_time = status, error, datetime.now()
                self.completed += status == "completed"
                self.failed += status == "failed"
                task.params = {}  # its decoded image and prompt are no longer needed
                self.current = None
                self._forget_old()

    def _forget_old(self) -> None:
        """Drops the oldest finished tasks beyond MAX_FINISHED (caller holds the lock)."""
        done = [t for t in self._tasks.values() if t.status in ("completed", "failed", "cancelled")]
        for t in done[:max(0, len(done) - MAX_FINISHED)]:
            del self._tasks[t.task_id]


# ---------------------------------------------------------------------------------------------- requests

def _short(value, n: int = 80) -> str:
    """A value for an error message, cut to n characters (requests may carry megabytes of base64)."""
    text = str(value)
    return text if len(text) <= n else text[:n] + f"... ({len(text)} characters)"


@dataclass(frozen=True)
class ImageSources:
    """Where a request's image_path may come from besides base64 data: files (image_dir None: any file the
    server can read, as LightX2V's server; else only files inside image_dir, a relative path taken from
    it) and http(s) URLs (urls: downloaded by the server, as LightX2V's; False: refused)."""
    image_dir: Path | None = None
    urls: bool = True


def request_tokens(frames: int, height: int, width: int) -> int:
    """The DiT's tokens for a video: latent frames x H/16 x W/16 (schedulers.latent_shape over the 1 x 2 x 2
    patch)."""
    _, f, h, w = latent_shape(frames, height, width)
    return f * (h // 2) * (w // 2)


def _lax_int(value):
    """An integer field's value as LightX2V's pydantic schema (lax mode) takes it: an integral float (9.0) or
    a decimal string ("42") is that integer; anything else is returned as it is (and refused by its check)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and re.fullmatch(r"\s*[+-]?[0-9]{1,30}\s*", value):
        return int(value)
    return value


_DECIMAL = re.compile(r"\s*[+-]?([0-9]{1,30}(\.[0-9]{0,30})?|\.[0-9]{1,30})([eE][+-]?[0-9]{1,3})?\s*")


def _lax_float(value):
    """A number field's value as pydantic's lax mode takes it: a decimal string ("0.5", "1e-1") is that
    number; anything else is returned as it is (and refused by its check)."""
    if isinstance(value, str) and _DECIMAL.fullmatch(value):
        return float(value)
    return value


# pydantic's lax booleans (also what a form sends for Python's True / False)
_LAX_TRUE, _LAX_FALSE = ("1", "true", "t", "yes", "y", "on"), ("0", "false", "f", "no", "n", "off")


def _lax_bool(value):
    """A boolean field's value as pydantic's lax mode takes it: 0 / 1 and the strings "true", "False", "off",
    ... are that boolean; anything else is returned as it is (and refused by its check)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _LAX_TRUE + _LAX_FALSE:
        return value.strip().lower() in _LAX_TRUE
    return value


_LAX_INTS = ("seed", "infer_steps", "target_video_length", "target_fps", "video_duration", "num_fragments")


def _lax_fields(body: dict) -> dict:
    """The request's typed fields converted as LightX2V's pydantic schema (lax mode) converts them."""
    out = {}
    for k, v in body.items():
        if k in _LAX_INTS:
            v = _lax_int(v)
        elif k == "target_shape" and isinstance(v, list):
            v = [_lax_int(x) for x in v]
        elif k == "lora_strength":
            v = _lax_float(v)
        elif k == "use_prompt_enhancer":
            v = _lax_bool(v)
        out[k] = v
    return out


def check_request(body: dict, *, output_dir: Path, infer_steps: int, task: str,
                  image_bytes: bytes | None = None, fetched: tuple[bytes, str] | None = None,
                  default_size: tuple[int, int] = (480, 832),
                  lora_dir: Path | None = None, image_sources: ImageSources = ImageSources(),
                  default_frames: int = 81, max_tokens: int | None = None) -> tuple[str, dict, Path]:
    """A VideoTaskRequest dict (+ an uploaded image) -> (task_id, generate() parameters, result path);
    RequestError on bad input, before the task is queued. `max_tokens` caps a request's work (its DiT
    tokens, see request_tokens; None: no cap)."""
    from lightx2v_engine.config import parse_run_config
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object of VideoTaskRequest fields")
    unknown = sorted(set(body) - FIELDS)
    if unknown:
        raise RequestError(f"unknown field(s) {[_short(k, 40) for k in unknown]}; accepted: {sorted(FIELDS)}")
    body = _lax_fields(body)  # ("42", 9.0, "0.5", "false": as LightX2V's schema reads them)
    for name, why in UNSUPPORTED.items():
        value = body.get(name)
        # "not given": null, "", false, [] (0 is a value: 0 == False, so the comparison is by type)
        given = not (value is None or value is False or (isinstance(value, (str, list)) and len(value) == 0))
        if given and not (name in SCHEMA_DEFAULTS and value == SCHEMA_DEFAULTS[name]
                          and type(value) is type(SCHEMA_DEFAULTS[name])):
            raise RequestError(f"{name} is not supported by this server: {why}")
    prompt = body.get("prompt", "")  # (LightX2V's schema default "": an I2V request may send the image alone)
    prompt = "" if prompt is None else prompt
    if not isinstance(prompt, str):
        raise RequestError(f"prompt must be a string, got {type(prompt).__name__}")
    if not prompt.strip() and task == "t2v":
        raise RequestError("prompt must be a non-empty string for a t2v server (an i2v server takes an empty one)")
    neg = body.get("negative_prompt")
    if neg is not None and not isinstance(neg, str):
        raise RequestError(f"negative_prompt must be a string, got {type(neg).__name__}")
    for name, text in (("prompt", prompt), ("negative_prompt", neg or "")):
        if len(text) > MAX_PROMPT_CHARS:
            raise RequestError(f"{name} has {len(text)} characters; this server takes at most {MAX_PROMPT_CHARS} "
                               f"(the text encoder reads the first 512 tokens)")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:  # a lone surrogate (JSON "\ud800"): the tokenizer would fail in the task
            raise RequestError(f"{name}: not valid Unicode text ({e.reason} at character {e.start})") from None
    steps = body.get("infer_steps")
    if steps is not None and (isinstance(steps, bool) or steps not in (infer_steps, LIGHTX2V_DEFAULT_STEPS)):
        raise RequestError(f"infer_steps {_short(steps)}: this server's models run {infer_steps} steps (set at "
                           f"start by the config; LightX2V's default {LIGHTX2V_DEFAULT_STEPS} is accepted and "
                           f"changes nothing, as there)")
    params: dict[str, Any] = {"prompt": prompt, "negative_prompt": neg,
                              "loras": request_loras(body.get("lora_name"), body.get("lora_strength"), lora_dir)}
    seed = body.get("seed")
    if seed is None:
        seed = secrets.randbelow(2 ** 32)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < MAX_SEED:
        raise RequestError(f"seed must be a non-negative integer, got {_short(seed)}")
    params["seed"] = seed
    sizes = {}
    shape = body.get("target_shape")
    if shape is not None and shape != []:  # ([] is LightX2V's "not set")
        if not (isinstance(shape, list) and len(shape) == 2 and all(isinstance(v, int) and 0 < v <= MAX_SIDE
                                                                    for v in shape)):
            raise RequestError(f"target_shape must be [height, width], integers in (0, {MAX_SIDE}], got "
                               f"{_short(shape)}")
        sizes["target_height"], sizes["target_width"] = shape
    frames = body.get("target_video_length")
    if frames is not None:
        if isinstance(frames, bool) or not isinstance(frames, int) or not 0 < frames <= MAX_FRAMES:
            raise RequestError(f"target_video_length must be an integer in (0, {MAX_FRAMES}], got {_short(frames)}")
        sizes["target_video_length"] = frames
    try:  # the config's rules (multiples of 16, 4k+1 frames), checked now rather than in the worker
        parse_run_config(sizes, warn=False, source="request")
    except ValueError as e:
        raise RequestError(str(e)) from None
    if "target_height" in sizes:
        params["height"], params["width"] = sizes["target_height"], sizes["target_width"]
    if "target_video_length" in sizes:
        params["num_frames"] = sizes["target_video_length"]
    image = body.get("image_path")
    if image_bytes is not None and image:
        raise RequestError("give image_file or image_path, not both")
    if task == "i2v" and not image and image_bytes is None:
        raise RequestError("this server runs image-to-video: image_path (a URL, base64 data or a path) or an "
                           "image_file is required")
    if task == "t2v" and (image or image_bytes is not None):
        raise RequestError("this server runs text-to-video: no image is accepted")
    img = None
    height, width = params.get("height", default_size[0]), params.get("width", default_size[1])
    if image_bytes is not None or image:  # opened now: data that is no image is a 400, not a failed task
        data, what = ((image_bytes, "image_file") if image_bytes is not None
                      else fetched if fetched is not None else read_image_input(image, image_sources))
        img = _open_image(data, what)
        from lightx2v_engine.image import check_pil_mode
        try:  # (a mode the pipeline cannot take: a 400 now, not a failed task later)
            check_pil_mode(img)
        except ValueError as e:
            raise RequestError(f"{what}: {e}") from None
        params["image"] = data
    if img is not None:  # I2V's size follows the image's aspect ratio at the target area: checked now
        from lightx2v_engine.image import i2v_latent_size
        th, tw = params.get("height", default_size[0]), params.get("width", default_size[1])
        try:
            lat_h, lat_w = i2v_latent_size(img.height, img.width, th, tw)
        except ValueError as e:
            raise RequestError(str(e)) from None
        if max(lat_h, lat_w) * 8 > MAX_SIDE:
            raise RequestError(f"the image's aspect ratio ({img.width}x{img.height}) at "
                               f"area {th}x{tw} gives a {lat_h * 8}x{lat_w * 8} video, over {MAX_SIDE} pixels a side")
        height, width = lat_h * 8, lat_w * 8
        img.close()  # (a queued task keeps the encoded image, not its decoded pixels: decoded when it runs)
    frames = params.get("num_frames", default_frames)
    tokens = request_tokens(frames, height, width)
    if max_tokens is not None and tokens > max_tokens:
        _, lf, lh, lw = latent_shape(frames, height, width)
        raise RequestError(f"the request asks for {tokens} tokens ({height}x{width}, {frames} frames: "
                           f"{lf} latent frames x {lh // 2} x {lw // 2}); this server takes at most {max_tokens} "
                           f"per request (--max_request_tokens)")
    task_id = body.get("task_id") or uuid.uuid4().hex
    if not isinstance(task_id, str) or not re.fullmatch(r"[A-Za-z0-9_.-]{1,128}", task_id) or set(task_id) == {"."}:
        raise RequestError(f"task_id must be 1-128 letters, digits, '_', '-' or '.', got {_short(task_id)!r}")
    if task_id in RESERVED_IDS:
        raise RequestError(f"task_id {task_id!r} is reserved: the ids {', '.join(map(repr, RESERVED_IDS))} would "
                           f"clash with the endpoints under /v1/tasks/")
    save = body.get("save_result_path")
    if save is not None and not isinstance(save, str):
        raise RequestError(f"save_result_path must be a string, got {type(save).__name__}")
    return task_id, params, result_path(save, task_id, output_dir)


def request_loras(name, strength, lora_dir: Path | None) -> tuple:
    """lora_name (a file in --lora_dir; ".safetensors" may be left off) and lora_strength (default 1.0)
    -> the request's LoRA specs, () without lora_name. The file must lie inside --lora_dir."""
    from lightx2v_engine.config import LoraSpec
    if name in (None, ""):  # a strength alone changes nothing (clients may send a default one)
        return ()
    if lora_dir is None:
        raise RequestError("lora_name needs a server started with --lora_dir (the folder of the LoRA files)")
    if not isinstance(name, str):
        raise RequestError(f"lora_name must be a string, got {type(name).__name__}")
    if strength is None:
        strength = 1.0
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not math.isfinite(strength):
        raise RequestError(f"lora_strength must be a finite number, got {_short(strength)}")
    for cand in (name, name + ".safetensors"):
        path = _file_inside(lora_dir, cand)
        if path is not None:
            return (LoraSpec(str(path), float(strength)),)
    raise RequestError(f"lora_name {_short(name)!r}: no such LoRA file in the server's --lora_dir")


def _file_inside(root: Path, rel: str) -> Path | None:
    """root / rel resolved, if it is a file inside root (no '..' or link out of it), else None. A path whose
    text already leaves root (absolute elsewhere, or '..' past it) is refused before the file system is
    touched: nothing outside root is looked at."""
    try:
        base = root.resolve()
        text = os.path.normpath(os.path.join(base, rel))  # (an absolute rel replaces base)
        if not any(text == r or text.startswith(r.rstrip(os.sep) + os.sep) for r in (str(base), os.path.abspath(root))):
            return None
        path = Path(text).resolve()
        return path if path.is_relative_to(base) and path.is_file() else None
    except (OSError, ValueError, RuntimeError):  # a NUL byte, a name too long, a symlink loop
        return None


def _read_inside(path: Path | str, root: Path | None, limit: int) -> bytes:
    """Up to `limit` bytes of the file; with a root, the file opened must still lie inside it (checked on
    the open descriptor where /proc shows it: a link swapped in after the path was checked is refused)."""
    fd = os.open(path, os.O_RDONLY)
    with os.fdopen(fd, "rb") as f:
        if root is not None and os.path.isdir("/proc/self/fd"):
            real = Path(os.path.realpath(f"/proc/self/fd/{fd}"))
            if not real.is_relative_to(root.resolve()):
                raise OSError(f"{path} no longer lies inside {root}")
        return f.read(limit)


def list_loras(lora_dir: Path | None) -> list[str]:
    """The LoRA files a request may name (for /v1/service/metadata)."""
    if lora_dir is None or not lora_dir.is_dir():
        return []
    root = lora_dir.resolve()
    return sorted(str(p.relative_to(lora_dir)) for p in lora_dir.rglob("*")
                  if p.suffix in (".safetensors", ".pt", ".pth", ".bin") and p.is_file()
                  and p.resolve().is_relative_to(root))  # (a link out of the folder cannot be requested)


def result_path(requested: str | None, task_id: str, output_dir: Path) -> Path:
    """Where a task's video goes: output_dir / (save_result_path or task_id), inside output_dir; ".mp4" is
    added unless it ends in a video container's extension (.mp4, .m4v, .mov, .mkv: kept, as LightX2V keeps a
    given suffix).
    Control characters (which would also end up in the download's headers) are refused."""
    name = requested or task_id
    if any(ord(c) < 32 or 127 <= ord(c) < 160 for c in name):
        raise RequestError(f"save_result_path {_short(requested)!r}: control characters are not allowed")
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:  # (a lone surrogate: no file name a client can be sent back)
        raise RequestError(f"save_result_path {_short(requested)!r}: not valid Unicode text") from None
    if len(Path(name).parts) > MAX_RESULT_DEPTH + 1:
        raise RequestError(f"save_result_path {_short(requested)!r}: more than {MAX_RESULT_DEPTH} folders deep")
    try:
        path = (output_dir / name).resolve()
    except (OSError, ValueError) as e:
        raise RequestError(f"save_result_path {_short(requested)!r}: not a usable path ({e})") from None
    from lightx2v_engine.video import VIDEO_CONTAINERS
    if path.suffix.lower() not in VIDEO_CONTAINERS:
        path = path.with_name(path.name + ".mp4")
    if not path.is_relative_to(output_dir.resolve()) or path == output_dir.resolve():
        raise RequestError(f"save_result_path {_short(requested)!r} leaves the output folder {output_dir}")
    from lightx2v_engine.video import check_output_file
    try:  # (a folder, or a path through a file: refused now, not after the task has run)
        check_output_file(path, "save_result_path")
    except ValueError as e:
        raise RequestError(str(e)) from None
    return path


_CONTENT_TYPES = {".mp4": "video/mp4", ".m4v": "video/mp4", ".mov": "video/quicktime", ".mkv": "video/x-matroska"}


def _content_type(path: Path) -> str:
    """A download's Content-Type: the video's by its extension, else application/octet-stream."""
    return _CONTENT_TYPES.get(path.suffix.lower(), "application/octet-stream")


def content_disposition(name: str) -> str:
    """An attachment header for any file name (RFC 6266): an ASCII fallback without quotes, backslashes or
    control characters, and the UTF-8 name percent-encoded (RFC 5987)."""
    fallback = "".join(c if 32 <= ord(c) < 127 and c not in '"\\' else "_" for c in name)
    quoted = urllib.parse.quote(name, safe='', errors="replace")  # (a name with undecodable bytes: "?" for them)
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quoted}"


def _open_image(data, what: str):
    """bytes or a path -> a decoded PIL image, its size checked (MAX_IMAGE_PIXELS) before decoding."""
    import warnings
    from PIL import Image
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data) if isinstance(data, bytes) else data)
            if img.width * img.height > MAX_IMAGE_PIXELS:
                raise RequestError(f"{what}: {img.width}x{img.height} is over {MAX_IMAGE_PIXELS} pixels")
            img.load()
        return img
    except RequestError:
        raise
    except Exception as e:  # noqa: BLE001 - PIL raises many types (bombs, truncation, unknown formats)
        raise RequestError(f"{what}: not a readable image ({type(e).__name__}: {_short(e)})") from None


def _is_file(value: str) -> bool:
    try:
        return Path(value).is_file()
    except (OSError, ValueError):  # too long a name, a NUL byte
        return False


def _read_within(f, n: int, seconds: float, what: str, status: HTTPStatus = HTTPStatus.REQUEST_TIMEOUT,
                 total: float | None = None) -> bytes:
    """n bytes from the stream f (fewer at its end) within `seconds` in all: read1 returns what has come
    (each read also has its socket's own timeout), so the deadline is checked between arrivals; past it a
    RequestError with `status` (408: the client's body; a download's: 400) naming `total` seconds (default
    `seconds`: the time this read had)."""
    deadline = time.monotonic() + seconds
    parts, got = [], 0
    while got < n:
        if time.monotonic() > deadline:
            raise RequestError(f"{what}: not received within {seconds if total is None else total:.0f} s "
                               f"({got} of {n} bytes)", status)
        chunk = f.read1(min(n - got, 1 << 16))
        if not chunk:
            break
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


def _shut_socket(sock) -> None:
    """Shuts a connection both ways: a read blocked on it returns or fails at once."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


class _DownloadDeadline:
    """Shuts every connection of one download (its redirects' too) once `seconds` have passed since it began:
    urlopen's timeout is per read, so a server sending its status line and headers a byte at a time held the
    request for as long as it liked. (DNS and a TLS handshake keep their per-read timeouts only.)"""

    def __init__(self, seconds: float):
        self.expired, self._socks, self._lock = False, [], threading.Lock()
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True
        self.end = time.monotonic() + seconds

    def add(self, sock) -> None:
        with self._lock:
            self._socks.append(sock)
            if self.expired:
                _shut_socket(sock)

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            for sock in self._socks:
                _shut_socket(sock)

    def opener(self) -> urllib.request.OpenerDirector:
        """urllib's opener whose HTTP(S) connections are registered with this deadline as they connect."""
        deadline = self

        class Http(http.client.HTTPConnection):
            def connect(self):
                super().connect()
                deadline.add(self.sock)

        class Https(http.client.HTTPSConnection):
            def connect(self):
                super().connect()
                deadline.add(self.sock)

        class HttpHandler(urllib.request.HTTPHandler):
            def http_open(self, req):
                return self.do_open(Http, req)

        class HttpsHandler(urllib.request.HTTPSHandler):
            def https_open(self, req):
                return self.do_open(Https, req, context=self._context)

        return urllib.request.build_opener(HttpHandler, HttpsHandler)

    def __enter__(self) -> "_DownloadDeadline":
        self._timer.start()
        return self

    def __exit__(self, *exc) -> None:
        self._timer.cancel()


def read_image_input(value: str, sources: ImageSources = ImageSources()) -> tuple[bytes, str]:
    """image_path as LightX2V takes it: an http(s) URL, a data: URL, a file path on the server, or plain
    base64 (standard or URL-safe) -> (the encoded image's bytes, what they came from, for messages). A queued
    task keeps these bytes (a file as read now, not as it may be when the task runs). `sources` may confine
    files to a folder and refuse URLs; a path outside the folder is not looked at (no file-existence oracle:
    it is then only tried as base64)."""
    if not isinstance(value, str):
        raise RequestError(f"image_path must be a string (URL, base64 or path), got {type(value).__name__}")
    if value.startswith(("http://", "https://")):
        if not sources.urls:
            raise RequestError("image_path: this server does not download URLs (--no_image_urls); send base64 "
                               "data or an image_file upload")
        deadline = _DownloadDeadline(DOWNLOAD_DEADLINE)
        try:
            with deadline, deadline.opener().open(value, timeout=30) as r:
                data = _read_within(r, MAX_DOWNLOAD + 1, max(0.0, deadline.end - time.monotonic()),
                                    f"image_path {_short(value)!r}", HTTPStatus.BAD_REQUEST, total=DOWNLOAD_DEADLINE)
                if deadline.expired:  # (cut at the deadline: what came is not the whole image)
                    raise RequestError(f"image_path {_short(value)!r}: not received within {DOWNLOAD_DEADLINE:.0f} s")
        except (OSError, ValueError, http.client.HTTPException) as e:  # (HTTPException: a malformed reply)
            if isinstance(e, RequestError):
                raise
            if deadline.expired:
                raise RequestError(f"image_path {_short(value)!r}: not received within {DOWNLOAD_DEADLINE:.0f} s "
                                   f"(its reply did not come in time)") from None
            raise RequestError(f"image_path {_short(value)!r}: download failed ({type(e).__name__}: "
                               f"{_short(e)})") from None
        if len(data) > MAX_DOWNLOAD:
            raise RequestError(f"image_path {_short(value)!r}: larger than {MAX_DOWNLOAD >> 20} MiB")
        return data, "image_path"
    if value.startswith("data:"):
        return _b64(value.split(",", 1)[-1]), "image_path"
    path = value if sources.image_dir is None else _file_inside(sources.image_dir, value)
    if path is not None and _is_file(path):
        try:
            data = _read_inside(path, sources.image_dir, MAX_BODY + 1)
        except OSError as e:
            raise RequestError(f"image_path (file): cannot read it ({e})") from None
        if len(data) > MAX_BODY:
            raise RequestError(f"image_path (file): larger than {MAX_BODY >> 20} MiB")
        return data, "image_path (file)"
    try:
        return _b64(value), "image_path (base64)"
    except RequestError:
        where = "a file on the server" if sources.image_dir is None else "a file in the server's --image_dir"
        raise RequestError(f"image_path {_short(value)!r}: not a URL, base64 image data or {where}")


def _b64(text: str) -> bytes:
    compact = re.sub(r"\s+", "", text)
    try:
        return base64.b64decode(compact + "=" * (-len(compact) % 4), altchars=b"-_" if re.search(r"[-_]", compact)
                                else None, validate=True)
    except (binascii.Error, ValueError) as e:
        raise RequestError(f"image_path: invalid base64 data ({e})") from None


def parse_multipart(content_type: str, body: bytes) -> tuple[dict, bytes | None]:
    """multipart/form-data -> (form fields, image_file bytes or None). JSON-typed fields (seed,
    target_shape, ...) are parsed from their text."""
    msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        f"Content-Type: {content_type}\r\n\r\n".encode() + body)
    if not msg.is_multipart():
        raise RequestError("expected a multipart/form-data body")
    fields: dict[str, Any] = {}
    image = None
    for part in msg.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if not name:
            continue
        payload = part.get_payload(decode=True) or b""
        if name == "image_file":
            image = payload or None
            continue
        if name in ("last_frame_file", "audio_file"):
            if payload:
                raise RequestError(f"{name} is not supported by this server")
            continue
        try:
            text = payload.decode("utf-8")
        except UnicodeDecodeError:
            raise RequestError(f"form field {_short(name, 40)!r}: not UTF-8 text") from None
        if name in ("seed", "infer_steps", "target_video_length", "target_shape", "lora_strength", "video_duration",
                    "target_fps", "num_fragments", "talk_objects"):  # (use_prompt_enhancer: text, read laxly)
            try:
                fields[name] = json.loads(text) if text else None
            except (ValueError, RecursionError):
                raise RequestError(f"form field {name}: not a number/list ({_short(text)!r})") from None
        else:
            fields[name] = text
    return fields, image


# ---------------------------------------------------------------------------------------------- HTTP

_LOG_ESCAPES = {c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F)}


class Handler(BaseHTTPRequestHandler):
    server_version = "lightx2v-engine"
    timeout = 60  # seconds a client may stall (e.g. a body shorter than its Content-Length)
    app: "App"  # set on the subclass made by serve()

    def log_message(self, fmt, *args):  # through logging, not stderr; control characters escaped (a request
        log.info("%s %s", self.address_string(), (fmt % args).translate(_LOG_ESCAPES))  # line forging log lines)

    def handle_one_request(self):
        """One request, its line and headers within HEADER_DEADLINE in all: a client sending them a byte at
        a time (each within the per-read timeout) held its thread for as long as it liked."""
        self._header_timer = threading.Timer(HEADER_DEADLINE, self._cut)
        self._header_timer.daemon = True
        self._header_timer.start()
        try:
            super().handle_one_request()
        finally:
            self._header_timer.cancel()

    def parse_request(self) -> bool:
        ok = super().parse_request()  # (the headers are read: the deadline is over)
        self._header_timer.cancel()
        return ok

    def _cut(self) -> None:
        _shut_socket(self.connection)  # (the blocked read returns; the connection closes)

    def _send(self, status: HTTPStatus, obj) -> None:
        data = json.dumps(obj).encode()
        self._drain()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _file(self, path: Path, content_type: str) -> None:
        try:
            f = open(path, "rb")
        except OSError:
            raise RequestError(f"file {path.name!r} is gone", HTTPStatus.NOT_FOUND) from None
        with f:
            size = os.fstat(f.fileno()).st_size  # (the file opened: the path may name another one by now)
            disposition = content_disposition(path.name)  # (every header made before the status line is sent)
            self._drain()
            self.send_response(HTTPStatus.OK)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(size))
            self.send_header("Content-Disposition", disposition)
            self.end_headers()
            self._headers_sent = True
            while chunk := f.read(1 << 20):
                self.wfile.write(chunk)

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding"):
            raise RequestError("send the body with a Content-Length (chunked transfer is not accepted)",
                               HTTPStatus.LENGTH_REQUIRED)
        text = self.headers.get("Content-Length")
        if text is None:
            raise RequestError("Content-Length is required", HTTPStatus.LENGTH_REQUIRED)
        if not re.fullmatch(r"[0-9]+", text.strip()):
            raise RequestError(f"bad Content-Length {_short(text, 20)!r}")
        n = int(text)
        if n > MAX_BODY:
            raise RequestError(f"request body over {MAX_BODY >> 20} MiB", HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
        if self._expects_continue():
            # (curl asks so for bodies over 1 MB and otherwise waits a second before sending the body)
            self.wfile.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            self.wfile.flush()
        self._body_read = True
        return _read_within(self.rfile, n, max(BODY_MIN_S, n / BODY_RATE), "the request body")

    def _expects_continue(self) -> bool:
        return self.headers.get("Expect", "").strip().lower() == "100-continue" and self.request_version != "HTTP/1.0"

    def _drain(self) -> None:
        """Before a reply to a request whose body was not read (an early refusal: 413, 501, 404): reads and
        drops up to MAX_DRAIN bytes of it, so that a client still sending it reads the reply rather than a
        broken pipe; the connection then closes. (A client waiting for '100 Continue' sent nothing yet.)"""
        if self._body_read:
            return
        self._body_read = True
        text, chunked = self.headers.get("Content-Length"), self.headers.get("Transfer-Encoding")
        if not chunked and (text is None or text.strip() == "0"):
            return  # no body: nothing to drain, the connection may go on
        self.close_connection = True
        if chunked or not re.fullmatch(r"[0-9]+", text.strip()) or self._expects_continue():
            return
        left = min(int(text), MAX_DRAIN)
        while left > 0 and (chunk := self.rfile.read(min(left, 1 << 16))):
            left -= len(chunk)

    def _dispatch(self, method: str) -> None:
        path = self.path.split("?", 1)[0]
        self._headers_sent = self._body_read = False
        try:
            status, obj = self.app.route(method, path, self)
            if obj is not None:
                self._send(status, obj)
        except (ConnectionError, TimeoutError):  # the client went away or stalled: nothing to answer
            log.info("%s %s: client disconnected or timed out", method, path)
            self.close_connection = True
        except RequestError as e:
            self._reply_error(e.status, str(e))
        except Exception:  # noqa: BLE001 - a bug answers 500 (details in the log only); the server goes on
            log.exception("%s %s", method, path)
            self._reply_error(HTTPStatus.INTERNAL_SERVER_ERROR, "internal server error (see the server log)")
            self.close_connection = True

    def _reply_error(self, status: HTTPStatus, detail: str) -> None:
        if self._headers_sent:  # a started file download: the error cannot be written into it
            self.close_connection = True
            return
        self._headers_buffer = []  # (a reply whose headers were being made when it failed: not sent with this one)
        try:
            self._send(status, {"detail": detail})
        except (ConnectionError, TimeoutError):
            self.close_connection = True

    def do_GET(self):
        self._dispatch("GET")

    def do_POST(self):
        self._dispatch("POST")

    def do_DELETE(self):
        self._dispatch("DELETE")


class App:
    """Routes requests to the queue; `generate(params, path, cancel)` makes one video (the pipeline's)."""

    def __init__(self, generate: Callable[[dict, Path, threading.Event], None], *, output_dir: Path,
                 infer_steps: int, task: str, max_queue_size: int = 10, metadata: dict | None = None,
                 default_size: tuple[int, int] = (480, 832), lora_dir: str | Path | None = None,
                 image_sources: ImageSources = ImageSources(), default_frames: int = 81,
                 max_request_tokens: int | None = None):
        self.output_dir, self.infer_steps, self.task = Path(output_dir), infer_steps, task
        self.image_sources = image_sources  # where image_path may read from (--image_dir, --no_image_urls)
        self.lora_dir = Path(lora_dir) if lora_dir is not None else None  # per-request LoRA files (lora_name)
        self.default_size = default_size  # (height, width) of requests without target_shape
        self.default_frames = default_frames  # of requests without target_video_length
        # a request's work: at most its tokens (default: Wan's 720p x 81 frames, or the default size's if more)
        self.max_request_tokens = max_request_tokens or max(WAN_720P_TOKENS,
                                                            request_tokens(default_frames, *default_size))
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.metadata = metadata or {}
        self.queue = TaskQueue(lambda t: generate(t.params, t.save_result_path, t.cancel), max_queue_size)
        self._reading = threading.BoundedSemaphore(MAX_READING)
        self._parsing = threading.BoundedSemaphore(MAX_PARSING)

    @contextmanager
    def _slot(self, sem: threading.BoundedSemaphore, what: str):
        """One of `sem`'s slots (bounds the memory of the requests reading or parsing at once), else a 503
        after PARSE_WAIT seconds."""
        if not sem.acquire(timeout=PARSE_WAIT):
            raise RequestError(f"the server is busy {what} other requests (waited {PARSE_WAIT} s); retry later",
                               HTTPStatus.SERVICE_UNAVAILABLE)
        try:
            yield
        finally:
            sem.release()

    def _create_request(self, h: "Handler", form: bool) -> tuple[HTTPStatus, dict]:
        """A create request: refused at once when the queue is full (before its body is read); then, in one of
        MAX_READING slots held to the end (memory: at most MAX_READING bodies), its body read within its own
        deadline (a stalled client is dropped, not waited on), parsed in one of MAX_PARSING slots, an
        image_path URL downloaded (outside those two slots, within its own deadline), and the request checked
        (the image decoded) and queued in a parsing slot again."""
        self.queue.check_room()
        with self._slot(self._reading, "reading"):
            raw = h._body()  # (its RequestError, a ValueError too, must not be caught below)
            with self._slot(self._parsing, "parsing"):
                if form:
                    body, image_bytes = parse_multipart(h.headers.get("Content-Type", ""), raw)
                else:
                    image_bytes = None
                    try:
                        body = json.loads(raw or b"{}")
                    except (ValueError, RecursionError) as e:  # bad JSON or UTF-8, over-long integers, nesting
                        raise RequestError(f"the request body is not JSON ({e})") from e
                del raw
            fetched = None
            url = body.get("image_path") if isinstance(body, dict) else None
            if (self.task == "i2v" and image_bytes is None and isinstance(url, str)
                    and url.startswith(("http://", "https://")) and self.image_sources.urls):
                self.queue.check_room()
                fetched = read_image_input(url, self.image_sources)
            return self._create(body, image_bytes, fetched)

    def _create(self, body: dict, image_bytes: bytes | None = None,
                fetched: tuple[bytes, str] | None = None) -> tuple[HTTPStatus, dict]:
        """check_request (the image's decode included) in one of MAX_PARSING slots, after a check that the
        queue has room (no image work for a request refused anyway)."""
        self.queue.check_room()
        with self._slot(self._parsing, "parsing"):
            return self._create_checked(body, image_bytes, fetched)

    def _create_checked(self, body: dict, image_bytes: bytes | None,
                        fetched: tuple[bytes, str] | None = None) -> tuple[HTTPStatus, dict]:
        task_id, params, path = check_request(body, output_dir=self.output_dir, infer_steps=self.infer_steps,
                                              task=self.task, image_bytes=image_bytes, fetched=fetched,
                                              default_size=self.default_size, lora_dir=self.lora_dir,
                                              image_sources=self.image_sources, default_frames=self.default_frames,
                                              max_tokens=self.max_request_tokens)
        task = self.queue.submit(Task(task_id, params, path))
        # (a new task is pending: its status read now, outside the queue's lock, could be a later one)
        return HTTPStatus.OK, {"task_id": task.task_id, "task_status": "pending",
                               "save_result_path": str(task.save_result_path)}

    def route(self, method: str, path: str, h: Handler) -> tuple[HTTPStatus, dict | None]:
        path = path.rstrip("/") or "/"
        if method == "POST" and path in ("/v1/tasks/video", "/v1/tasks"):
            return self._create_request(h, form=False)
        if method == "POST" and path == "/v1/tasks/video/form":
            return self._create_request(h, form=True)
        if method == "GET" and path == "/health":  # (LightX2V's liveness probe)
            return HTTPStatus.OK, {"status": "ok"}
        if method == "POST" and path in ("/v1/tasks/image", "/v1/tasks/image/form"):
            raise RequestError("image tasks are not supported: this engine generates video", HTTPStatus.NOT_IMPLEMENTED)
        if method == "GET" and path == "/v1/tasks":
            return HTTPStatus.OK, self.queue.all()
        if method == "GET" and path == "/v1/tasks/queue/status":
            return HTTPStatus.OK, self.queue.status()
        if method == "DELETE" and path == "/v1/tasks/all/running":
            return HTTPStatus.OK, self.queue.cancel_all()
        m = re.fullmatch(r"/v1/tasks/([^/]+)(/status|/result)?", path)
        if m and method == "GET" and m.group(2) == "/status":
            return HTTPStatus.OK, self.queue.info(m.group(1))
        if m and method == "GET" and m.group(2) == "/result":
            info = self.queue.info(m.group(1))
            if info["status"] != "completed":
                raise RequestError(f"task {info['task_id']} is {info['status']}"
                                   + (f": {info['error']}" if info["error"] else ""), HTTPStatus.NOT_FOUND)
            h._file(Path(info["save_result_path"]), _content_type(Path(info["save_result_path"])))
            return HTTPStatus.OK, None
        if m and method == "DELETE" and m.group(2) is None:
            return HTTPStatus.OK, self.queue.cancel(m.group(1))
        if method == "GET" and path.startswith("/v1/files/download/"):
            rel = urllib.request.url2pathname(path[len("/v1/files/download/"):])
            target = _file_inside(self.output_dir, rel)
            if target is None:
                raise RequestError(f"no file {_short(rel)!r} in the output folder", HTTPStatus.NOT_FOUND)
            h._file(target, _content_type(target))
            return HTTPStatus.OK, None
        if method == "GET" and path == "/v1/service/status":
            return HTTPStatus.OK, self.queue.service_status()
        if method == "GET" and path == "/v1/service/metadata":
            return HTTPStatus.OK, {**self.metadata, "loras": list_loras(self.lora_dir)}
        raise RequestError(f"no endpoint {method} {path}", HTTPStatus.NOT_FOUND)


def dynamic_loras(run_cfg, model_path=None):
    """(run_cfg, default request LoRAs): with lora_dynamic_apply, the config's LoRAs are not merged at load but
    run as every task's default LoRAs, which a task's lora_name replaces (LightX2V's server switches them
    out: its worker removes the dynamic LoRAs, then registers the request's) and a task without one gets back.
    Their paths are found now (as given, else under the model folder)."""
    import dataclasses
    from lightx2v_engine.lora import resolve_spec
    if not (run_cfg.lora_dynamic_apply and run_cfg.lora_configs):
        return run_cfg, ()
    specs = tuple(resolve_spec(s, [model_path] if model_path else []) for s in run_cfg.lora_configs)
    return dataclasses.replace(run_cfg, lora_configs=()), specs


def _run_task(pipe, params: dict, cancelled: Callable[[], bool]):
    """One video from a task's parameters; `cancelled()` is asked between denoising steps."""
    def progress(i, n):
        if cancelled():
            raise TaskCancelled()
    par = pipe.parallel
    error = None
    try:
        # a task's LoRAs replace the default ones (lora_dynamic_apply's config LoRAs); none: the defaults
        pipe.set_request_loras(params.get("loras") or pipe.default_request_loras)
    except Exception as e:  # noqa: BLE001
        if par is None:
            raise
        error = e
    if par is not None:  # each rank reads the LoRA files itself: a failure on some (an unreadable file, a full
        par.agree("apply the request's LoRAs", error)  # disk) is every rank's RankError, the ranks stay in step
    # (a queued image is its encoded bytes, checked when the request came; the pipeline decodes them where it
    # encodes the image: on rank 0 within its agreed step under multi-GPU)
    return pipe.generate(params["prompt"], negative_prompt=params.get("negative_prompt"), image=params.get("image"),
                         seed=params["seed"], num_frames=params.get("num_frames"), height=params.get("height"),
                         width=params.get("width"), progress=progress)


def pipeline_generate(pipe) -> Callable[[dict, Path, threading.Event], None]:
    """The App's generate function for a Pipeline: one video, cancellable between denoising steps. Under
    multi-GPU parallelism (rank 0 serves) each task's parameters go to the other ranks (serve_worker) first,
    and a cancellation reaches them at the same step boundary."""
    par = pipe.parallel

    def generate(params: dict, path: Path, cancel: threading.Event) -> None:
        if cancel.is_set():
            raise TaskCancelled()
        if par is None:
            out = _run_task(pipe, params, cancel.is_set)
        else:
            if pipe.device.type == "cuda":
                torch.cuda.set_device(pipe.device)  # (this worker thread's current device)
            # (the image stays here: rank 0 alone encodes it; the others only need to know there is one)
            par.send("task", params={**params, "image": RANK0_IMAGE} if params.get("image") is not None else params)
            out = _run_parallel_task(pipe, params, lambda: par.broadcast_flag(cancel.is_set()))
        path.parent.mkdir(parents=True, exist_ok=True)
        out.save(path)
    return generate


RANK0_IMAGE = "<the image of rank 0>"  # what the other ranks get for a task's image (never read there)


def _errors_every_rank_raises():
    """Errors of a task that every rank raises at the same point (the same inputs, bit-identical latents):
    after them the ranks still agree on the next collective, so the server goes on."""
    from lightx2v_engine.checkpoint import CheckpointError
    from lightx2v_engine.pipeline import NonFiniteError
    return (TaskCancelled, NonFiniteError, ValueError, FileNotFoundError, CheckpointError)


def _run_parallel_task(pipe, params: dict, cancelled: Callable[[], bool]):
    """_run_task on one rank of a multi-GPU server. Any other error (out of memory on one GPU, a failed
    kernel) may strike one rank only, which leaves the others waiting in a collective it will not join:
    the process then exits, and torchrun stops the others (a supervisor restarts the job)."""
    try:
        return _run_task(pipe, params, cancelled)
    except _errors_every_rank_raises():
        raise
    except BaseException as e:  # noqa: BLE001
        log.critical("rank %d: %s: %s during a multi-GPU task; the ranks can no longer agree, exiting",
                     pipe.parallel.rank, type(e).__name__, e, exc_info=True)
        _exit_now(1)


def _exit_now(code: int) -> None:
    """Exits without the interpreter's shutdown (which would wait on a process group a peer has left). A task
    still writing its video (a forced stop) leaves no temporary file."""
    from lightx2v_engine.video import remove_temporary_files
    remove_temporary_files()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def serve_worker(pipe) -> None:
    """A rank > 0 of a multi-GPU server: runs each task rank 0 sends (its share of the DiT's work) until
    rank 0 sends None. Errors every rank raises alike are rank 0's to report; others end the process."""
    par = pipe.parallel
    while True:
        msg = par.receive("task")
        if msg is None:
            return
        try:
            _run_parallel_task(pipe, msg["params"], lambda: par.broadcast_flag(False))
        except _errors_every_rank_raises():
            pass

class _HTTPServer(ThreadingHTTPServer):
    request_queue_size = 128  # the listen backlog (5 by default: a burst of status polls waited on TCP retries)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)

    def process_request(self, request, client_address):
        """A thread for the connection while fewer than MAX_CONNECTIONS are served; else it is closed at once
        (a thread each, unbounded before: idle or trickling connections could pile up without limit)."""
        if not self._slots.acquire(blocking=False):
            log.warning("%s: closed, %d connections are open (MAX_CONNECTIONS)", client_address[0], MAX_CONNECTIONS)
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


def bind(host: str = "0.0.0.0", port: int = 8000) -> ThreadingHTTPServer:
    """The server's socket bound to (host, port) (port 0: any free one) but not listening yet (connections
    are refused until serve() attaches the app): main() binds before the models load, so that a taken port
    is an error at once, not after minutes of loading."""
    httpd = _HTTPServer((host, port), Handler, bind_and_activate=False)
    try:
        httpd.server_bind()
    except BaseException:
        httpd.server_close()
        raise
    return httpd


def serve(app: App, host: str = "0.0.0.0", port: int = 8000,
          httpd: ThreadingHTTPServer | None = None) -> ThreadingHTTPServer:
    """An HTTP server for `app` listening on (host, port), or on the socket of bind(); call serve_forever()."""
    httpd = httpd or bind(host, port)
    httpd.RequestHandlerClass = type("BoundHandler", (Handler,), {"app": app})
    httpd.server_activate()
    return httpd


def _env_int(name: str, default: int) -> int:
    """An integer environment variable (LightX2V's server settings), else `default`; a bad value warns."""
    text = os.environ.get(name)
    if not text:
        return default
    try:
        return int(text)
    except ValueError:
        log.warning("$%s=%r is not an integer: %d is used", name, text, default)
        return default


def build_parser() -> argparse.ArgumentParser:
    from lightx2v_engine.infer import build_parser as infer_parser
    p = infer_parser()
    p.prog = "python -m lightx2v_engine.server"
    p.description = ("HTTP server with LightX2V's task API. It takes the CLI's model and config options; the "
                     "CLI's per-video ones (--prompt, --image_path, --seed, --save_result_path, ...) come with each "
                     "request instead (given here, they are not used: a warning names them). Extra --key value "
                     "pairs are config keys.")
    p.allow_abbrev = False  # '--config' must not silently mean --config_json (extra pairs are config keys)
    # (defaults from LightX2V's server environment variables where set, as its ServerConfig.from_env)
    p.add_argument("--host", default=os.environ.get("LIGHTX2V_HOST") or "0.0.0.0", help="address to listen on "
                   "(default: $LIGHTX2V_HOST, else every interface, as LightX2V's; use 127.0.0.1 for this machine "
                   "only - requests may read image files and URLs, see --image_dir and --no_image_urls)")
    p.add_argument("--port", type=int, default=_env_int("LIGHTX2V_PORT", 8000), help="default: $LIGHTX2V_PORT, "
                   "else 8000")
    p.add_argument("--max_queue_size", type=int, default=_env_int("LIGHTX2V_MAX_QUEUE_SIZE", 10),
                   help="tasks pending or processing at most (HTTP 503 beyond); default: $LIGHTX2V_MAX_QUEUE_SIZE, "
                   "else 10")
    p.add_argument("--max_request_tokens", type=int, default=None, help="the most DiT tokens (latent frames x H/16 x "
                   f"W/16) a request may ask for; default: {WAN_720P_TOKENS} (720p x 81 frames) or the default "
                   "size's, if more")
    p.add_argument("--output_dir", default="save_results", help="where task results are written")
    p.add_argument("--lora_dir", default=None, help="folder of LoRA files a request may name (lora_name, "
                   "lora_strength), merged on top of the config's LoRAs for that request")
    p.add_argument("--metric_port", type=int, default=None, help="accepted for LightX2V compatibility; no metrics")
    p.add_argument("--image_dir", default=None, help="image_path files must lie in this folder (relative paths "
                   "are taken from it); default: any file the server can read, as LightX2V's server")
    p.add_argument("--no_image_urls", action="store_true", help="refuse http(s) image_path URLs (the server "
                   "would download them); base64 data and image_file uploads still work")
    return p


def check_options(args, rank: int = 0) -> None:
    """Server options that would otherwise fail late or with a traceback: a ValueError naming the option,
    before the models load. Rank 0 (which writes the results) makes --output_dir and tries writing to it, and
    checks that the ffmpeg writing the videos exists."""
    from lightx2v_engine.infer import DEFAULT_OUTPUT
    per_video = [flag for flag, given in (
        ("--prompt", args.prompt is not None), ("--negative_prompt", args.negative_prompt is not None),
        ("--image_path", bool(args.image_path)), ("--seed", args.seed is not None),
        ("--save_result_path", args.save_result_path != DEFAULT_OUTPUT), ("--save_latents", args.save_latents is not None),
        ("--last_frame_path", bool(args.last_frame_path)), ("--use_prompt_enhancer", args.use_prompt_enhancer)) if given]
    if per_video and rank == 0:  # (LightX2V's server takes the CLI's arguments: its start scripts may pass
        # them; a warning, so that a --seed 5 does not look like every request's seed)
        log.warning("%s: per-video settings of the CLI, not used by the server: each request's JSON carries them "
                    "(prompt, negative_prompt, image_path, seed - random when not given -, save_result_path)",
                    ", ".join(per_video))
    if args.max_queue_size < 1:
        raise ValueError(f"--max_queue_size must be at least 1, got {args.max_queue_size}")
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in 0..65535, got {args.port}")
    if args.max_request_tokens is not None and args.max_request_tokens < 1:
        raise ValueError(f"--max_request_tokens must be at least 1, got {args.max_request_tokens}")
    if args.lora_dir is not None and not Path(args.lora_dir).is_dir():  # (it failed each request naming a LoRA)
        raise ValueError(f"--lora_dir {args.lora_dir!r} is not a folder")
    if rank == 0:
        try:
            Path(args.output_dir).mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=args.output_dir):
                pass
        except OSError as e:
            raise ValueError(f"--output_dir {args.output_dir!r} cannot be created or written "
                             f"({e.strerror or type(e).__name__})") from None
        from lightx2v_engine.video import VideoWriteError, check_ffmpeg
        try:  # (every task would fail after its run, when its video is written)
            check_ffmpeg("server")
        except VideoWriteError as e:
            raise ValueError(str(e)) from None


def image_sources(args) -> ImageSources:
    """--image_dir / --no_image_urls -> ImageSources; a --image_dir that is no folder stops the start."""
    folder = None
    if args.image_dir is not None:
        folder = Path(args.image_dir)
        if not folder.is_dir():
            raise ValueError(f"--image_dir {args.image_dir!r} is not a folder")
    return ImageSources(image_dir=folder, urls=not args.no_image_urls)


def config_pairs(extra: list[str]) -> dict[str, Any]:
    """LightX2V's server also takes `--key value` pairs as config keys: ['--sample_shift', '3'] ->
    {'sample_shift': 3} (values read as JSON where they parse, else as text; checked by the config parser)."""
    if len(extra) % 2 or any(not k.startswith("--") or len(k) < 3 for k in extra[::2]):
        raise ValueError(f"unrecognized arguments {extra}; extra config keys go as --key value pairs")
    out = {}
    for key, text in zip(extra[::2], extra[1::2]):
        try:
            out[key[2:]] = json.loads(text)
        except json.JSONDecodeError:
            out[key[2:]] = text
    return out


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _exit_at_once(signum, frame):
    _exit_now(0)


def main(argv=None) -> int:
    from lightx2v_engine.infer import load_pipeline, run_config_from_args, user_errors
    args, extra = build_parser().parse_known_args(argv)
    from lightx2v_engine.parallel import rank_from_env, rank_prefix
    logging.basicConfig(level=logging.INFO if rank_from_env() == 0 else logging.WARNING,
                        format=rank_prefix() + "%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:  # (checked before the models load)
        args.config_overrides = config_pairs(extra)
        sources = image_sources(args)
        check_options(args, rank_from_env())
    except ValueError as e:
        print(f"{rank_prefix()}error: {e}", file=sys.stderr)
        return 2
    logging.captureWarnings(True)  # config warnings through the log (with the rank under torchrun)
    httpd = None
    try:
        if rank_from_env() == 0:
            httpd = bind(args.host, args.port)
        run_cfg, default_loras = dynamic_loras(run_config_from_args(args), args.model_path)
        pipe = load_pipeline(args, run_cfg)
        pipe.default_request_loras = default_loras  # (every rank: a task without lora_name runs them)
        pipe.set_request_loras(default_loras)
    except user_errors() as e:  # (as the CLI: one line naming the problem, no traceback)
        if httpd is not None:
            httpd.server_close()
        where = f" (--host {args.host} --port {args.port})" if httpd is None and rank_from_env() == 0 else ""
        print(f"{rank_prefix()}error: {str(e).replace(chr(10), ' ')}{where}", file=sys.stderr)
        from lightx2v_engine.parallel import mark_failed
        mark_failed()  # (under torchrun: this rank leaves at once; its peers' collectives fail, not wait)
        return 2
    if not pipe.is_main:  # multi-GPU: rank 0 serves HTTP, the other ranks follow its tasks (until torchrun
        serve_worker(pipe)  # stops them: the default SIGTERM action, as they wait inside a collective)
        return 0
    meta = {"model_cls": args.model_cls, "task": pipe.task, "model": pipe.model_cfg.name,
            "model_path": args.model_path, "infer_steps": pipe.run_cfg.infer_steps,
            "defaults": {"target_video_length": pipe.run_cfg.target_video_length,
                         "target_shape": [pipe.run_cfg.target_height, pipe.run_cfg.target_width]},
            "world_size": pipe.parallel.world_size if pipe.parallel else 1}
    meta["nproc_per_node"] = meta["world_size"]  # (LightX2V's name)
    app = App(pipeline_generate(pipe), output_dir=Path(args.output_dir), infer_steps=pipe.run_cfg.infer_steps,
              task=pipe.task, max_queue_size=args.max_queue_size, metadata=meta,
              default_size=(pipe.run_cfg.target_height, pipe.run_cfg.target_width), lora_dir=args.lora_dir,
              image_sources=sources, default_frames=pipe.run_cfg.target_video_length,
              max_request_tokens=args.max_request_tokens)
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}  # (back on return)
    signal.signal(signal.SIGTERM, _interrupt)  # a termination ends like Ctrl-C: the server closes its socket
    httpd = serve(app, args.host, args.port, httpd)
    log.info("serving %s on http://%s:%d (results in %s)", pipe.model_cfg.name, args.host, httpd.server_port,
             app.output_dir)
    code = 0
    try:
        httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    except Exception:  # noqa: BLE001 - logged; the worker is still stopped below
        log.exception("the server failed")
        code = 1
    for sig in (signal.SIGTERM, signal.SIGINT):  # a second signal while stopping: exit at once
        signal.signal(sig, _exit_at_once)
    httpd.server_close()
    if pipe.parallel is not None:
        app.queue.close(timeout=0)  # (a running task's collectives would never finish: no waiting for it)
        if app.queue.current is None:  # idle: the other ranks wait for rank 0's next message, stop: None
            try:
                pipe.parallel.broadcast_object(None)
            except Exception as e:  # noqa: BLE001 - they are gone already (torchrun signalled them too)
                log.info("the other ranks had stopped (%s)", type(e).__name__)
        else:  # mid-task: a non-zero exit makes torchrun stop the ranks left inside the task's collectives
            code = code or 1
        _exit_now(code)
    # pending tasks are cancelled and the running one stops before its next step: the worker must be out of
    # the model before the interpreter shuts down (a thread inside torch then aborts the process)
    if not app.queue.close(timeout=STOP_WAIT):
        log.warning("the running task did not stop within %g s; exiting without waiting for it", STOP_WAIT)
        _exit_now(code)
    for sig, handler in previous.items():  # (main called in-process: its caller's handlers again)
        if handler is not None:
            signal.signal(sig, handler)
    log.info("stopped")
    return code


if __name__ == "__main__":
    sys.exit(main())
