"""scripts/sft_experiment.py: its overrides and its refusal of a run folder that is not ready (the
training and scoring it calls are tested in test_training / test_validation)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from magseg_nb.labels import NODATA

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    """A script of scripts/ as a module."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _script():
    return _load("sft_experiment")


def test_overrides_are_read_as_yaml_values():
    script = _script()
    got = script.parse_overrides(["max_steps=2400", "learning_rate=1e-3", "bf16=false", "formats=[a, b]"])
    assert got == {"max_steps": 2400, "learning_rate": 0.001, "bf16": False, "formats": ["a", "b"]}
    with pytest.raises(SystemExit, match=r"--set 'max_steps': expected key=value"):
        script.parse_overrides(["max_steps"])


def test_a_run_without_stage_02_is_refused_before_any_training(tmp_path):
    script = _script()
    (tmp_path / "run" / "01_dataset_prep").mkdir(parents=True)
    (tmp_path / "run" / "01_dataset_prep" / "state.json").write_text("{}")
    with pytest.raises(
        SystemExit, match=r"02_instruction_format is not a finished stage: run `magseg-nb run"
    ):
        script.main(["--run-dir", str(tmp_path / "run"), "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


GT = [[1, 1, 1, 1], [1, 1, 2, 2], [1, 1, 2, 2], [1, 1, 1, 1]]  # 12 field cells, 4 tree cells


def test_pooled_reward_values_by_hand():
    script = _script()
    reward = script.pooled_dice_reward_for(np.array([0.25, 0.5, 0.125, 0.125]))  # weights 4, 2, 8, 8
    answers = {
        "field *4\nfield *2| tree *2\nfield *2| tree *2\nfield *4": 1.0,  # right: 1.5 * (12*2 + 4*8) = 84
        "field *4\nfield *4\nfield *4\nfield *4": 32 / 84,  # 1.5*2*12 - 0.5*2*4
        "tree *4\ntree *4\ntree *4\ntree *4": 0.0,  # 1.5*8*4 - 0.5*8*12
        "field *2| tree *2\nfield *2| tree *2\nfield *2| tree *2\nfield *2| tree *2": 56 / 84,
    }
    got = reward(completions=list(answers), gt_mask=[GT] * len(answers))
    assert got == pytest.approx(list(answers.values()))
    nodata = [row[:] for row in GT]
    nodata[0][0] = NODATA  # left out of both sums
    assert reward(completions=["tree *4\ntree *4\ntree *4\ntree *4"], gt_mask=[nodata]) == pytest.approx(
        [(48 - 0.5 * 8 * 11) / (1.5 * (11 * 2 + 32))]
    )
    with pytest.raises(ValueError, match="1 completions but 2 gt_mask values"):
        reward(completions=["field *4"], gt_mask=[GT, GT])


def test_class_shares_leave_nodata_out(tmp_path):
    script = _script()
    path = tmp_path / "train.jsonl"
    rows = [{"gt_mask": GT}, {"gt_mask": [[0, 3], [NODATA, 3]]}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert script.class_shares(path) == pytest.approx(np.array([1, 12, 4, 2]) / 19)


def test_freeze_saved_modules_stops_only_those_weights():
    import torch

    script = _script()
    model = torch.nn.Module()
    model.lora_A = torch.nn.Linear(3, 2)
    model.embed = torch.nn.Module()
    model.embed.modules_to_save = torch.nn.Linear(4, 5)
    assert script.freeze_saved_modules(model) == 4 * 5 + 5
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == ["lora_A.bias", "lora_A.weight"]


def _finished_02(tmp_path) -> Path:
    """A run folder whose stages 01 and 02 say they finished (no files: the refusals come first)."""
    run = tmp_path / "run"
    for stage in ("01_dataset_prep", "02_instruction_format"):
        (run / stage).mkdir(parents=True)
        (run / stage / "state.json").write_text("{}")
    return run


def test_grpo_variants_need_grpo_from(tmp_path):
    script = _script()
    run = _finished_02(tmp_path)
    with pytest.raises(SystemExit, match="GRPO variants: give --grpo-from ADAPTER"):
        script.main(["--run-dir", str(run), "--out", str(tmp_path / "out"), "--reward", "pooled"])
    assert not (tmp_path / "out").exists()


def test_score_only_refuses_grpo_from(tmp_path):
    script = _script()
    run = _finished_02(tmp_path)
    argv = ["--run-dir", str(run), "--out", str(tmp_path / "out"), "--score-only", "a", "--grpo-from", "b"]
    with pytest.raises(SystemExit, match="--score-only scores an adapter as it is: leave out --grpo-from"):
        script.main(argv)
    assert not (tmp_path / "out").exists()


def _headroom():
    return _load("grpo_headroom")


def test_headroom_picks_the_best_sample_and_counts_groups_without_a_gradient():
    """scripts/grpo_headroom.py: best of the first n samples (earlier on ties); groups of equal rewards."""
    h = _headroom()
    rewards = np.array([[0.5, 0.9, 0.9, 0.1], [0.7, 0.7, 0.7, 0.7], [0.2, 0.1, 0.3, 0.8]])
    assert h.best_of(rewards, 4).tolist() == [1, 0, 3]
    assert h.best_of(rewards, 2).tolist() == [1, 0, 0]
    assert h.all_equal_share(rewards, 4) == pytest.approx(1 / 3)
    assert h.all_equal_share(rewards[:, [1, 2]], 2) == pytest.approx(2 / 3)


def test_headroom_answer_rows_are_scored_like_evaluate():
    h = _headroom()
    gt = np.array([[1, 1], [2, NODATA]])
    row = h.answer_row("7", "field|field\ntree|tree", gt)
    assert row["id"] == "7" and row["valid"] and row["mean_dice"] == pytest.approx(1.0)
    bad = h.answer_row("8", "water|water\nwater|water", gt)
    assert bad["mean_dice"] == pytest.approx(0.0)


def test_headroom_compares_against_the_plain_view_greedy_answer(tmp_path):
    """Samples answer one view: the reference is each row's plain_answer (a four-view file keeps it), else answer."""
    import json

    h = _headroom()
    gts = [np.array([[1, 1], [2, 2]]), np.array([[3, 3], [3, 3]])]
    voted = {
        "id": "a",
        "answer": "field|field\ntree|tree",
        "plain_answer": "field|field\nfield|field",
        "views": 4,
    }
    one_view = {"id": "b", "answer": "water|water\nwater|water"}
    src = tmp_path / "answers.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in (voted, one_view)))
    out = h.plain_reference(src, tmp_path / "greedy" / "answers.jsonl", ["a", "b"], gts)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["answer"] for r in rows] == ["field|field\nfield|field", "water|water\nwater|water"]
    assert rows[0]["mean_dice"] == pytest.approx((2 * 2 / 6 + 0.0) / 2)  # field 2 of 4 written, tree missed
    assert rows[1]["mean_dice"] == pytest.approx(1.0)
    with pytest.raises(SystemExit, match="has no answer for 1 validation rows"):
        h.plain_reference(src, tmp_path / "other.jsonl", ["a", "b", "c"], gts + [gts[1]])
    assert not (tmp_path / "other.jsonl").exists()


def test_headroom_refuses_a_run_without_answers(tmp_path):
    with pytest.raises(SystemExit, match="not found: run notebooks 01-03"):
        _headroom().main(
            [
                "--run-dir",
                str(tmp_path),
                "--adapter",
                str(tmp_path / "a"),
                "--against",
                str(tmp_path / "b"),
                "--out",
                str(tmp_path / "o"),
            ]
        )
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_score_only_prints_the_paired_comparison_with_the_pixel_classifier(smoke_run, tmp_path):
    """The script's model-minus-classifier sentences are notebook 03's: validation.conclusions on the
    paired block comparison of the same answers."""
    from magseg_nb import validation

    adapter = smoke_run / "03_sft" / "magseg" / "adapter"
    out = tmp_path / "out"
    argv = ["--run-dir", str(smoke_run), "--out", str(out), "--model-id", "tiny-gemma3", "--score-only"]
    argv += [str(adapter), "--set", "eval_max_examples=4", "--set", "test_views=1", "--n-boot", "50"]
    summary = _script().main(argv)
    run02 = smoke_run / "02_instruction_format"
    frames = validation.answer_frames(
        run02 / "magseg_val.jsonl", out / "answers.jsonl", smoke_run / "01_dataset_prep"
    )
    assert len(frames[validation.MODEL]) == 4
    diff = validation.compare(frames[validation.PIXEL], frames[validation.MODEL], 50, 0.95, 0)
    expected = validation.conclusions({("this run", validation.PIXEL): diff})
    assert summary["vs_pixel"] == expected
    assert summary["vs_pixel"][0].startswith("**this run vs the pixel classifier baseline** (Dice B - A")
    assert json.loads((out / "experiment.json").read_text())["vs_pixel"] == expected


def test_sft_variant_patches_the_change_in_and_restores_it(tmp_path):
    from magseg_nb import models, training

    variant = _load("sft_variant")
    plain_config, plain_args = models.lora_config, training._common_args
    kw = dict(
        r=4, alpha=8, dropout=0.0, target_modules="language", train_projector=True, train_embeddings=True
    )
    s = training.SFTSettings(base_model="x", train_jsonl="y", output_dir=str(tmp_path))
    assert plain_args(s, tmp_path).get("adam_beta2") is None and plain_config(**kw).init_lora_weights is True
    with variant.patched(lora_init="pissa", adam_beta2=0.95):
        assert models.lora_config(**kw).init_lora_weights == "pissa"
        assert training._common_args(s, tmp_path)["adam_beta2"] == 0.95
        assert training._common_args(s, tmp_path)["learning_rate"] == s.learning_rate  # the rest unchanged
    assert (models.lora_config, training._common_args) == (plain_config, plain_args)
    with variant.patched(adam_beta2=0.9):
        assert models.lora_config is plain_config  # only what is named changes
    assert variant.trainer_arg("neftune_noise_alpha=5") == ("neftune_noise_alpha", 5)
    with variant.patched(trainer_args=dict([variant.trainer_arg("max_grad_norm=0.3")])):
        assert training._common_args(s, tmp_path)["max_grad_norm"] == 0.3
        assert "adam_beta2" not in training._common_args(s, tmp_path)
    for bad in ("max_grad_norm", "no_such_field=1"):
        with pytest.raises(
            SystemExit, match=f"--trainer-arg '{bad}' is not KEY=VALUE with a TrainingArguments"
        ):
            variant.trainer_arg(bad)
    (tmp_path / "adapter").mkdir()
    variant.drop_adapter(tmp_path, None)
    assert (tmp_path / "adapter").is_dir()  # a plain init's adapter loads on the base: kept
    variant.drop_adapter(tmp_path, "pissa")
    assert not (tmp_path / "adapter").exists()
    with pytest.raises(SystemExit, match="usage: sft_variant.py"):
        variant.main(["--adam-beta2", "0.95"])
    with pytest.raises(SystemExit, match="name a change"):
        variant.main(["--", "--run-dir", "x"])
    with pytest.raises(
        SystemExit, match="is not a finished stage"
    ):  # sft_experiment's own refusal, patched run
        variant.main(
            ["--adam-beta2", "0.95", "--", "--run-dir", str(tmp_path / "none"), "--out", str(tmp_path / "o")]
        )
    assert training._common_args is plain_args


def test_sft_variant_ema_averages_the_weights_and_puts_them_in(tmp_path):
    import torch
    from transformers import TrainerState

    from magseg_nb import training

    variant = _load("sft_variant")
    plain_fit = training.fit
    with variant.patched(ema=0.5):
        assert training.fit is not plain_fit
    assert training.fit is plain_fit
    model = torch.nn.Linear(1, 1, bias=False)
    frozen = torch.nn.Parameter(torch.zeros(1), requires_grad=False)
    model.register_parameter("frozen", frozen)
    ema, state = variant.EmaCallback(0.5), TrainerState()
    for step, w in enumerate([1.0, 3.0, 5.0], start=1):
        model.weight.data.fill_(w)
        state.global_step = step
        ema.on_step_end(None, state, None, model=model)
    # step 1 starts the average at 1; then d = min(0.5, (1 + step) / (10 + step)): 3/12 at step 2, 4/13 at 3
    expected = 4 / 13 * (3 / 12 * 1.0 + 9 / 12 * 3.0) + 9 / 13 * 5.0
    ema.on_train_end(None, state, None, model=model)
    assert model.weight.item() == pytest.approx(expected) and frozen.item() == 0.0  # only trained weights
