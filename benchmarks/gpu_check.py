"""The prepared GPU check: SFT, GRPO and batched inference of the gemma-3-4b configuration in one run, one JSON.

Two steps, because the GPU image has torch + transformers but not the geo stack (nor, without the
wheelhouse below, trl / peft / datasets):

1. here, with the full environment: write the inputs (generated 256 px tiles, conversations of both
   formats at the gpu profile's settings, the tiny model whose tokenizer the random 4B model uses)::

       .venv/bin/python benchmarks/gpu_check.py --prepare .gpu/inputs

2. on the GPU machine (random weights built from gemma-3-4b-it's config in bf16: no hub download)::

       python3 benchmarks/gpu_check.py --inputs .gpu/inputs --out $OUT

   or the same code path on this CPU with the tiny model (what tests/test_gpu_check.py runs)::

       .venv/bin/python benchmarks/gpu_check.py --inputs .gpu/inputs --out /tmp/gc --device cpu --model tiny

It measures, in one run, and writes ``<out>/gpu_check.json``:

- ``sft``: per format (MAgSeg 4x4 patches of 16x16 cells, Text4Seg 64x64 cells; R-RLE), TRL SFTTrainer +
  LoRA (models.lora_config), batch 8 x grad_accum 2 as in profiles/gpu.yaml, bf16 and gradient
  checkpointing for the 4B model: step time (median after 2 warm-up steps), tokens/s, peak memory, MFU;
- ``grpo``: TRL GRPOTrainer + LoRA on MAgSeg rows with the Dice + format rewards, batch 16 and 8
  generations per prompt as in the profile: step time, generation tokens/s, share of the step spent in
  ``generate``, peak memory;
- ``inference``: models.generate over ``--infer-tiles`` tiles (default 32) for both formats (MAgSeg: 16
  answers per tile), batch 32 as in the profile: tiles/s, answer tokens;
- ``accelerate_sft``: the MAgSeg SFT step again in a child ``accelerate launch --num_processes 1``.

MFU = model FLOPs per step / step time / the GPU's dense bf16 peak, with model FLOPs per step =
6 x (N_lm x T_lm + N_vis x T_vis): N_lm the language model's parameters without the embedding table,
T_lm the (padded) tokens per step, N_vis the vision tower's parameters, T_vis its patches per step
(images x (896/14)^2). 6 = forward 2 + backward 4, the usual convention; LoRA skips the weight
gradients of frozen layers (about -1/3) and gradient checkpointing recomputes the forward (+1/3), so
the hardware does roughly the same amount of work. Peaks: ``PEAK_BF16`` (dense, no sparsity) or
``--peak-tflops``.

Wheels + inputs for the GPU image, under the 64 MiB that travel: ``benchmarks/build_gpu_bundle.py``
(it prints the command to run there; see benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # gpu_train_bench beside this file
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # magseg_nb when run as a script

import gpu_train_bench as gtb  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

# the gpu profile's settings (profiles/gpu.yaml)
PROFILE = {
    "tile_size": 256,
    "patch_layout": 4,
    "magseg_grid": 16,
    "text4seg_grid": 64,
    "encoding": "rle",
    "variant": "crop",
    "sft_batch_size": 8,
    "sft_grad_accum": 2,
    "grpo_batch_size": 16,
    "num_generations": 8,
    "infer_batch_size": 32,
}
# dense bf16 tensor-core peaks (FLOP/s) from the vendors' data sheets (SXM parts)
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12, "L4": 121e12}
FORMATS = ("magseg", "text4seg")
# --device cpu: the same code path at a size 2 CPU cores finish in minutes (batch sizes, steps, lengths)
CPU_SIZES = {
    "sft_batch_size": 2,
    "sft_grad_accum": 1,
    "grpo_batch_size": 4,
    "num_generations": 4,
    "infer_batch_size": 16,
}
CPU_DEFAULTS = {
    "sft_steps": 3,
    "grpo_steps": 2,
    "infer_tiles": 1,
    "max_new_tokens": 64,
    "max_completion_length": 64,
}


# --- prepare (here, with the geo stack) ------------------------------------------------------------


def prepare(folder: Path, n_tiles: int = 32) -> dict:
    """Conversations (PNG tiles + JSONL) of both formats for them, and the tiny model folder."""
    from magseg_nb import models

    folder = Path(folder)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    tiles = gtb.bench_tiles(n_tiles, tile=PROFILE["tile_size"])
    data = gtb.write_data(
        folder / "data",
        tiles,
        PROFILE["text4seg_grid"],
        PROFILE["patch_layout"],
        PROFILE["encoding"],
        PROFILE["variant"],
    )
    tiny = Path(models.resolve_model("tiny-gemma3", folder / "build"))
    shutil.copytree(tiny, folder / "tiny-gemma3")
    shutil.rmtree(folder / "build")
    manifest = {
        "n_tiles": len(tiles),
        "profile": PROFILE,
        "conversations": {f: str(Path(p).relative_to(folder)) for f, p in data.items()},
        "tiny_model": "tiny-gemma3",
        "bytes": sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()),
    }
    (folder / "inputs.json").write_text(json.dumps(manifest, indent=2))
    return manifest


# --- measuring ------------------------------------------------------------------------------------


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def reset_peak():
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_memory_gib() -> float:
    """CUDA: max allocated since the last reset_peak; CPU: the process's peak resident size so far."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def param_counts(model) -> dict:
    """Parameters of the language model without its embedding table, and of the vision tower."""
    inner = model.model if hasattr(model, "model") else model
    lm = inner.language_model
    embed = lm.get_input_embeddings().weight.numel()
    return {
        "n_lm": sum(p.numel() for p in lm.parameters()) - embed,
        "n_embed": embed,
        "n_vision": sum(p.numel() for p in inner.vision_tower.parameters()),
        "n_total": sum(p.numel() for p in model.parameters()),
    }


