"""Training cost of MAgSeg vs Text4Seg at the same effective output resolution: step time and peak GPU memory.

Trains, for a few LoRA SFT steps each (TRL SFTTrainer, the same LoRA settings as magseg_nb.training):
- ``tiny``: the tiny offline Gemma 3 of the demo;
- ``gemma3-4b-random``: a randomly initialised model with the real gemma-3-4b-it configuration
  (SigLIP 896 px / 256 image tokens, 34-layer 2560-wide LM, 262k vocabulary), built directly on the GPU in
  bf16 (no download). The tiny tokenizer is used; its ids all fall inside the real vocabulary, so the
  embedding keeps its real size (and memory).

Both formats describe a 256 px tile at ``--resolution`` cells per side (default 64): MAgSeg as
``patch_layout`` x ``patch_layout`` patches of ``resolution / patch_layout`` cells (one answer per patch, the
tile and a crop of the patch as images), Text4Seg as one ``resolution`` x ``resolution`` answer for the
whole tile. Masks come from the generated landscape, so run-length answers have realistic lengths.

Note that MAgSeg needs ``patch_layout**2`` answers per tile: the table also gives the time per tile.

    python benchmarks/gpu_train_bench.py --out $OUT              # on a CUDA GPU (~5 min on one H100)
    python benchmarks/gpu_train_bench.py --dry-run --out /tmp/b  # CPU, tiny model only, 2 steps, 16x16 cells
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from magseg_nb import models, prompts

# gemma-3-4b-it's published config.json (text and vision parts)
GEMMA3_4B_TEXT = dict(
    vocab_size=262208,
    hidden_size=2560,
    intermediate_size=10240,
    num_hidden_layers=34,
    num_attention_heads=8,
    num_key_value_heads=4,
    head_dim=256,
    query_pre_attn_scalar=256,
    sliding_window=1024,
    max_position_embeddings=131072,
    rope_scaling={"factor": 8.0, "rope_type": "linear"},
)
GEMMA3_4B_VISION = dict(
    hidden_size=1152,
    intermediate_size=4304,
    num_hidden_layers=27,
    num_attention_heads=16,
    image_size=896,
    patch_size=14,
    vision_use_head=False,
)


def gemma3_4b_random(tiny_dir: str, device: str):
    """(model, processor): the real 4B architecture with random bf16 weights and the tiny tokenizer."""
    from transformers import (
        AutoProcessor,
        Gemma3Config,
        Gemma3ForConditionalGeneration,
        Gemma3ImageProcessor,
        Gemma3Processor,
        Gemma3TextConfig,
        SiglipVisionConfig,
    )

    tiny = AutoProcessor.from_pretrained(tiny_dir)
    tok = tiny.tokenizer
    ids = {
        t: tok.convert_tokens_to_ids(t) for t in ("<start_of_image>", "<end_of_image>", "<image_soft_token>")
    }
    n_layers = GEMMA3_4B_TEXT["num_hidden_layers"]
    text = Gemma3TextConfig(
        **GEMMA3_4B_TEXT,
        layer_types=["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(n_layers)],
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
    )
    cfg = Gemma3Config(
        text_config=text,
        vision_config=SiglipVisionConfig(**GEMMA3_4B_VISION),
        mm_tokens_per_image=256,
        boi_token_index=ids["<start_of_image>"],
        eoi_token_index=ids["<end_of_image>"],
        image_token_index=ids["<image_soft_token>"],
    )
    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):  # initialise on the GPU: seconds instead of minutes on the CPU
            model = Gemma3ForConditionalGeneration(cfg)
    finally:
        torch.set_default_dtype(old)
    with torch.no_grad():
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(0.0, 0.02)
    model.generation_config.eos_token_id = [tok.eos_token_id, tok.convert_tokens_to_ids("<end_of_turn>")]
    processor = Gemma3Processor(
        image_processor=Gemma3ImageProcessor(size={"height": 896, "width": 896}),
        tokenizer=tok,
        chat_template=tiny.chat_template,
        image_seq_length=256,
    )
    return model, processor


def bench_tiles(n_tiles: int, tile: int = 256, seed: int = 0, npz: str = "") -> list[prompts.TileRecord]:
    """Tiles of a generated landscape scene with class ids (roads/buildings -> others).

    With ``npz`` the tiles come from a file written by ``--save-tiles`` (GPU images lack the geo stack).
    """
    if npz:
        data = np.load(npz)
        return [
            prompts.TileRecord(f"b{i}", "bench", "train", data["images"][i], data["masks"][i])
            for i in range(min(n_tiles, len(data["images"])))
        ]
    from magseg_nb import landscape  # needs rasterio/geopandas

    size = max(512, int(np.ceil(np.sqrt(n_tiles))) * tile)
    scene = landscape.generate_scene("bench", "vietnam", size=size, seed=seed)
    sem = np.where(scene.kind < 4, scene.kind, 0).astype(np.uint8)
    tiles = []
    for r in range(0, size - tile + 1, tile):
        for c in range(0, size - tile + 1, tile):
            img = scene.image[r : r + tile, c : c + tile]
            tiles.append(
                prompts.TileRecord(f"b{r}_{c}", "bench", "train", img, sem[r : r + tile, c : c + tile])
            )
    return tiles[:n_tiles]


def write_data(folder: Path, tiles, resolution: int, patch_layout: int, encoding: str, variant: str) -> dict:
    grid = resolution // patch_layout
    m = prompts.write_conversations(tiles, folder, "magseg", grid, encoding, patch_layout, variant)["train"]
    t = prompts.write_conversations(tiles, folder, "text4seg", resolution, encoding, 1)["train"]
    return {"magseg": m, "text4seg": t}


class StepTimer:
    """Wall time of every optimizer step (CUDA-synchronised)."""

    def __new__(cls):
        from transformers import TrainerCallback

        class Timer(TrainerCallback):
            times: list[float] = []

            def on_step_begin(self, args, state, control, **kw):
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                self.t0 = time.perf_counter()

            def on_step_end(self, args, state, control, **kw):
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                self.times.append(time.perf_counter() - self.t0)

        return Timer()


def run_one(
    model,
    processor,
    ds,
    steps: int,
    batch_size: int,
    grad_ckpt: bool,
    bf16: bool,
    workdir: Path,
    grad_accum: int = 1,
) -> dict:
    from trl import SFTConfig, SFTTrainer

    timer = StepTimer()
    timer.times = []
    args = SFTConfig(
        output_dir=str(workdir),
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=grad_accum,
        max_steps=steps,
        learning_rate=1e-4,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        max_length=None,
        completion_only_loss=True,
        bf16=bf16,
        use_cpu=not torch.cuda.is_available(),
        gradient_checkpointing=grad_ckpt,
        gradient_checkpointing_kwargs={"use_reentrant": False} if grad_ckpt else None,
        dataloader_num_workers=0,
        disable_tqdm=True,
        seed=0,
    )
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=ds.select_columns(["images", "prompt", "completion"]),
        processing_class=processor,
        peft_config=models.lora_config(),
        callbacks=[timer],
    )
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(min(batch_size, len(ds)))])
    seq_len = int(batch["input_ids"].shape[1])
    answer_tokens = float((batch["labels"] != -100).sum(1).float().mean())
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    trainer.train()
    total = time.perf_counter() - t0
    times = timer.times
    warm = times[2:] if len(times) > 3 else times[1:] or times
    out = {
        "steps": len(times),
        "step_s_median": statistics.median(warm),
        "step_s_first": times[0] if times else None,
        "train_s": total,
        "seq_len_first_batch": seq_len,
        "tokens_per_step": seq_len * batch_size * grad_accum,  # padded sequence x examples per step
        "answer_tokens_mean": answer_tokens,
        "loss_last": next((h["loss"] for h in reversed(trainer.state.log_history) if "loss" in h), None),
    }
    if torch.cuda.is_available():
        out["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    del trainer
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny model only, 2 steps (tests the script)")
    ap.add_argument("--models", default="tiny,gemma3-4b-random")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--resolution", type=int, default=64, help="effective cells per tile side")
    ap.add_argument("--patch-layout", type=int, default=4)
    ap.add_argument("--encoding", default="rle", choices=["rle", "plain"])
    ap.add_argument("--variant", default="crop", choices=["index", "mark", "crop"])
    ap.add_argument("--tiles", type=int, default=8)
    ap.add_argument(
        "--tiles-npz", default="", help="read the tiles from this file instead of generating them"
    )
    ap.add_argument("--save-tiles", default="", help="write the generated tiles to this .npz and stop")
    ap.add_argument("--no-grad-ckpt", action="store_true", help="no gradient checkpointing for the 4B model")
    args = ap.parse_args(argv)
    if args.save_tiles:
        tiles = bench_tiles(args.tiles)
        np.savez_compressed(
            args.save_tiles,
            images=np.stack([t.image for t in tiles]),
            masks=np.stack([t.semantic for t in tiles]),
        )
        print(f"wrote {len(tiles)} tiles to {args.save_tiles}")
        return 0
    cuda = torch.cuda.is_available()
    if args.dry_run:
        args.models, args.steps, args.tiles, args.batch_size = "tiny", 2, 1, 2
        args.resolution, args.patch_layout = 16, 2
    elif not cuda:
        ap.error("no CUDA GPU: use --dry-run on a CPU")
    device = "cuda" if cuda else "cpu"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gpu_train_bench_"))
    tiny_dir = models.resolve_model("tiny-gemma3", work / "models")
    data = write_data(
        work / "data",
        bench_tiles(args.tiles, npz=args.tiles_npz),
        args.resolution,
        args.patch_layout,
        args.encoding,
        args.variant,
    )
    rows = []
    for name in args.models.split(","):
        for fmt in ("magseg", "text4seg"):
            ds = prompts.load_conversations(data[fmt])
            t0 = time.perf_counter()
            if name == "tiny":
                model, processor = models.load_model_and_processor(
                    tiny_dir, dtype="bfloat16" if cuda else "float32", device=device, trainable=True
                )
                grad_ckpt, bf16 = False, cuda
            elif name == "gemma3-4b-random":
                model, processor = gemma3_4b_random(tiny_dir, device)
                grad_ckpt, bf16 = not args.no_grad_ckpt, True
            else:
                ap.error(f"unknown model {name!r}; use tiny and/or gemma3-4b-random")
            build_s = time.perf_counter() - t0
            print(f"[{name} / {fmt}] built in {build_s:.1f} s; {len(ds)} conversations", flush=True)
            try:
                res = run_one(
                    model, processor, ds, args.steps, args.batch_size, grad_ckpt, bf16, work / "ckpt"
                )
                status = "ok"
            except torch.OutOfMemoryError as err:
                res, status = {}, f"out of memory: {str(err)[:200]}"
            answers_per_tile = args.patch_layout**2 if fmt == "magseg" else 1
            row = {
                "model": name,
                "format": fmt,
                "status": status,
                "device": torch.cuda.get_device_name() if cuda else "cpu",
                "grid_per_answer": args.resolution // args.patch_layout
                if fmt == "magseg"
                else args.resolution,
                "effective_resolution": args.resolution,
                "answers_per_tile": answers_per_tile,
                "batch_size": args.batch_size,
                "grad_ckpt": grad_ckpt,
                "build_s": build_s,
                **res,
            }
            if "step_s_median" in res:
                row["train_s_per_tile"] = res["step_s_median"] / args.batch_size * answers_per_tile
            rows.append(row)
            print(json.dumps(row), flush=True)
            del model
            if cuda:
                torch.cuda.empty_cache()
            # the partial results survive a time-out
            (out / "gpu_train_bench.json").write_text(
                json.dumps({"args": vars(args), "rows": rows}, indent=2)
            )
    cols = [
        "model",
        "format",
        "grid_per_answer",
        "answers_per_tile",
        "seq_len_first_batch",
        "answer_tokens_mean",
        "step_s_median",
        "train_s_per_tile",
        "peak_mem_gib",
        "status",
    ]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append(
            "| "
            + " | ".join(
                f"{r.get(c):.3g}" if isinstance(r.get(c), float) else str(r.get(c, "")) for c in cols
            )
            + " |"
        )
    table = "\n".join(lines)
    (out / "gpu_train_bench.md").write_text(
        f"# Training step time and peak GPU memory, MAgSeg vs Text4Seg ({args.resolution}x{args.resolution} "
        f"cells per tile, {args.encoding}, batch {args.batch_size})\n\n{table}\n"
    )
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
