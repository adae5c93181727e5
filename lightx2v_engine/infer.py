"""Command line, LightX2V-compatible: ``python -m lightx2v_engine.infer --model_cls wan2.1_distill --task t2v
--model_path MODEL --config_json CONFIG --prompt "..." --save_result_path out.mp4``.

Multi-GPU (a config with LightX2V's ``parallel`` section): ``torchrun --nproc_per_node=N -m lightx2v_engine.infer
...``; rank 0 writes the video.

``--random-weights --preset tiny`` runs the same graph with random weights and no download (the tiny preset
runs on a CPU in seconds; without a config it uses a 9-frame 64x96 video). Bad input exits with status 2
and a one-line reason; nothing partial is written.
"""
from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
import warnings
from pathlib import Path

import torch

from lightx2v_engine.parallel import rank_from_env, rank_prefix, world_size_from_env
from lightx2v_engine.config import TINY_SIZE
from lightx2v_engine.schedulers import MAX_SEED

REPO_CONFIGS = Path(__file__).resolve().parent.parent / "configs"
TINY_DEFAULTS = TINY_SIZE  # the tiny presets' video size where the config gives none
DEFAULT_OUTPUT = "output.mp4"  # --save_result_path's default


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lightx2v_engine.infer", description=__doc__.split("\n\n")[0])
    p.add_argument("--model_cls", default=None, choices=["wan2.1", "wan2.1_distill"],
                   help="wan2.1_distill: the 4-step distill sampler; wan2.1: Wan's UniPC sampler (infer_steps, CFG). "
                        "Default wan2.1_distill, except with a --config_json that sets infer_steps > 8 "
                        "and no denoising_step_list (a base-model config): then required, as always in LightX2V")
    p.add_argument("--task", default="t2v", choices=["t2v", "i2v"])
    p.add_argument("--model_path", default=None, help="Wan2.1 model folder")
    p.add_argument("--config_json", default=None, help="LightX2V JSON config")
    p.add_argument("--prompt", default=None)
    p.add_argument("--negative_prompt", default=None,
                   help="under CFG; default: the config's sample_neg_prompt, else empty (LightX2V's Wan runner "
                        "encodes \"\" without this flag and does not read sample_neg_prompt)")
    p.add_argument("--image_path", default=None, help="input image for i2v (\"\" counts as none, as LightX2V's default)")
    p.add_argument("--last_frame_path", default=None, help="LightX2V's FLF2V input: not supported (an error)")
    p.add_argument("--save_result_path", "--save_video_path", dest="save_result_path", default=DEFAULT_OUTPUT,
                   help="the video: .mp4 (or .m4v, .mov, .mkv); --save_video_path is older LightX2V's name")
    p.add_argument("--seed", type=int, default=None,
                   help="default 42, as LightX2V's (a config's \"seed\" is not used here either: a warning names it)")
    p.add_argument("--target_shape", type=int, nargs=2, metavar=("H", "W"), default=None)
    p.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), default=None,
                   help="--target_shape under the name of newer LightX2V configs' \"size\" key, in its order: height "
                        "first (not Wan's generate.py --size W*H)")
    p.add_argument("--num_frames", type=int, default=None, help="frame count (target_video_length), 4k+1")
    p.add_argument("--save_latents", default=None, metavar="PATH",
                   help="also write the final denoised latents [16, F, H/8, W/8] as safetensors")
    p.add_argument("--random-weights", "--random_weights", dest="random_weights", action="store_true",
                   help="random weights instead of a model folder (benchmarks, trying the engine)")
    p.add_argument("--preset", default=None, help="model preset for --random-weights (tiny, tiny-i2v, "
                   "wan2.1-t2v-1.3b, wan2.1-t2v-14b, wan2.1-i2v-14b-480p, wan2.1-i2v-14b-720p); with "
                   "--model_path, picks 480p/720p when the folder's config.json fits both")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--no-cuda-graph", "--no_cuda_graph", dest="no_cuda_graph", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no progress bar or timing table")
    # LightX2V's flags that have no work to do here (accepted so that its command lines run unchanged)
    p.add_argument("--warmup", action="store_true",
                   help="accepted for LightX2V compatibility; no effect here (LightX2V warms up torch.compile "
                        "shapes; this engine compiles nothing ahead and captures CUDA graphs on the first call)")
    p.add_argument("--return_result_tensor", action="store_true",
                   help="accepted for LightX2V compatibility; no effect on the CLI, which still writes "
                        "--save_result_path (in Python, Pipeline.generate always returns the frames and latents)")
    p.add_argument("--use_prompt_enhancer", action="store_true",
                   help="not supported: an error (LightX2V rewrites the prompt with a separate LLM; pass the "
                        "final prompt with --prompt)")
    return p


