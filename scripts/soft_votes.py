"""Experiment: vote the test-time views with the model's label probabilities instead of its labels.

Notebook 03 answers each validation prompt in four views and votes per cell on the decoded labels (a
tie keeps the plain view's). Here the same greedy answers are generated with the probability of each
class token at every cell (``models.generate(..., token_probs=...)``); each view's (rows, cols, class)
probabilities are turned back to the tile's frame and summed, and a cell takes the class with the
highest sum. Answers that do not hold one class token per cell fall back to their decoded labels (one-hot).
Both votes are scored like notebook 03 and paired per class against each other:

    OMP_NUM_THREADS=1 .venv/bin/python scripts/soft_votes.py --run-dir runs/demo \
        --adapter runs/demo/03_sft/magseg/adapter --out runs/exp/soft-votes

Writes only under --out (``hard/answers.jsonl``, ``soft/answers.jsonl``, ``soft_votes.json``).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from magseg_nb import files, inference, layout, models, prompts, rewards, textgrid, training, validation
from magseg_nb import views as views_mod
from magseg_nb.labels import CLASSES


def cell_probs(steps, shape, text: str, encoding: str, class_tokens) -> np.ndarray:
    """(rows, cols, classes) probabilities of one answer: the steps that wrote one of ``class_tokens``, in
    reading order, or the decoded labels one-hot when the answer does not hold exactly one per cell."""
    class_steps = [p for t, p in steps if t in class_tokens]
    if len(class_steps) == shape[0] * shape[1]:
        probs = np.asarray(class_steps, float)
        return (probs / probs.sum(1, keepdims=True)).reshape(*shape, len(CLASSES))
    mask = np.clip(textgrid.decode(text, shape=shape, encoding=encoding).mask, 0, len(CLASSES) - 1)
    return np.eye(len(CLASSES))[mask]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run-dir", type=Path, default=Path("runs/demo"))
    p.add_argument("--adapter", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--views", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--n-boot", type=int, default=1000)
    args = p.parse_args()
    run01, run02 = args.run_dir / "01_dataset_prep", args.run_dir / "02_instruction_format"
    val = run02 / "magseg_val.jsonl"
    ds = training.load_split(val)
    model, processor = models.load_model_and_processor(
        inference.adapter_base(args.adapter), adapter_dir=str(args.adapter)
    )
    model.eval()
    tok = processor.tokenizer
    ids = [tok(c, add_special_tokens=False)["input_ids"] for c in CLASSES]
    if any(len(i) != 1 for i in ids):
        raise SystemExit(f"a class name is not one token: {dict(zip(CLASSES, ids, strict=True))}")
    token_ids = [i[0] for i in ids]
    views = views_mod.view_ids(args.views)
    budget = training.answer_budget(processor, [rewards.completion_text(c) for c in ds["completion"]])
    t0 = time.perf_counter()
    texts, steps = [], []
    for v in views:
        examples = (
            [{"images": r["images"], "prompt": r["prompt"]} for r in ds]
            if v == 0
            else [views_mod.row_view_example(r["images"][0], *prompts.row_prompt(r), v) for r in ds]
        )
        t, s = models.generate(model, processor, examples, budget, args.batch_size, token_probs=token_ids)
        texts.append(t)
        steps.append(s)
        print(f"view {v}: {len(t)} answers, {time.perf_counter() - t0:.0f} s", flush=True)
    hard, soft = [], []
    for i, row in enumerate(ds):
        shape = np.asarray(row["gt_mask"]).shape
        enc = row["encoding"]
        mask, _ = views_mod.voted_answer([texts[k][i] for k in range(len(views))], views, shape, enc)
        valid = textgrid.decode(texts[0][i], shape=shape, encoding=enc).report.valid  # the plain answer's
        hard.append({"id": row["id"], "answer": textgrid.encode(mask, enc), "valid": valid})
        total = np.zeros((*shape, len(CLASSES)))
        for k, v in enumerate(views):
            seen = views_mod.view_shape(shape, v)
            total += views_mod.from_view(cell_probs(steps[k][i], seen, texts[k][i], enc, token_ids), v)
        soft.append({"id": row["id"], "answer": textgrid.encode(total.argmax(-1), enc), "valid": valid})
    for name, rows in (("hard", hard), ("soft", soft)):
        (args.out / name).mkdir(parents=True, exist_ok=True)
        files.write_text(args.out / name / layout.ANSWERS, "".join(json.dumps(r) + "\n" for r in rows))
    frames = {
        n: validation.answer_frames(val, args.out / n / layout.ANSWERS, run01) for n in ("hard", "soft")
    }
    for n, f in frames.items():
        table = validation.score_frames(f, args.n_boot, 0.95, 0)
        print(n, validation.wide(table.query("answers == 'all' and scorer == 'model'")).to_string())
    lines = validation.model_changes(
        frames["hard"], frames["soft"], "soft vote", "hard vote", args.n_boot, 0.95, 0
    )
    print("\n".join(lines))
    changed = sum(a["answer"] != b["answer"] for a, b in zip(hard, soft, strict=True))
    print(f"answers that the soft vote changed: {changed} of {len(ds)}")
    files.write_json(
        args.out / "soft_votes.json",
        {"changes": lines, "changed_answers": changed, "seconds": round(time.perf_counter() - t0, 1)},
    )


if __name__ == "__main__":
    main()
