"""One conversation per tile (multi-turn) and prefix-cached generation (tile_conversations)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest

from magseg_nb import inference, prompts, textgrid
from magseg_nb import tile_conversations as tc

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "pretrained" / "tiny-gemma3-proxy"


def _tile(seed=0, size=64):
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
    mask = rng.integers(0, 4, (size, size)).astype(np.uint8)
    return prompts.TileRecord(f"t{seed}", "s0", "train", image, mask)


@pytest.fixture(scope="module")
def tiny():
    from magseg_nb import models

    return models.load_model_and_processor(str(TINY), device="cpu")


# --- builder ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant, images", [("index", 1), ("crop", 1 + 4), ("mark", 1 + 4)])
def test_one_turn_per_patch_and_the_tile_image_once(variant, images):
    tile = _tile()
    conv = tc.tile_conversation(tile.image, 4, "rle", 2, variant, tile.semantic)
    msgs = conv["messages"]
    assert len(msgs) == 2 * 4
    assert [m["role"] for m in msgs] == ["user", "assistant"] * 4
    assert len(conv["images"]) == images
    n_placeholders = [sum(p["type"] == "image" for p in m["content"]) for m in msgs[::2]]
    extra = 0 if variant == "index" else 1
    assert n_placeholders == [1 + extra] + [extra] * 3  # the tile image only in the first turn
    assert sum(n_placeholders) == len(conv["images"])
    assert np.array_equal(np.asarray(conv["images"][0]), tile.image)


def test_questions_and_answers_equal_the_per_patch_conversations(tmp_path):
    tile = _tile(1)
    per_patch = prompts.conversation_rows(tile, tmp_path, "magseg", 4, "plain", 2, "crop")
    row = tc.tile_row(tile, tmp_path, 4, "plain", 2, "crop")
    users, answers = row["messages"][::2], row["messages"][1::2]
    assert len(answers) == len(per_patch) == 4
    for pp, u, a, gt in zip(per_patch, users, answers, row["gt_mask"], strict=True):
        assert a == pp["completion"][0]
        assert u["content"][-1] == pp["prompt"][0]["content"][-1]  # same question text
        assert gt == pp["gt_mask"]
        assert textgrid.decode(a["content"][0]["text"], (4, 4), "plain").mask.tolist() == gt
    # the second images are the per-patch crops, written once each
    assert row["image_paths"][0] == per_patch[0]["image_paths"][0]
    assert row["image_paths"][1:] == [pp["image_paths"][1] for pp in per_patch]
    assert all((tmp_path / p).exists() for p in row["image_paths"])


def test_write_tile_conversations_and_train_jsonl(tmp_path):
    tiles = [_tile(0), _tile(1), prompts.TileRecord("v0", "s0", "val", _tile(2).image, _tile(2).semantic)]
    paths = tc.write_tile_conversations(tiles, tmp_path, 4, "rle", 2, "index")
    assert list(paths) == ["train"]
    rows = [json.loads(line) for line in paths["train"].read_text().splitlines()]
    assert [r["tile_id"] for r in rows] == ["t0", "t1"]
    assert tc.train_jsonl(tmp_path, "magseg", "per_tile") == paths["train"]
    assert tc.train_jsonl(tmp_path, "magseg", "per_patch") == tmp_path / "magseg_train.jsonl"
    assert tc.train_jsonl(tmp_path, "text4seg", "per_tile") == tmp_path / "text4seg_train.jsonl"
    ds = prompts.load_conversations(paths["train"])
    assert len(ds[0]["images"]) == 1 and len(ds[0]["messages"]) == 8
    with pytest.raises(FileNotFoundError, match="conversation_layout: per_tile"):
        tc.train_jsonl(tmp_path / "nothing", "magseg", "per_tile")
    with pytest.raises(ValueError, match="unknown conversation_layout 'tiles'"):
        tc.train_jsonl(tmp_path, "magseg", "tiles")


# --- loss mask ----------------------------------------------------------------------------------------


def test_loss_is_on_every_answer_and_its_end_of_turn_only(tiny):
    _, processor = tiny
    tok = processor.tokenizer
    convs = [tc.tile_conversation(t.image, 4, "rle", 2, "crop", t.semantic) for t in (_tile(3), _tile(4))]
    convs[1]["messages"][-1]["content"][0]["text"] = "others *4"  # a shorter second row: padding
    batch = tc.MultiTurnCollator(processor)(convs)
    ids, labels = batch["input_ids"].numpy(), batch["labels"].numpy()
    eot = tok.convert_tokens_to_ids("<end_of_turn>")
    for b, conv in enumerate(convs):
        answers = [m["content"][0]["text"] for m in conv["messages"][1::2]]
        expected = []
        for a in answers:
            expected += tok(a, add_special_tokens=False)["input_ids"] + [eot]
        kept = labels[b][labels[b] != tc.IGNORE]
        assert kept.tolist() == expected
        on = labels[b] != tc.IGNORE
        assert np.array_equal(labels[b][on], ids[b][on])  # labels are the tokens themselves
        # every labelled run starts right after <start_of_turn>model\n and ends on <end_of_turn>
        starts = np.flatnonzero(on & ~np.r_[False, on[:-1]])
        ends = np.flatnonzero(on & ~np.r_[on[1:], False])
        marker = tc.answer_marker(tok)
        assert len(starts) == len(ends) == 4
        assert all(ids[b][s - len(marker) : s].tolist() == marker for s in starts)
        assert all(ids[b][e] == eot for e in ends)
        # no image token, no question token, no padding is labelled
        assert not on[batch["token_type_ids"][b].numpy() == 1].any()
        assert not on[batch["attention_mask"][b].numpy() == 0].any()
    assert (batch["attention_mask"][1] == 0).any()  # the shorter conversation was padded


def test_answer_labels_of_a_conversation_without_answers_are_all_ignored(tiny):
    _, processor = tiny
    conv = tc.tile_conversation(_tile().image, 4, "rle", 2, "index")
    assert len(conv["messages"]) == 4 and conv["gt_masks"] == []  # questions only
    text = processor.apply_chat_template(conv["messages"][:1], tokenize=False, add_generation_prompt=True)
    ids = processor(text=[text], images=[conv["images"]], return_tensors="pt")["input_ids"]
    assert (tc.answer_labels(ids.numpy(), processor.tokenizer) == tc.IGNORE).all()


def test_multi_turn_batch_trains(tiny):
    """A forward/backward pass on the collated batch gives a finite loss over the answer tokens."""
    import torch

    model, processor = tiny
    t = _tile(5)
    batch = tc.MultiTurnCollator(processor)([tc.tile_conversation(t.image, 4, "rle", 2, "index", t.semantic)])
    m = copy.deepcopy(model).train().requires_grad_(True)
    loss = m(**batch).loss
    loss.backward()
    assert torch.isfinite(loss) and 0 < loss.item() < 20
    assert m.lm_head.weight.grad is not None and m.lm_head.weight.grad.abs().sum() > 0


# --- prefix-cached generation -------------------------------------------------------------------------


def test_prefix_holds_whole_tile_image(tiny):
    _, processor = tiny
    tok = processor.tokenizer
    ex = prompts.make_example(_tile().image, "magseg", 4, "rle", (0, 1), 2, "crop")
    enc = tc._encode(processor, ex, "cpu")
    ids = enc["input_ids"][0].tolist()
    p = tc.prefix_length(ids, tok)
    assert ids[p - 1] == tok.convert_tokens_to_ids("<end_of_image>")
    tt = enc["token_type_ids"][0].tolist()
    assert sum(tt[:p]) == 64 and sum(tt[p:]) == 64  # the tile image in, the crop out
    with pytest.raises(ValueError, match="holds 2 images; the prefix needs 3"):
        tc.prefix_length(ids, tok, n_images=3)


@pytest.mark.parametrize("variant", ["index", "crop"])
def test_prefix_cached_generation_equals_plain_generation(tiny, variant):
    from magseg_nb import models

    model, processor = tiny
    spec = inference.FormatSpec("magseg", 4, 2, "rle", variant)
    examples = [ex for s in (6, 7) for ex in inference.tile_examples(_tile(s).image, spec)]
    plain = models.generate(model, processor, examples, max_new_tokens=30, batch_size=8)
    cached = tc.prefix_cached_generate(model, processor, examples, max_new_tokens=30, batch_size=3)
    assert len(cached) == 8 and all(cached)
    assert cached == plain


def test_cached_logits_equal_full_forward_and_depend_on_the_cached_image(tiny):
    """The continuation's logits from the prefix cache match a full forward pass (so the cache is
    used, not re-encoded), and a cache of another tile changes them."""
    import torch
    from transformers import DynamicCache

    model, processor = tiny
    tok = processor.tokenizer

    def cache_of(enc, p):
        cache = DynamicCache(config=model.config.get_text_config())
        with torch.inference_mode():
            model(
                input_ids=enc["input_ids"][:, :p],
                token_type_ids=enc["token_type_ids"][:, :p],
                pixel_values=enc["pixel_values"][:1],
                past_key_values=cache,
            )
        return cache

    encs = [
        tc._encode(
            processor, prompts.make_example(_tile(s).image, "magseg", 4, "rle", (1, 0), 2, "crop"), "cpu"
        )
        for s in (8, 9)
    ]
    enc = encs[0]
    p = tc.prefix_length(enc["input_ids"][0].tolist(), tok)
    with torch.inference_mode():
        full = model(**enc).logits[0, -1]

        def cont(cache):
            return model(
                input_ids=enc["input_ids"][:, p:],
                token_type_ids=enc["token_type_ids"],
                pixel_values=enc["pixel_values"][1:],
                past_key_values=cache,
                cache_position=torch.arange(p, enc["input_ids"].shape[1]),
            ).logits[0, -1]

        same = cont(cache_of(enc, p))
        other = cont(cache_of(encs[1], p))
    assert torch.allclose(same, full, atol=1e-4), (same - full).abs().max()
    assert (other - full).abs().max() > 1e-3


def test_prefix_cache_refuses_prompts_of_different_tiles(tiny):
    model, processor = tiny
    spec = inference.FormatSpec("magseg", 4, 2, "rle", "index")
    exs = (
        inference.tile_examples(_tile(0).image, spec)[:1] + inference.tile_examples(_tile(1).image, spec)[:1]
    )
    with pytest.raises(ValueError, match="same text and tile image"):
        tc.generate_prefix_cached(model, processor, exs, max_new_tokens=4)


def test_run_sft_trains_on_multi_turn_rows(tmp_path):
    """training.run_sft takes a magseg_tiles_train.jsonl: the multi-turn collator is used and the
    loss is logged (two LoRA steps on the tiny model)."""
    import pandas as pd

    from magseg_nb import training

    tiles = [_tile(10), _tile(11)]
    path = tc.write_tile_conversations(tiles, tmp_path / "02", 4, "rle", 2, "crop")["train"]
    res = training.run_sft(
        training.SFTSettings(
            base_model=str(TINY),
            train_jsonl=str(path),
            output_dir=str(tmp_path / "03"),
            max_steps=2,
            batch_size=2,
            logging_steps=1,
            warmup_steps=0,
            save_steps=2,
            eval_max_examples=0,
        )
    )
    assert res["steps"] == 2
    log = pd.read_csv(tmp_path / "03" / "log.csv")
    assert log["loss"].notna().sum() == 2 and (log["loss"].dropna() > 0).all()
    assert (tmp_path / "03" / "adapter" / "adapter_config.json").exists()