def run_config_from_args(args: argparse.Namespace):
    """The RunConfig the arguments describe: --config_json with --target_shape / --size / --num_frames /
    --no-cuda-graph (and the server's extra --key value pairs) as overrides; the tiny presets' small default
    size without a config."""
    from lightx2v_engine.config import load_run_config

    overrides = {}
    size = getattr(args, "size", None)
    if args.target_shape and size and list(args.target_shape) != list(size):
        raise ValueError(f"--target_shape {args.target_shape} and --size {size} disagree (the same setting)")
    shape = args.target_shape or size
    if shape:
        overrides.update(target_height=shape[0], target_width=shape[1])
    if getattr(args, "num_frames", None) is not None:
        overrides["target_video_length"] = args.num_frames
    if args.no_cuda_graph:
        overrides["use_cuda_graph"] = False
    overrides.update(getattr(args, "config_overrides", None) or {})  # the server's extra --key value pairs
    args.model_cls = resolve_model_cls(args.model_cls, args.config_json, overrides)
    tiny = args.random_weights and _preset(args).startswith("tiny")
    flags = {}  # config key -> the flag that set it, for the error messages
    if shape:
        flags["target_height"] = flags["target_width"] = "--target_shape" if args.target_shape else "--size"
    if "target_video_length" in overrides and getattr(args, "num_frames", None) is not None:
        flags["target_video_length"] = "--num_frames"
    try:
        run = load_run_config(args.config_json, overrides, model_cls=args.model_cls,
                              defaults=TINY_DEFAULTS if tiny else None)
    except ValueError as e:  # "config key 'target_height' = 65: ..." -> "--target_shape: height 65: ..."
        raise _name_flag(e, flags) from None
    return _parallel_if_torchrun(run)


def _name_flag(e: ValueError, flags: dict[str, str]) -> ValueError:
    """A config value error about a key the user set with a flag, reworded to name the flag."""
    msg = str(e)
    for key, flag in flags.items():
        prefix = f"config key {key!r} = "
        if msg.startswith(prefix):
            what = {"target_height": "height ", "target_width": "width "}.get(key, "")
            return ValueError(f"{flag} {what}{msg[len(prefix):]} (config key {key!r})")
    return e


def resolve_model_cls(model_cls: str | None, config_json: str | None, overrides: dict) -> str:
    """--model_cls, or its default: wan2.1_distill - except for a config file that sets infer_steps > 8 and
    names no distill sampler (no denoising_step_list, distill_method, the distill
    scheduler_type, this engine's sampler key): a base model's config (LightX2V's wan_t2v.json: 50 steps, CFG),
    which would otherwise run as a 50-step distill sampler without a word. Then the flag is required, as it
    always is in LightX2V."""
    if model_cls is not None:
        return model_cls
    if config_json is not None:
        from lightx2v_engine.config import _read_json_object
        raw = {**_read_json_object(Path(config_json), "config file"), **overrides}
        distill = any(k in raw for k in ("denoising_step_list", "distill_method", "sampler")) \
            or raw.get("scheduler_type") == "WanStepDistillScheduler"
        steps = raw.get("infer_steps")
        many = isinstance(steps, (int, float)) and not isinstance(steps, bool) and steps > 8
        if not distill and many:
            raise ValueError(f"--model_cls is required with {config_json}: it sets infer_steps {steps} and no "
                             f"denoising_step_list (a base model's config?); --model_cls wan2.1 runs Wan's UniPC "
                             f"sampler for its infer_steps, --model_cls wan2.1_distill the distill sampler "
                             f"(LightX2V always requires the flag)")
    return "wan2.1_distill"


def _preset(args: argparse.Namespace) -> str:
    return args.preset or ("tiny-i2v" if args.task == "i2v" else "tiny")


