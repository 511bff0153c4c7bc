"""The pretrained tiny base shipped in pretrained/tiny-gemma3-proxy/: hashes, refusal, the build script, what it learned."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from magseg_nb import chain, files, models, pretraining, prompts, tiny_base, training

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "pretrained" / "tiny-gemma3-proxy"


@pytest.fixture(scope="module")
def proxy_rows(tmp_path_factory):
    """MAgSeg conversations of a small landscape with a seed the base never saw (2001)."""
    work = tmp_path_factory.mktemp("landscape")
    recipe = tiny_base.Recipe(seeds=[2001], difficulties=["demo"], countries=["cambodia"], scene_size=256)
    magseg_jsonl, _ = tiny_base.build_conversations(recipe, work, log=lambda *a: None)
    return magseg_jsonl


def test_shipped_hashes_verify_and_cover_every_file(tmp_path):
    assert models.resolve_model("tiny-gemma3-proxy", tmp_path) == str(SHIPPED)
    listed = {line.split()[1] for line in (SHIPPED / "SHA256SUMS").read_text().splitlines()}
    on_disk = {p.name for p in SHIPPED.iterdir()} - {"SHA256SUMS"}
    assert listed == on_disk
    assert {"config.json", "model.safetensors", "tokenizer.json", "tiny_spec.json", "RECIPE.json"} <= listed
    weights = (SHIPPED / "SHA256SUMS").read_text().split("  model.safetensors")[0].split("\n")[-1]
    assert files.sha256_file(SHIPPED / "model.safetensors") == weights
    assert not list(tmp_path.iterdir())  # nothing was built: the shipped folder is used as is
    assert sum(p.stat().st_size for p in SHIPPED.iterdir()) < 5_000_000


def test_shipped_recipe_and_registry_entry():
    recipe = json.loads((SHIPPED / "RECIPE.json").read_text())
    assert 0 not in recipe["recipe"]["seeds"] and len(recipe["recipe"]["seeds"]) >= 2
    assert len(set(recipe["recipe"]["difficulties"])) >= 2 and len(recipe["recipe"]["countries"]) >= 2
    assert recipe["recipe"]["lr_scheduler"] == "cosine"
    # pretrained at the demo's layout, on the proxy task this code builds
    demo02 = chain.load_profile("demo")["stages"]["02_instruction_format"]
    keys = ("patch_layout", "magseg_grid", "magseg_encoding", "text4seg_encoding")
    assert {k: recipe["recipe"][k] for k in keys} == {k: demo02[k] for k in keys}
    assert recipe["proxy_task"] == {
        "instruction": pretraining.PROXY_INSTRUCTION.strip(),
        "codes": pretraining.PROXY_CODES,
        "textured_std": pretraining.TEXTURED_STD,
    }
    assert recipe["steps_done"] == recipe["recipe"]["steps"] >= 1000
    assert recipe["command"].startswith("OMP_NUM_THREADS=1 .venv/bin/python scripts/build_tiny_base.py")
    for key in ("n_examples", "packages", "date", "wall_seconds", "machine"):
        assert recipe[key], key
    assert recipe["tiny_spec_hash"] == models.TinySpec().config_hash()
    info = models.model_info(str(SHIPPED))
    assert (info.model_id, info.kind, info.tiny) == ("tiny-gemma3-proxy", "tiny", models.TinySpec())
    assert models.model_info("tiny-gemma3-proxy").tiny == models.REGISTRY["tiny-gemma3"].tiny


def test_flipped_byte_is_refused_with_one_line(tmp_path, monkeypatch):
    copy = tmp_path / "tiny-gemma3-proxy"
    shutil.copytree(SHIPPED, copy)
    assert tiny_base.verify(copy) == copy
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(tiny_base.TinyBaseError) as err:
        tiny_base.verify(copy)
    msg = str(err.value)
    assert "\n" not in msg
    assert "model.safetensors does not match its SHA-256 in SHA256SUMS" in msg
    assert "scripts/build_tiny_base.py" in msg and str(copy) in msg
    # resolve_model refuses it the same way (registry entry pointed at the copy)
    info = dataclasses.replace(models.REGISTRY["tiny-gemma3-proxy"], pretrained=str(copy))
    monkeypatch.setitem(models.REGISTRY, "tiny-gemma3-proxy", info)
    with pytest.raises(tiny_base.TinyBaseError, match="model.safetensors does not match"):
        models.resolve_model("tiny-gemma3-proxy", tmp_path)
    weights.unlink()
    with pytest.raises(tiny_base.TinyBaseError, match="model.safetensors is missing; rebuild it with"):
        tiny_base.verify(copy)


def test_recipe_refuses_the_profiles_seed():
    with pytest.raises(ValueError, match="seed 0"):
        tiny_base.Recipe(seeds=[0], difficulties=["demo"])


def test_build_script_end_to_end(tmp_path):
    out = tmp_path / "base"
    cmd = [sys.executable, str(ROOT / "scripts" / "build_tiny_base.py"), "--out", str(out),
           "--work-dir", str(tmp_path / "work"), "--steps", "3", "--warmup-steps", "1", "--logging-steps", "1",
           "--seeds", "1001", "--difficulties", "hard", "--countries", "vietnam", "--scene-size", "256",
           "--shape", "vision_layers=3"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert tiny_base.verify(out) == out
    recipe = json.loads((out / "RECIPE.json").read_text())
    assert recipe["command"].endswith("--scene-size 256 --shape vision_layers=3")
    assert recipe["recipe"]["shape"] == {"vision_layers": 3} and recipe["tiny_spec"]["vision_layers"] == 3
    spec = models.TinySpec(vision_layers=3)
    assert recipe["tiny_spec_hash"] == spec.config_hash() != models.TinySpec().config_hash()
    assert recipe["recipe"]["seeds"] == [1001] and recipe["recipe"]["steps"] == 3 == recipe["steps_done"]
    assert recipe["recipe"]["learning_rate"] == 1e-3 and recipe["recipe"]["batch_size"] == 8
    assert recipe["recipe"]["lr_scheduler"] == "cosine"
    assert recipe["n_examples"] == sum(recipe["n_conversation_files"].values()) > 0
    assert set(recipe["packages"]) >= {"torch", "transformers", "trl", "peft"}
    assert recipe["machine"]["cores"] == os.cpu_count() and recipe["machine"]["omp_num_threads"] == "1"
    assert recipe["wall_seconds"]["total"] >= recipe["wall_seconds"]["train"] > 0 and recipe["date"]
    assert not (out / "checkpoints").exists() and not list(out.glob("*.csv"))
    model, processor = models.load_model_and_processor(str(out))
    assert model.config.text_config.hidden_size == models.TinySpec().hidden
    assert model.config.vision_config.num_hidden_layers == 3  # the shape asked for, not the registry's 2
    assert models.model_info(str(out)).tiny == models.TinySpec(vision_layers=3)
    assert len(processor.tokenizer) == model.config.text_config.vocab_size


def test_build_script_goes_on_from_a_base_with_the_majority_rule(tmp_path):
    out = tmp_path / "base"
    cmd = [sys.executable, str(ROOT / "scripts" / "build_tiny_base.py"), "--out", str(out),
           "--work-dir", str(tmp_path / "work"), "--steps", "2", "--warmup-steps", "1", "--logging-steps", "1",
           "--seeds", "1001", "--difficulties", "demo", "--countries", "india", "--scene-size", "256",
           "--proxy-rule", "majority", "--init-from", str(SHIPPED), "--lr", "3e-4"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    recipe = json.loads((out / "RECIPE.json").read_text())
    assert recipe["recipe"]["proxy_rule"] == "majority" and recipe["recipe"]["init_from"] == str(SHIPPED)
    assert recipe["proxy_task"]["rule"] == "majority"
    assert recipe["proxy_task"]["texture_window"] == pretraining.TEXTURE_WINDOW
    assert recipe["init_from_sha256"] == files.sha256_file(SHIPPED / "model.safetensors")
    assert recipe["steps_done"] == 2 and recipe["recipe"]["learning_rate"] == 3e-4
    # it went on from the shipped weights: changed by two small steps, not a new random model
    before, after = load_file(SHIPPED / "model.safetensors"), load_file(out / "model.safetensors")
    assert before.keys() == after.keys()
    moved = [np.abs(after[k] - before[k]).max() for k in before]
    assert 0 < max(moved) < 0.05


def test_recipe_refuses_an_unknown_rule_and_a_missing_start(tmp_path):
    with pytest.raises(ValueError, match="proxy rule 'median' is not one of"):
        tiny_base.Recipe(proxy_rule="median")
    for bad in ({"vision_depth": 4}, {"vision_layers": 0}, {"seed": 3}):
        with pytest.raises(ValueError, match=r"shape .*: give positive integers for fields among \['heads'"):
            tiny_base.Recipe(shape=bad)
    assert tiny_base.Recipe(shape={"vision_layers": 4}).spec() == models.TinySpec(vision_layers=4)
    assert tiny_base.Recipe().spec() == models.REGISTRY["tiny-gemma3"].tiny
    with pytest.raises(ValueError, match=f"init_from {tmp_path}: no config.json there"):
        tiny_base.Recipe(init_from=str(tmp_path))


def test_shipped_base_writes_colour_codes(proxy_rows):
    """Pretrained: greedy answers to unseen proxy prompts are code grids (a random base writes noise).

    Measured on the shipped base (4000 steps, plain 4x4 grids, 16 codes) on these 8 prompts: every answer
    a full 4x4 grid of code letters, agreeing with the true codes on 70 % of the cells (chance 1/16; the
    2000-step base, on 16 such prompts: 55 %; an older base with R-RLE answers: 37 %).
    """
    ds = prompts.load_conversations(proxy_rows, limit=8)
    proxy = [pretraining.proxy_example(row) for row in ds]
    model, processor = models.load_model_and_processor(models.resolve_model("tiny-gemma3-proxy", ROOT))
    answers = models.generate(model, processor, proxy, max_new_tokens=100, batch_size=8)
    truth = [tiny_base.decode_codes(p["completion"][0]["content"][0]["text"], 4) for p in proxy]
    assert all(t is not None and t.shape == (4, 4) for t in truth)
    cells = [c.strip() for a in answers for row in a.split("\n") for c in row.split("|")]
    assert np.mean([re.fullmatch(r"[a-p]", c) is not None for c in cells]) >= 0.95, answers  # plain grids
    got = [tiny_base.decode_codes(a, 4) for a in answers]
    full = [(g == t).mean() for g, t in zip(got, truth, strict=True) if g is not None]
    assert len(full) >= 6 and np.mean(full) > 0.35, (full, answers)


def test_lora_sft_runs_on_the_shipped_base(proxy_rows, tmp_path):
    base = models.resolve_model("tiny-gemma3-proxy", tmp_path)
    result = training.run_sft(
        training.SFTSettings(
            base_model=base,
            train_jsonl=str(proxy_rows),
            val_jsonl=str(proxy_rows),
            output_dir=str(tmp_path / "sft"),
            target_modules="all",
            train_embeddings=True,
            max_steps=2,
            batch_size=2,
            logging_steps=1,
            eval_max_examples=2,
            max_new_tokens=40,
        )  # fmt: skip
    )
    assert result["steps"] == 2
    cfg = json.loads((tmp_path / "sft" / "adapter" / "adapter_config.json").read_text())
    assert Path(cfg["base_model_name_or_path"]).name == "tiny-gemma3-proxy"
    model, _ = models.load_model_and_processor(base, adapter_dir=tmp_path / "sft" / "adapter")
    assert result["eval"]["model"]["n"] == 2


def _answer_nll(model, processor, ex) -> float:
    """Mean negative log-likelihood per token of the reference answer, given the prompt (teacher forcing)."""
    import torch

    prompt = processor.apply_chat_template(ex["prompt"], add_generation_prompt=True, tokenize=False)
    answer = ex["completion"][0]["content"][0]["text"]
    images = [list(ex["images"])]
    n_prompt = processor(text=[prompt], images=images, return_tensors="pt")["input_ids"].shape[1]
    inputs = processor(text=[prompt + answer], images=images, return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits[0, n_prompt - 1 : -1]
    targets = inputs["input_ids"][0, n_prompt:]
    return float(torch.nn.functional.cross_entropy(logits, targets))


def test_shipped_base_predicts_colour_codes_far_better_than_random(proxy_rows, tmp_path):
    ds = prompts.load_conversations(proxy_rows, limit=4)
    proxy = [pretraining.proxy_example(row) for row in ds]
    shipped = models.load_model_and_processor(models.resolve_model("tiny-gemma3-proxy", ROOT))
    random_base = models.load_model_and_processor(models.resolve_model("tiny-gemma3", tmp_path))
    nll_shipped = np.mean([_answer_nll(*shipped, ex) for ex in proxy])
    nll_random = np.mean([_answer_nll(*random_base, ex) for ex in proxy])
    assert nll_random > 5.0  # about ln(vocab): knows nothing
    assert nll_shipped < 1.0, nll_shipped


def test_decode_codes_reads_both_encodings_and_refuses_bad_grids():
    assert tiny_base.decode_codes("a|b|c|d\na|a|a|a\np|o|n|m\na|b|c|d", 4)[2].tolist() == [15, 14, 13, 12]
    assert tiny_base.decode_codes("a *2| b *2\nc *4\nd *4\ne *1| f *3", 4)[3].tolist() == [4, 5, 5, 5]
    assert tiny_base.decode_codes("a|b|c\na|a|a|a\np|o|n|m\na|b|c|d", 4) is None  # a short row
    assert tiny_base.decode_codes("a||c|d\na|a|a|a\np|o|n|m\na|b|c|d", 4) is None  # an empty cell
    assert tiny_base.decode_codes("q|b|c|d\na|a|a|a\np|o|n|m\na|b|c|d", 4) is None  # not a code
    assert tiny_base.decode_codes("a|b|c|d\na|a|a|a\np|o|n|m", 4) is None  # a missing row
