"""State review 2: a request LoRA is known by its file's identity (an overwritten file is a new LoRA), resolved
alike on the resident and the per-use (unload_modules) paths; an out-of-memory CUDA-graph capture drops the
other shapes' cached sets and tries once more before its shape is skipped, and the skip set is bounded."""
import gc
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lightx2v_engine import lora as lora_mod
from lightx2v_engine import pipeline as pipeline_mod
from lightx2v_engine.config import LoraSpec
from lightx2v_engine.lora import LoraKeyError, LoraSwitch, merge_lora_, read_lora
from lightx2v_engine.pipeline import Pipeline

from test_cuda_graph import _graph_case
from test_lora_switch import TINY, _dit, same, snapshot, write_lora

pytestmark = pytest.mark.usefixtures("torch_ops")

OOM = torch.OutOfMemoryError("CUDA out of memory (simulated)")


def overwrite(path, model, seed):
    """Writes other LoRA weights over `path` (same keys and shapes: the same size), its modification time
    moved on explicitly (a rewrite within the file system's timestamp granularity would keep it)."""
    before = os.stat(path).st_mtime_ns
    spec = write_lora(path, model, seed=seed)
    later = before + 2_000_000_000
    os.utime(path, ns=(later, later))
    return spec


def count_merges(monkeypatch):
    """merge_lora_ calls (a LoraSwitch merge, or a per-use path's check_only check of a request LoRA)."""
    calls = []
    real = lora_mod.merge_lora_
    monkeypatch.setattr(lora_mod, "merge_lora_", lambda *a, **k: (calls.append(k.get("check_only", False)),
                                                                   real(*a, **k))[1])
    return calls


def merged(path, strength=1.0):
    """The tiny DiT of _dit() with the LoRA file at `path` merged once (what a switch must equal)."""
    ref = _dit()
    merge_lora_(ref, read_lora(path), strength)
    return snapshot(ref)


def test_switch_merges_an_overwritten_lora_file_again(tmp_path, monkeypatch):
    dit = _dit()
    path = tmp_path / "a.safetensors"
    spec = write_lora(path, dit, seed=1)
    calls = count_merges(monkeypatch)
    sw = LoraSwitch(dit)
    assert sw.set((spec,)) and len(calls) == 1
    overwrite(path, dit, seed=2)
    assert sw.set((spec,)) and len(calls) == 2  # the same path and strength, another file
    assert same(snapshot(dit), merged(path))  # the new weights merged onto the model as loaded
    assert not sw.set((spec,)) and len(calls) == 2  # unchanged: no work
    assert sw.current == (spec,)


def test_pipeline_merges_an_overwritten_request_lora_again(tmp_path, monkeypatch):
    """Pipeline.set_request_loras (the server's per-task call) on a resident DiT: the same spec after its
    file was overwritten gives the new LoRA (the old one stayed while it was the current one)."""
    pipe = Pipeline.random("tiny", TINY, device="cpu", seed=3)
    ref = Pipeline.random("tiny", TINY, device="cpu", seed=3)
    path = tmp_path / "a.safetensors"
    spec = write_lora(path, pipe.dit, seed=1)
    pipe.set_request_loras([spec])
    overwrite(path, pipe.dit, seed=2)
    calls = count_merges(monkeypatch)
    pipe.set_request_loras([spec])
    merge_lora_(ref.dit, read_lora(path), 1.0)
    assert len(calls) == 1 and same(snapshot(pipe.dit), snapshot(ref.dit))
    pipe.set_request_loras([spec])
    assert len(calls) == 1


def test_per_use_dit_checks_an_overwritten_request_lora_again(tmp_path):
    """unload_modules: a request LoRA is checked when set; the same spec after its file was overwritten with
    one that does not fit the DiT is checked again (it passed as "checked before")."""
    pipe = Pipeline.random("tiny", {**TINY, "unload_modules": True}, device="cpu", seed=3)
    path = tmp_path / "a.safetensors"
    spec = write_lora(path, _dit(), seed=1)
    pipe.set_request_loras([spec])
    before = os.stat(path).st_mtime_ns
    save_file({"diffusion_model.blocks.0.nonsense.lora_up.weight": torch.zeros(4, 4),
               "diffusion_model.blocks.0.nonsense.lora_down.weight": torch.zeros(4, 4)}, str(path))
    os.utime(path, ns=(before + 2_000_000_000,) * 2)
    with pytest.raises(LoraKeyError, match="nonsense"):
        pipe.set_request_loras([spec])
    assert pipe._request_loras == () and pipe._request_lora_key == ()