def vision_patches(model) -> int:
    v = model.config.vision_config
    return (v.image_size // v.patch_size) ** 2


def device_peak(device: str, override_tflops: float | None) -> tuple[float | None, str]:
    if override_tflops:
        return override_tflops * 1e12, f"--peak-tflops {override_tflops}"
    if device != "cuda":
        return None, "no bf16 peak known for a CPU (pass --peak-tflops)"
    name = torch.cuda.get_device_name()
    for key, peak in PEAK_BF16.items():
        if key in name:
            return peak, f"{key} dense bf16 peak {peak / 1e12:.0f} TFLOP/s"
    return None, f"no bf16 peak known for {name} (pass --peak-tflops)"


def load_model(name: str, inputs: Path, device: str):
    """(model, processor, bf16, grad_ckpt) for 'tiny' or 'gemma3-4b' (random weights, real config)."""
    from magseg_nb import models

    tiny_dir = str(inputs / "tiny-gemma3")
    if name == "tiny":
        bf16 = device == "cuda"
        model, processor = models.load_model_and_processor(
            tiny_dir, dtype="bfloat16" if bf16 else "float32", device=device, trainable=True
        )
        return model, processor, bf16, False
    if name == "gemma3-4b":
        model, processor = gtb.gemma3_4b_random(tiny_dir, device)
        return model, processor, True, True
    raise ValueError(f"unknown model {name!r}: tiny or gemma3-4b")


def conversations(inputs: Path, fmt: str, limit: int | None = None):
    from magseg_nb import prompts

    manifest = json.loads((inputs / "inputs.json").read_text())
    return prompts.load_conversations(inputs / manifest["conversations"][fmt], limit=limit)


def sft_check(model_name, inputs, device, fmt, steps, peak, work) -> dict:
    model, processor, bf16, grad_ckpt = load_model(model_name, inputs, device)
    b, ga = PROFILE["sft_batch_size"], PROFILE["sft_grad_accum"]
    ds = conversations(inputs, fmt, limit=b * ga * steps)
    counts = param_counts(model)
    images_per_example = len(ds[0]["images"])
    reset_peak()
    res = gtb.run_one(model, processor, ds, steps, b, grad_ckpt, bf16, work / f"sft_{fmt}", grad_accum=ga)
    res["peak_mem_gib"] = peak_memory_gib()
    step_s, tokens = res["step_s_median"], res["tokens_per_step"]
    patches = b * ga * images_per_example * vision_patches(model)
    flops = 6 * (counts["n_lm"] * tokens + counts["n_vision"] * patches)
    out = {
        "format": fmt,
        "batch_size": b,
        "grad_accum": ga,
        "bf16": bf16,
        "gradient_checkpointing": grad_ckpt,
        "images_per_example": images_per_example,
        **counts,
        **res,
        "tokens_per_s": tokens / step_s,
        "model_flops_per_step": flops,
        "achieved_tflops": flops / step_s / 1e12,
        "mfu": flops / step_s / peak if peak else None,
    }
    del model
    reset_peak()
    return out


def time_generate(target, pad_id: int) -> dict:
    """Wrap ``target.generate`` to add up its wall time, calls and new non-pad tokens into the returned dict."""
    gen = {"s": 0.0, "tokens": 0, "calls": 0}
    original = target.generate

    def timed_generate(*a, **kw):
        sync()
        t0 = time.perf_counter()
        out = original(*a, **kw)
        sync()
        gen["s"] += time.perf_counter() - t0
        seqs = out.sequences if hasattr(out, "sequences") else out
        prompt_len = kw["input_ids"].shape[1] if "input_ids" in kw else 0
        gen["tokens"] += int((seqs[:, prompt_len:] != pad_id).sum())
        gen["calls"] += 1
        return out

    target.generate = timed_generate
    return gen


def grpo_check(model_name, inputs, device, steps, work, max_completion_length=None) -> dict:
    """GRPO steps with generation on MAgSeg rows; the time inside generate() is measured by wrapping it."""
    from trl import GRPOConfig, GRPOTrainer

    from magseg_nb import models, training

    model, processor, bf16, grad_ckpt = load_model(model_name, inputs, device)
    b, g = PROFILE["grpo_batch_size"], PROFILE["num_generations"]
    ds = conversations(inputs, "magseg", limit=max(4, b // g * steps))
    refs = [training.rewards.completion_text(c) for c in ds["completion"]]
    max_len = max_completion_length or training.answer_budget(processor, refs)
    funcs, weights = training.reward_functions({"dice": 1.0, "format": 0.2})
    timer = gtb.StepTimer()
    timer.times = []
    args = GRPOConfig(
        output_dir=str(work / "grpo"),
        per_device_train_batch_size=b,
        num_generations=g,
        max_completion_length=max_len,
        max_steps=steps,
        learning_rate=1e-5,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        bf16=bf16,
        use_cpu=device != "cuda",
        gradient_checkpointing=grad_ckpt,
        gradient_checkpointing_kwargs={"use_reentrant": False} if grad_ckpt else None,
        beta=0.0,
        reward_weights=weights,
        loss_type="dapo",
        use_vllm=False,
        log_completions=False,
        dataloader_num_workers=0,
        disable_tqdm=True,
        seed=0,
    )
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=funcs,
        args=args,
        train_dataset=training.grpo_dataset(ds),
        processing_class=processor,
        peft_config=models.lora_config(),
        callbacks=[timer],
    )
    gen = time_generate(trainer.model, processor.tokenizer.pad_token_id)
    reset_peak()
    t0 = time.perf_counter()
    trainer.train()
    total = time.perf_counter() - t0
    times = timer.times
    warm = times[1:] or times
    out = {
        "format": "magseg",
        "batch_size": b,
        "num_generations": g,
        "max_completion_length": max_len,
        "steps": len(times),
        "step_s_median": statistics.median(warm),
        "step_s_first": times[0],
        "train_s": total,
        "generate_calls": gen["calls"],
        "generate_s": gen["s"],
        "generated_tokens": gen["tokens"],
        "generation_tokens_per_s": gen["tokens"] / gen["s"] if gen["s"] else None,
        "generation_share": gen["s"] / sum(times) if times else None,
        "reward_last": next(
            (h["reward"] for h in reversed(trainer.state.log_history) if "reward" in h), None
        ),
        "peak_mem_gib": peak_memory_gib(),
        "bf16": bf16,
        "gradient_checkpointing": grad_ckpt,
    }
    del trainer, model
    reset_peak()
    return out


def inference_check(model_name, inputs, device, n_tiles, max_new_tokens=None) -> list[dict]:
    """models.generate over the first n_tiles tiles' conversations of each format (greedy, batch 32)."""
    from magseg_nb import models, training

    model, processor, _, _ = load_model(model_name, inputs, device)
    model.eval()
    rows = []
    for fmt in FORMATS:
        per_tile = PROFILE["patch_layout"] ** 2 if fmt == "magseg" else 1
        ds = conversations(inputs, fmt, limit=n_tiles * per_tile)
        refs = [training.rewards.completion_text(c) for c in ds["completion"]]
        budget = max_new_tokens or training.answer_budget(processor, refs)
        examples = [{"images": r["images"], "prompt": r["prompt"]} for r in ds]
        reset_peak()
        gen = time_generate(model, processor.tokenizer.pad_token_id)
        t0 = time.perf_counter()
        texts = models.generate(model, processor, examples, budget, batch_size=PROFILE["infer_batch_size"])
        sync()
        seconds = time.perf_counter() - t0
        del model.generate  # back to the class's method
        rows.append(
            {
                "format": fmt,
                "tiles": len(ds) // per_tile,
                "answers": len(texts),
                "max_new_tokens": budget,
                "seconds": seconds,
                "tiles_per_s": len(ds) / per_tile / seconds,
                "answer_tokens_total": gen["tokens"],  # new non-pad tokens generated
                "answer_tokens_mean": gen["tokens"] / len(texts),
                "answer_tokens_per_s": gen["tokens"] / seconds,
                "reference_tokens_mean": float(
                    np.mean(
                        [len(processor.tokenizer(r, add_special_tokens=False)["input_ids"]) for r in refs]
                    )
                ),
                "peak_mem_gib": peak_memory_gib(),
            }
        )
    del model
    reset_peak()
    return rows


def accelerate_sft(args, out: Path) -> dict:
    """The MAgSeg SFT check again in a child `accelerate launch --num_processes 1` (the launcher path)."""
    child_out = out / "accelerate_sft"
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--num_processes",
        "1",
        "--num_machines",
        "1",
        "--mixed_precision",
        "bf16" if args.device == "cuda" and args.model != "tiny" else "no",
        "--dynamo_backend",
        "no",
        *(["--cpu"] if args.device != "cuda" else []),
        str(Path(__file__).resolve()),
        "--inputs",
        str(args.inputs),
        "--out",
        str(child_out),
        "--device",
        args.device,
        "--model",
        args.model,
        "--sft-steps",
        str(args.sft_steps),
        "--only",
        "sft-magseg",
    ]
    if args.peak_tflops:
        cmd += ["--peak-tflops", str(args.peak_tflops)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.child_timeout)
    result = {"returncode": proc.returncode, "wall_s": time.perf_counter() - t0}
    child = child_out / "gpu_check.json"
    if proc.returncode == 0 and child.exists():
        data = json.loads(child.read_text())
        result.update(data["sft"][0])
        result["launcher"] = data["launcher"]
    else:
        result["error_tail"] = (proc.stdout + proc.stderr)[-2000:]
    return result


def environment(device: str) -> dict:
    import transformers

    env = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": sys.version.split()[0],
        "omp_threads": torch.get_num_threads(),
    }
    for name in ("trl", "peft", "accelerate", "datasets"):
        try:
            env[name] = __import__(name).__version__
        except ImportError:
            env[name] = None
    return env


