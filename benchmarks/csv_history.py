"""The benchmarks' CSV files are histories: each run appends its rows (GPU, versions, commit and date in
every row), so that runs on different cards and commits can be compared from one file."""
from __future__ import annotations

import csv
import datetime
import os
import subprocess
import time


def append_csv(path: str, fieldnames: list[str], rows: list[dict]) -> None:
    """Appends `rows` to the CSV at `path`, writing the header when the file is new or empty. A file whose
    header is another column set (an older version of the benchmark) is first moved aside to
    <name>.<its mtime>.csv, so that no file mixes column sets."""
    if os.path.isfile(path) and os.path.getsize(path) > 0:
        with open(path, newline="") as f:
            header = next(csv.reader(f), [])
        if header != list(fieldnames):
            stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(os.path.getmtime(path)))
            os.replace(path, f"{os.path.splitext(path)[0]}.{stamp}.csv")
    new = not os.path.isfile(path) or os.path.getsize(path) == 0
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fieldnames, extrasaction="ignore")
        if new:
            w.writeheader()
        w.writerows(rows)


def run_env(gpu: str) -> dict:
    """What names a run in every row and summary: the GPU, torch and triton versions, the commit (LX2V_COMMIT
    wins: a copied tree's git metadata can be stale) and the UTC date."""
    import torch
    try:
        import triton
        triton_v = triton.__version__
    except ImportError:
        triton_v = "none"
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
                                cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    return dict(gpu=gpu, torch=torch.__version__, triton=triton_v, commit=os.environ.get("LX2V_COMMIT") or commit,
                date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"))