def load_pipeline(args: argparse.Namespace, run_cfg=None):
    """The Pipeline the arguments describe: --random-weights --preset, or --model_path (+ --config_json),
    under run_config_from_args(args) unless run_cfg is given (also used by the HTTP server)."""
    from lightx2v_engine.pipeline import Pipeline

    if run_cfg is None:
        run_cfg = run_config_from_args(args)
    elif args.model_cls is None:
        args.model_cls = resolve_model_cls(None, args.config_json, getattr(args, "config_overrides", None) or {})
    if args.random_weights:
        preset = _preset(args)
        if args.model_path is not None:  # (it was ignored: random weights where the user meant theirs)
            raise ValueError("--random-weights builds a model with random weights: drop --model_path, or drop "
                             "--random-weights to load the weights in --model_path")
        from lightx2v_engine.config import get_preset
        made_for = "i2v" if get_preset(preset).is_i2v else "t2v"
        if made_for != args.task:  # (checked before the build)
            hint = {("tiny", "i2v"): " (use --preset tiny-i2v)",
                    ("tiny-i2v", "t2v"): " (add --task i2v for image-to-video, or use --preset tiny)"}
            raise ValueError(f"--task {args.task} does not fit preset {preset!r} ({made_for})"
                             + hint.get((preset, args.task), ""))
        return Pipeline.random(preset, run_cfg, device=args.device)
    if args.model_path is None:
        raise ValueError("--model_path is required (or --random-weights --preset NAME)")
    return Pipeline.load(args.model_path, run_cfg, task=args.task, model_cls=args.model_cls, device=args.device,
                         preset=args.preset)


def _parallel_if_torchrun(run_cfg):
    """Started by torchrun as N > 1 processes: the config must have a parallel section (else every process
    would make and write the same video)."""
    n = world_size_from_env()
    if n > 1 and not run_cfg.parallel.enabled:
        raise ValueError(f"started as {n} processes (torchrun) but the config has no 'parallel' section: every "
                         f"process would make and write the same video; add e.g. \"parallel\": {{\"seq_p_size\": {n}, "
                         f"\"seq_p_attn_type\": \"ulysses\"}}, or run one process")
    return run_cfg


def run(args: argparse.Namespace) -> int:
    if args.use_prompt_enhancer:
        raise ValueError("--use_prompt_enhancer is not supported by lightx2v-engine (LightX2V's prompt enhancer "
                         "is a separate LLM); pass the final prompt with --prompt")
    if (args.prompt is None or not args.prompt.strip()) and args.task == "t2v":
        raise ValueError("--prompt is required for --task t2v and must not be empty (--task i2v takes none: "
                         "LightX2V's default prompt \"\")")
    args.prompt = args.prompt or ""
    args.image_path = args.image_path or None  # ("" is LightX2V's default: no image)
    if args.seed is not None and not 0 <= args.seed < MAX_SEED:
        raise ValueError(f"--seed {args.seed}: must be an integer in [0, 2^64)")
    if args.task == "i2v" and not args.image_path:
        raise ValueError("--image_path is required for --task i2v")
    if args.task == "t2v" and args.image_path:
        raise ValueError("--image_path is only for --task i2v")
    if args.last_frame_path:
        raise ValueError("--last_frame_path (LightX2V's first-last-frame task, flf2v) is not supported by "
                         "lightx2v-engine (Wan2.1 T2V and I2V)")
    if args.image_path and "," in args.image_path and not Path(args.image_path).is_file():
        raise ValueError(f"--image_path {args.image_path!r}: several comma-separated images are not supported "
                         f"(Wan2.1 I2V takes one image)")
    # the output paths, the encoder, the config and the image are checked before anything loads (not after
    # minutes of generation)
    from lightx2v_engine.video import atomic_path, check_output_file, check_video_file, save_latents
    if args.save_result_path is None:
        raise ValueError("--save_result_path is required (the video file to write, e.g. output.mp4)")
    writes = rank_from_env() == 0  # (ranks > 0 write nothing: their folders and ffmpeg do not matter; a check
    if writes:                      # failing on one node alone left the others waiting at the rendezvous)
        check_video_file(args.save_result_path, "--save_result_path")
    if args.save_latents is not None:
        if writes:
            check_output_file(args.save_latents, "--save_latents")
        if Path(args.save_latents).suffix != ".safetensors":  # (a safetensors file under a .pt name before)
            raise ValueError(f"--save_latents {args.save_latents!r}: the latents are written as safetensors; give "
                             f"a .safetensors file name")
        latents, video = Path(args.save_latents).resolve(), Path(args.save_result_path).resolve()
        if latents == video:
            raise ValueError("--save_latents and --save_result_path name the same file")
        if latents in video.parents or video in latents.parents:  # (the second written would fail after the run)
            raise ValueError(f"--save_latents {args.save_latents!r} and --save_result_path {args.save_result_path!r}: "
                             f"one lies inside the other (a file cannot also be a folder)")
    run_cfg = run_config_from_args(args)
    seed = args.seed
    if seed is None:
        seed = 42
        if run_cfg.seed != seed:
            warnings.warn(f"the config's \"seed\": {run_cfg.seed} is not used: the seed is --seed, default 42, as in "
                          f"LightX2V's command line (which ignores a config seed too); pass --seed {run_cfg.seed} "
                          f"for it")
    image = args.image_path
    if image:
        from lightx2v_engine.image import i2v_latent_size, load_image
        image = load_image(image)  # (decoded once: a missing or unreadable file is an error now)
        i2v_latent_size(image.shape[-2], image.shape[-1], run_cfg.target_height, run_cfg.target_width)
    pipe = load_pipeline(args, run_cfg)
    if not pipe.is_main:  # ranks > 0 compute their share and write nothing
        pipe.generate(args.prompt, negative_prompt=args.negative_prompt, image=image, seed=seed)
        return 0

    bar = None
    if not args.quiet:
        from tqdm import tqdm
        bar = tqdm(total=run_cfg.infer_steps, desc="denoise", unit="step", file=sys.stderr)

    def progress(i, n):
        if bar is not None:
            bar.update(1)

    try:
        out = pipe.generate(args.prompt, negative_prompt=args.negative_prompt, image=image, seed=seed,
                            progress=progress)
    finally:
        if bar is not None:
            bar.close()
    with out.timings.measure("save", pipe.device):
        if args.save_latents is None:
            path = out.save(args.save_result_path)
        else:  # both or neither: the latents move into place only once the video is written
            with atomic_path(args.save_latents, ".safetensors") as tmp:  # (written into it: a second temporary
                # file beside it had a name 52 bytes longer than check_output_file allows for)
                save_latents(out.latents, tmp, dict(prompt=args.prompt, seed=seed, task=args.task,
                                                    model=pipe.model_cfg.name), atomic=False)
                path = out.save(args.save_result_path)
    if not args.quiet:
        print(out.timings.table(out.peak_gpu_bytes), file=sys.stderr)
    print(json.dumps({"video": str(path), "frames": int(out.frames.shape[0]), "height": int(out.frames.shape[1]),
                      "width": int(out.frames.shape[2]), "latents": args.save_latents}))
    return 0