def launcher_info() -> dict:
    from accelerate import PartialState

    state = PartialState()
    return {
        "distributed_type": str(state.distributed_type),
        "num_processes": state.num_processes,
        "launched_by_accelerate": "ACCELERATE_MIXED_PRECISION" in os.environ
        or "ACCELERATE_USE_CPU" in os.environ,
    }


def finite(obj) -> bool:
    """True when every number in a nested result is finite (None allowed)."""
    if isinstance(obj, dict):
        return all(finite(v) for v in obj.values())
    if isinstance(obj, list):
        return all(finite(v) for v in obj)
    if isinstance(obj, float):
        return math.isfinite(obj)
    return True


def check_packages() -> None:
    """Stop in one line, before any model loads, when the GPU side lacks a package (see build_gpu_bundle.py)."""
    import importlib.metadata as md

    missing = []
    for name in ("trl", "peft", "accelerate", "datasets", "pyarrow"):
        try:
            __import__(name)
        except ImportError as err:
            missing.append(f"{name} ({err})")
    if missing:
        raise SystemExit(
            f"gpu_check needs {', '.join(missing)}: install the bundle's wheels first "
            "(benchmarks/build_gpu_bundle.py prints the command; --pyarrow xz when the image lacks pyarrow)"
        )
    # datasets 5.2.0 needs pyarrow >= 24; an older one in the image fails later, deep inside TRL
    if int(md.version("pyarrow").split(".")[0]) < 24:
        raise SystemExit(f"pyarrow {md.version('pyarrow')} is too old for datasets (>= 24): use --pyarrow xz")


