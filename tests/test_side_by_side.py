"""Side-by-side SFT: when it applies, that each process trains what an in-process run trains, and errors."""

import json
import shutil

import numpy as np
import pytest

from magseg_nb import models, prompts, side_by_side, training
from magseg_nb.labels import CLASS_COLORS, CLASSES


def test_threads_each_splits_the_cores_only_where_it_applies():
    assert side_by_side.threads_each("auto", 2, cores=2, gpu=False) == 1
    assert side_by_side.threads_each("auto", 2, cores=8, gpu=False) == 4
    assert side_by_side.threads_each("auto", 3, cores=8, gpu=False) == 2
    assert side_by_side.threads_each("auto", 2, cores=8, gpu=True) == 0  # a GPU trains one run at a time
    assert side_by_side.threads_each(True, 2, cores=8, gpu=True) == 4
    assert side_by_side.threads_each("auto", 2, cores=1, gpu=False) == 0  # no core for the second run
    assert side_by_side.threads_each("auto", 1, cores=8, gpu=False) == 0  # one run: nothing to overlap
    assert side_by_side.threads_each(False, 2, cores=8, gpu=False) == 0
    with pytest.raises(ValueError, match="side_by_side must be true, false or 'auto', not 'yes'"):
        side_by_side.threads_each("yes", 2, cores=2, gpu=False)


def _convs(out):
    rng = np.random.default_rng(0)
    tiles = []
    for i in range(5):
        sem = np.kron(rng.integers(0, 4, (4, 4)), np.ones((16, 16), int)).astype(np.uint8)
        img = np.array([CLASS_COLORS[CLASSES[c]] for c in sem.ravel()]).reshape(64, 64, 3).astype(np.uint8)
        tiles.append(prompts.TileRecord(f"t{i}", "s0", "train" if i < 4 else "val", img, sem))
    prompts.write_conversations(tiles, out, "magseg", 4, "rle", 2, "mark")
    prompts.write_conversations(tiles, out, "text4seg", 8, "rle", 1)


@pytest.mark.slow
def test_side_by_side_trains_what_one_process_trains_and_names_a_failed_log(tmp_path, capsys):
    _convs(tmp_path)
    base = models.resolve_model("tiny-gemma3", tmp_path / "models")
    common = dict(base_model=str(base), max_steps=2, batch_size=2, save_steps=2, logging_steps=1)
    common.update(eval_max_examples=4, eval_batch_size=2, max_new_tokens=8)

    def plan(fmt, out):
        return training.SFTSettings(
            **common,
            train_jsonl=str(tmp_path / f"{fmt}_train.jsonl"),
            val_jsonl=str(tmp_path / f"{fmt}_val.jsonl"),
            output_dir=str(tmp_path / out / fmt),
        )

    runs = {fmt: plan(fmt, "sbs") for fmt in ("magseg", "text4seg")}
    import torch

    threads = torch.get_num_threads()
    seen = []
    for name in side_by_side.train_sft(runs, threads=1, helper_min_answers=1):
        seen.append((name, (tmp_path / "sbs" / name / training.DONE_FILE).exists(), torch.get_num_threads()))
    assert seen == [("magseg", True, 1), ("text4seg", True, 1)]  # each once trained; the caller scores with 1
    assert torch.get_num_threads() == threads
    printed = capsys.readouterr().out
    assert "training magseg, text4seg side by side, 1 thread(s) each" in printed
    assert "[text4seg] step 2/2:" in printed and "[magseg] step 2/2:" in printed
    for fmt, s in runs.items():
        done = json.loads((tmp_path / "sbs" / fmt / training.DONE_FILE).read_text())
        assert done["steps"] == 2 and done["torch_threads"] == 1
        assert done["settings_hash"] == training.settings_hash(s)  # run_sft will skip it and score it
        assert "step 2/2:" in (tmp_path / "sbs" / fmt / side_by_side.LOG_FILE).read_text()
        # each process scored its training; the caller reads the scores instead of computing them again
        ev = json.loads((tmp_path / "sbs" / fmt / "eval.json").read_text())
        assert ev["model"]["n"] == {"magseg": 4, "text4seg": 1}[fmt] and ev[
            "scoring_key"
        ] == training.scoring_key(s, done)
        stamp = (tmp_path / "sbs" / fmt / "eval.json").stat().st_mtime_ns
        assert training.run_sft(s)["eval"] == ev
        assert "scored these weights already; not scored again" in capsys.readouterr().out
        assert (tmp_path / "sbs" / fmt / "eval.json").stat().st_mtime_ns == stamp
    # The same training alone in one process (one thread, as the test sets it) gives the same weights.
    torch.set_num_threads(1)
    try:
        alone = training.run_sft(plan("magseg", "alone"))
    finally:
        torch.set_num_threads(threads)
    assert alone["steps"] == 2
    a = (tmp_path / "alone" / "magseg" / "adapter" / "adapter_model.safetensors").read_bytes()
    b = (tmp_path / "sbs" / "magseg" / "adapter" / "adapter_model.safetensors").read_bytes()
    assert a == b
    # and the answers it scored in its own process, the last two rows in a helper process of its own (one
    # batch of two each; a single row leaves nothing to hand on), are those of the in-process run
    assert (tmp_path / "sbs" / "magseg" / "scoring_helper.log").is_file()
    assert not (tmp_path / "sbs" / "text4seg" / "scoring_helper.log").exists()
    assert not (tmp_path / "alone" / "magseg" / "scoring_helper.log").exists()
    assert (tmp_path / "alone" / "magseg" / "answers.jsonl").read_bytes() == (
        tmp_path / "sbs" / "magseg" / "answers.jsonl"
    ).read_bytes()
    # A finished run is not started again; nor is one finished in `reuse` (a stage's previous output,
    # while the stage writes into an emptied folder of the same name): it is copied.
    assert list(side_by_side.train_sft(runs, threads=1)) == ["magseg", "text4seg"]
    assert "side by side" not in capsys.readouterr().out  # nothing started
    shutil.move(tmp_path / "sbs" / "magseg", tmp_path / "previous")
    assert list(side_by_side.train_sft(runs, threads=1, reuse={"magseg": tmp_path / "previous"})) == [
        "magseg",
        "text4seg",
    ]
    assert "side by side" not in capsys.readouterr().out
    assert (tmp_path / "sbs" / "magseg" / "adapter" / "adapter_model.safetensors").read_bytes() == b
    # A run that fails raises with its log; the other is stopped (a rerun resumes it).
    broken = plan("magseg", "broken")
    broken.train_jsonl = str(tmp_path / "missing.jsonl")
    with pytest.raises(
        RuntimeError, match=r"SFT of magseg failed \(exit 1\); its log is .*broken/magseg/train.log"
    ):
        list(side_by_side.train_sft({"magseg": broken, "text4seg": plan("text4seg", "broken")}, threads=1))
    assert not (tmp_path / "broken" / "magseg" / training.DONE_FILE).exists()
    assert torch.get_num_threads() == threads