@pytest.mark.parametrize("per_use", [False, True], ids=["resident", "unload_modules"])
def test_request_lora_paths_resolve_alike_on_both_paths(tmp_path, monkeypatch, per_use):
    """A relative path, the absolute one and a link to the file are one LoRA (no work again) on the resident
    DiT as on one built per use; a link pointed at another file, or that file overwritten, is a new one."""
    pipe = Pipeline.random("tiny", {**TINY, **({"unload_modules": True} if per_use else {})}, device="cpu", seed=3)
    model = _dit()
    a = write_lora(tmp_path / "a.safetensors", model, seed=1)
    b = write_lora(tmp_path / "b.safetensors", model, seed=2, targets=["blocks.0.self_attn.q"])
    link = tmp_path / "link.safetensors"
    os.symlink(tmp_path / "a.safetensors", link)
    monkeypatch.chdir(tmp_path)
    calls = count_merges(monkeypatch)
    steps = [(LoraSpec("a.safetensors", 1.0), 1), (a, 0), (LoraSpec(str(link), 1.0), 0)]
    for spec, work in steps:
        pipe.set_request_loras([spec])
        assert len(calls) == work, (spec, calls)
        calls.clear()
    os.remove(link)
    os.symlink(tmp_path / "b.safetensors", link)
    pipe.set_request_loras([LoraSpec(str(link), 1.0)])
    assert len(calls) == 1
    overwrite(tmp_path / "b.safetensors", model, seed=4)
    pipe.set_request_loras([LoraSpec("link.safetensors", 1.0)])
    assert len(calls) == 2
    pipe.set_request_loras([b])
    assert len(calls) == 2  # b's file, unchanged since
    if per_use:
        assert [s.path for s in pipe._request_loras] == [str((tmp_path / "b.safetensors").resolve())]
    else:
        ref = Pipeline.random("tiny", TINY, device="cpu", seed=3)
        merge_lora_(ref.dit, read_lora(b.path), 1.0)
        assert same(snapshot(pipe.dit), snapshot(ref.dit))


class _At:
    """plan["at"] of _graph_case for several velocity calls (`len(calls) == plan["at"]`)."""

    def __init__(self, *counts):
        self.counts = counts

    def __eq__(self, n):
        return n in self.counts


@pytest.mark.parametrize("at", [1, 3], ids=["warm_up", "capture"])
def test_out_of_memory_drops_the_cached_sets_and_captures_again(monkeypatch, caplog, at):
    """Out of memory capturing a second shape (in its warm-up step or a capture that ended cleanly) while the
    first shape's set holds its pool: that set goes (its pool freed), the capture is tried once more and
    the second shape gets its graphs."""
    fake, pipe, call, calls, plan = _graph_case(monkeypatch)
    assert call(h=6) is not None and len(pipe._graphs) == 1 and not fake.released
    first = list(fake.graphs)
    plan.update(at=at, error=OOM)
    with caplog.at_level("WARNING"):
        assert call(h=4) is not None
    assert "trying again" in caplog.text and "runs eagerly" not in caplog.text, caplog.text
    assert len(calls) == at + 5  # the failed try, then the retry's warm-up step and 4 captured steps
    assert [k[0] for k in pipe._graphs] == [(1, 16, 2, 4, 6)] and not pipe._graph_skip and pipe.use_cuda_graph
    assert len(fake.released) == 1 and not any(fake.released[0])  # the evicted set and the failed try: freed
    gc.collect()
    assert all(r() is None for r in first)
    assert call(h=4) is not None and calls == []  # captured: replays
    plan.update(at=None)
    assert call(h=6) is not None and len(calls) == 5  # the evicted shape captures again when used


def test_out_of_memory_twice_keeps_the_shape_eager(monkeypatch, caplog):
    """The retry out of memory too: the shape runs eagerly and is skipped from then on (graphs stay on)."""
    fake, pipe, call, calls, plan = _graph_case(monkeypatch)
    assert call(h=6) is not None
    plan.update(at=_At(3, 6), error=OOM)  # the first try's capture of step 2, then the retry's
    with caplog.at_level("WARNING"):
        assert call(h=4) is None
    assert "trying again" in caplog.text and "this shape runs eagerly" in caplog.text, caplog.text
    assert "denoising step 2" in caplog.text, caplog.text
    assert len(calls) == 6 and not pipe._graphs and len(pipe._graph_skip) == 1 and pipe.use_cuda_graph
    assert fake.released and not any(fake.released[-1]), fake.released
    assert call(h=4) is None and calls == []  # not tried again