def user_errors() -> tuple[type[BaseException], ...]:
    """The errors a command line ends with as one "error: ..." line and exit code 2 (bad input, missing or
    corrupt files, NaN at run time), not a traceback: the CLI's and the server's start-up."""
    from lightx2v_engine.checkpoint import CheckpointError
    from lightx2v_engine.pipeline import NonFiniteError
    return ValueError, FileNotFoundError, CheckpointError, NonFiniteError, OSError


def main(argv=None) -> int:
    rc = _main(argv)
    if rc:  # (under torchrun: this rank leaves at once, so that its peers' collectives fail instead of waiting)
        from lightx2v_engine.parallel import mark_failed
        mark_failed()
    return rc


def _main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    quiet = args.quiet or rank_from_env() > 0  # under torchrun the other ranks log warnings and errors only
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO,
                        format=rank_prefix() + "%(levelname)s %(name)s: %(message)s")
    stopped, previous = [], None
    if threading.current_thread() is threading.main_thread():  # SIGTERM (kill, docker stop) ends like Ctrl-C:
        def terminate(signum, frame):  # the temporary output files are removed on the way out
            stopped.append(signum)
            raise KeyboardInterrupt
        previous = signal.signal(signal.SIGTERM, terminate)
    try:
        with warnings.catch_warnings():  # one "warning: ..." line each, like the "error: ..." lines
            warnings.simplefilter("default")
            warnings.showwarning = _show_warning
            return run(args)
    except KeyboardInterrupt:  # (a traceback from wherever it landed before)
        print(f"{rank_prefix()}interrupted{' (SIGTERM)' if stopped else ''}", file=sys.stderr)
        return 128 + (stopped[0] if stopped else signal.SIGINT)
    except torch.cuda.OutOfMemoryError as e:  # (first: rank 0's RankZeroOutOfMemory is a ValueError too)
        print(f"{rank_prefix()}error: out of GPU memory ({str(e).splitlines()[0]})", file=sys.stderr)
        return 3
    except user_errors() as e:  # (before RuntimeError: NonFiniteError is one)
        msg = str(e).replace("\n", " ")
        print(f"{rank_prefix()}error: {msg}", file=sys.stderr)
        return 2
    except (MemoryError, RuntimeError) as e:  # host memory: torch's CPU allocator raises a RuntimeError
        if not (isinstance(e, MemoryError) or "can't allocate memory" in str(e)):
            raise
        print(f"{rank_prefix()}error: out of host memory ({(str(e) or type(e).__name__).splitlines()[0]})",
              file=sys.stderr)
        return 3
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"{rank_prefix()}warning: {message}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