def run(args) -> dict:
    check_packages()
    inputs, out = Path(args.inputs), Path(args.out)
    if not (inputs / "inputs.json").exists():
        raise SystemExit(
            f"{inputs} holds no inputs.json: run `--prepare {inputs}` first (where the geo stack is)"
        )
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU here: use --device cpu --model tiny")
    if args.device == "cpu":
        PROFILE.update(CPU_SIZES)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    peak, peak_note = device_peak(args.device, args.peak_tflops)
    result: dict = {
        "environment": environment(args.device),
        "model": args.model,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "profile": PROFILE,
        "peak_flops": peak,
        "peak_note": peak_note,
        "mfu_formula": "6 * (N_lm * T_lm + N_vis * T_vis) / step_s / peak_bf16 (N_lm without the embedding "
        "table, T_lm padded tokens per step, T_vis vision patches per step)",
        "launcher": launcher_info(),
        "sft": [],
        "seconds": {},
    }
    path = out / "gpu_check.json"

    def save():  # partial results survive a time-out
        path.write_text(json.dumps(result, indent=2, default=str))

    parts = args.only.split(",") if args.only else ["sft", "grpo", "inference", "accelerate"]
    for part in parts:
        t0 = time.perf_counter()
        try:
            if part.startswith("sft"):
                fmts = FORMATS if part == "sft" else (part.split("-", 1)[1],)
                for fmt in fmts:
                    result["sft"].append(
                        sft_check(args.model, inputs, args.device, fmt, args.sft_steps, peak, work)
                    )
                    save()
            elif part == "grpo":
                result["grpo"] = grpo_check(
                    args.model, inputs, args.device, args.grpo_steps, work, args.max_completion_length
                )
            elif part == "inference":
                result["inference"] = inference_check(
                    args.model, inputs, args.device, args.infer_tiles, args.max_new_tokens
                )
            elif part == "accelerate":
                result["accelerate_sft"] = accelerate_sft(args, out)
            else:
                raise SystemExit(f"unknown part {part!r}")
        except torch.OutOfMemoryError as err:
            result.setdefault("errors", {})[part] = f"out of memory: {str(err)[:300]}"
        result["seconds"][part] = time.perf_counter() - t0
        print(f"[gpu_check] {part} done in {result['seconds'][part]:.1f} s", flush=True)
        save()
    shutil.rmtree(work, ignore_errors=True)
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--prepare", metavar="DIR", help="write the inputs into DIR and stop (needs the geo stack)"
    )
    ap.add_argument("--prepare-tiles", type=int, default=32)
    ap.add_argument("--inputs", default=".gpu/inputs")
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--model", default="gemma3-4b", choices=["gemma3-4b", "tiny"])
    ap.add_argument("--sft-steps", type=int, default=None, help="SFT steps per format (default 6; CPU 3)")
    ap.add_argument("--grpo-steps", type=int, default=None, help="default 3; CPU 2")
    ap.add_argument("--infer-tiles", type=int, default=None, help="default 32; CPU 1")
    ap.add_argument(
        "--max-new-tokens", type=int, default=None, help="inference budget (default: from references)"
    )
    ap.add_argument("--max-completion-length", type=int, default=None, help="GRPO (default: from references)")
    ap.add_argument(
        "--peak-tflops", type=float, default=None, help="bf16 peak for MFU (default: by GPU name)"
    )
    ap.add_argument(
        "--only", default="", help="comma list of sft, sft-magseg, sft-text4seg, grpo, inference, accelerate"
    )
    ap.add_argument("--child-timeout", type=int, default=300)
    ap.add_argument(
        "--write-random-model",
        metavar="DIR",
        help="save the random-weight gemma-3-4b (bf16, tiny tokenizer) as a from_pretrained folder for a "
        "profile's model_id (gpu-mini with random weights), then stop",
    )
    args = ap.parse_args(argv)
    if args.write_random_model:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        model, processor = gtb.gemma3_4b_random(str(Path(args.inputs) / "tiny-gemma3"), device)
        model.save_pretrained(args.write_random_model)
        processor.save_pretrained(args.write_random_model)
        print(f"wrote {args.write_random_model}")
        return 0
    defaults = CPU_DEFAULTS if args.device == "cpu" else {"sft_steps": 6, "grpo_steps": 3, "infer_tiles": 32}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.prepare:
        manifest = prepare(Path(args.prepare), args.prepare_tiles)
        print(json.dumps(manifest, indent=2))
        return 0
    result = run(args)
    print(
        json.dumps(
            {k: result[k] for k in ("sft", "grpo", "inference", "accelerate_sft") if k in result},
            indent=1,
            default=str,
        )
    )
    return 0 if finite(result) and "errors" not in result else 1


if __name__ == "__main__":
    raise SystemExit(main())