def test_out_of_memory_without_cached_sets_is_not_retried(monkeypatch):
    fake, pipe, call, calls, plan = _graph_case(monkeypatch)
    plan.update(at=3, error=OOM)
    assert call(h=4) is None and len(calls) == 3 and len(pipe._graph_skip) == 1


def test_skipped_shapes_are_bounded(monkeypatch):
    """The skip set keeps the newest MAX_GRAPH_SKIP keys (a server taking many sizes grew it without end);
    a forgotten shape is tried again."""
    fake, pipe, call, calls, plan = _graph_case(monkeypatch)
    assert pipeline_mod.MAX_GRAPH_SKIP == 64
    n = 4
    monkeypatch.setattr(pipeline_mod, "MAX_GRAPH_SKIP", n)  # (each shape tried costs an eager run)
    plan.update(at=1, error=OOM)  # every new shape's warm-up step runs out of memory
    for h in range(2, 2 + n + 2):
        assert call(h=h) is None and len(calls) == 1
    assert len(pipe._graph_skip) == n
    assert [k[0][3] for k in pipe._graph_skip] == list(range(4, 2 + n + 2))  # the two oldest forgotten
    assert call(h=2 + n + 1) is None and calls == []  # a remembered one is not tried
    assert call(h=2) is None and len(calls) == 1  # a forgotten one is
    assert len(pipe._graph_skip) == n


def test_shapes_that_do_not_fit_together_do_not_evict_each_other_in_turn(monkeypatch, caplog):
    """A second shape captured by evicting the first; the first asked for again, its capture out of memory
    beside the second's set: it stays eager (its warm-up step fitted) instead of evicting the second in turn -
    alternating requests re-captured at every call (a warm-up step and a capture each). A warm-up step out
    of memory still drops the sets (the eager run needs that memory)."""
    fake, pipe, call, calls, plan = _graph_case(monkeypatch)
    assert call(h=6) is not None
    plan.update(at=3, error=OOM)
    assert call(h=4) is not None and len(calls) == 8  # evicted h=6, captured on the retry
    plan.update(at=3)
    caplog.clear()
    with caplog.at_level("WARNING"):
        assert call(h=6) is None
    assert "trying again" not in caplog.text and "this shape runs eagerly" in caplog.text, caplog.text
    assert len(calls) == 3 and [k[0][3] for k in pipe._graphs] == [4]
    assert [k[0][3] for k in pipe._graph_skip] == [6]
    plan.update(at=None)
    for _ in range(2):  # alternating: the second shape replays, the first runs eagerly, nothing captured
        assert call(h=4) is not None and calls == []
        assert call(h=6) is None and calls == []
    plan.update(at=1)  # a third shape's warm-up step out of memory: the evicting set goes all the same
    with caplog.at_level("WARNING"):
        assert call(h=8) is not None
    assert [k[0][3] for k in pipe._graphs] == [8] and pipe._graphs[next(iter(pipe._graphs))].evicted_others


@pytest.mark.parametrize("per_use", [False, True], ids=["resident", "unload_modules"])
def test_relative_request_lora_is_also_looked_for_in_the_model_folder(t2v_folder, tmp_path, monkeypatch, per_use):
    """A relative request LoRA path not found from the working directory is looked for in Pipeline.load's
    model folder, as the config's LoRAs are (it was an error: only the working directory was searched);
    the error for a file in neither names both places."""
    import shutil
    t2v_folder = Path(shutil.copytree(t2v_folder, tmp_path / "model"))  # (the module's folder stays as it was)
    pipe = Pipeline.load(t2v_folder, {**TINY, **({"unload_modules": True} if per_use else {})}, device="cpu")
    model = pipe.dit_meta() if per_use else pipe.dit
    name = f"request_{'per_use' if per_use else 'resident'}.safetensors"
    write_lora(t2v_folder / name, model, seed=1)
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")  # (not the model folder)
    calls = count_merges(monkeypatch)
    pipe.set_request_loras([LoraSpec(name, 1.0)])
    assert len(calls) == 1
    if per_use:
        assert [s.path for s in pipe._request_loras] == [str((t2v_folder / name).resolve())]
    with pytest.raises(FileNotFoundError) as e:
        pipe.set_request_loras([LoraSpec("absent.safetensors", 1.0)])
    assert "'absent.safetensors'" in str(e.value) and str(t2v_folder / "absent.safetensors") in str(e.value)
