"""The tiny Gemma 3: built offline, cached, loaded back from its folder, generating; adapters; LoRA names."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("transformers")
pytest.importorskip("peft")

from magseg_nb import models, prompts, textgrid  # noqa: E402
from magseg_nb.labels import CLASSES  # noqa: E402
from magseg_nb.viz import formats as vf  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    cache = tmp_path_factory.mktemp("models")
    return models.resolve_model("tiny-gemma3", cache)


@pytest.fixture(scope="module")
def loaded(tiny):
    return models.load_model_and_processor(tiny)


def _image(seed, size=96):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8))


def test_resolve_builds_once_and_reuses(tiny):
    folder = models.Path(tiny)
    spec = models.REGISTRY["tiny-gemma3"].tiny
    assert folder.name == f"tiny-gemma3-{spec.config_hash()}"
    assert (folder / "config.json").exists() and (folder / "tiny_spec.json").exists()
    stamp = (folder / "config.json").stat().st_mtime_ns
    assert models.resolve_model("tiny-gemma3", folder.parent) == tiny
    assert (folder / "config.json").stat().st_mtime_ns == stamp  # reused, not rebuilt
    assert not list(folder.parent.glob(".*tmp"))


def test_resolve_hub_ids_and_errors(tmp_path):
    assert models.resolve_model("google/gemma-3-4b-it", tmp_path) == "google/gemma-3-4b-it"
    assert models.resolve_model(str(tmp_path), tmp_path) == str(tmp_path)
    with pytest.raises(ValueError, match="unknown model_id 'gemma'"):
        models.resolve_model("gemma", tmp_path)
    assert models.REGISTRY["google/gemma-3-12b-it"].image_tokens == 256


def test_config_hash_changes_with_spec():
    assert models.TinySpec().config_hash() != models.TinySpec(hidden=64).config_hash()
    with pytest.raises(ValueError, match="must be a square"):
        models.build_tiny("/nonexistent", models.TinySpec(mm_tokens=15))


def test_tokenizer_is_gemma_like(loaded):
    model, processor = loaded
    tok = processor.tokenizer
    assert type(tok).__name__.startswith("GemmaTokenizer")
    assert [tok.pad_token_id, tok.eos_token_id, tok.bos_token_id] == [0, 1, 2]
    assert tok.convert_tokens_to_ids("<end_of_turn>") in model.generation_config.eos_token_id
    # One label ~ one token, like the real Gemma tokenizer: a plain g x g grid is g*g labels + g*g-1 separators.
    mask = np.random.default_rng(0).integers(0, 4, (16, 16))
    assert len(tok(textgrid.encode(mask, "plain"), add_special_tokens=False).input_ids) == 511
    assert tok.convert_ids_to_tokens(tok("field *12| tree *4", add_special_tokens=False).input_ids) == [
        "field", "▁*", "1", "2", "|", "▁tree", "▁*", "4"
    ]  # fmt: skip


def test_prompt_has_image_tokens(loaded):
    model, processor = loaded
    ex = prompts.make_example(_image(0), "magseg", 8, "rle", (1, 0), 2, "crop")
    text = processor.apply_chat_template(ex["prompt"], add_generation_prompt=True, tokenize=False)
    assert text.startswith("<bos><start_of_turn>user\n") and text.endswith("<start_of_turn>model\n")
    enc = processor(text=[text], images=[ex["images"]], return_tensors="pt")
    n_image = int((enc["input_ids"] == model.config.image_token_index).sum())
    assert n_image == 2 * models.REGISTRY["tiny-gemma3"].image_tokens
    assert enc["pixel_values"].shape == (2, 3, 64, 64)


def test_projector_is_not_zero(loaded):
    model, _ = loaded
    assert float(model.model.multi_modal_projector.mm_input_projection_weight.detach().abs().sum()) > 0
    assert not any(p.requires_grad for p in model.parameters())  # trainable=False: frozen, eval mode
    assert not model.training


def test_generate_batched_matches_single(loaded):
    model, processor = loaded
    examples = [
        prompts.make_example(_image(1), "text4seg", 4, "plain"),
        prompts.make_example(_image(2), "magseg", 4, "rle", (0, 1), 2, "mark"),
        prompts.make_example(_image(3), "magseg", 4, "plain", (1, 1), 2, "index"),
    ]
    batched = models.generate(model, processor, examples, max_new_tokens=12, batch_size=3)
    single = [models.generate(model, processor, [ex], max_new_tokens=12)[0] for ex in examples]
    assert batched == single and len(batched) == 3
    assert all("<start_of_turn>" not in a and "user" not in a[:4] for a in batched)
    assert processor.tokenizer.padding_side == "right" or processor.tokenizer.padding_side == "left"


def test_a_batch_encodes_each_distinct_image_once_with_the_same_answers(loaded):
    model, processor = loaded
    tile = _image(4)  # four patch prompts of one tile: the tile and the patch's crop each
    examples = [
        prompts.make_example(tile, "magseg", 4, "plain", (r, c), 2, "crop") for r in (0, 1) for c in (0, 1)
    ]
    owner = next(m for m in model.modules() if "vision_tower" in m._modules)
    seen = []
    hook = owner.vision_tower.register_forward_pre_hook(
        lambda _m, args, kwargs: seen.append(len(kwargs.get("pixel_values", args[0] if args else None))),
        with_kwargs=True,
    )
    try:
        shared = models.generate(model, processor, examples, max_new_tokens=12, batch_size=4)
        every = models.generate(
            model, processor, examples, max_new_tokens=12, batch_size=4, share_images=False
        )
    finally:
        hook.remove()
    assert shared == every and len(shared) == 4
    assert seen == [5, 8]  # the tile once and four crops, then all eight images
    assert "get_image_features" not in vars(owner)  # the class's method again after generating


def test_shared_images_give_the_same_answers_in_bfloat16(tiny):
    """bf16 (the GPU's dtype) is compared bit for bit through an int16 view."""
    model, processor = models.load_model_and_processor(tiny, dtype="bfloat16", device="cpu")
    tile = _image(5)
    examples = [prompts.make_example(tile, "magseg", 4, "plain", (0, c), 2, "crop") for c in (0, 1)] * 2
    shared = models.generate(model, processor, examples, max_new_tokens=8, batch_size=4)
    assert shared == models.generate(
        model, processor, examples, max_new_tokens=8, batch_size=4, share_images=False
    )
    assert shared[:2] == shared[2:]  # the same prompt twice in one batch, the same answer


def test_generate_returns_the_probabilities_of_chosen_tokens_at_every_step(loaded):
    """``token_probs``: per answer, each generated token with the softmax probability of the given ids
    (scripts/soft_votes.py votes views with them); the answers are the greedy ones."""
    model, processor = loaded
    tok = processor.tokenizer
    examples = [prompts.make_example(_image(i), "magseg", 2, "plain", (0, 0), 2, "crop") for i in (4, 5)]
    plain = models.generate(model, processor, examples, max_new_tokens=6, batch_size=2)
    ids = [tok.convert_tokens_to_ids(c) for c in CLASSES]
    answers, steps = models.generate(
        model, processor, examples, max_new_tokens=6, batch_size=2, token_probs=ids
    )
    assert answers == plain and len(steps) == 2
    for answer, answer_steps in zip(answers, steps, strict=True):
        tokens = [t for t, _ in answer_steps]
        assert tok.decode(tokens, skip_special_tokens=True).strip() == answer
        assert 1 <= len(tokens) <= 6 and all(t != tok.pad_token_id for t in tokens)
        assert all(
            p.shape == (len(CLASSES),) and 0 <= p.min() and p.sum() <= 1 + 1e-5 for _, p in answer_steps
        )
    # Over the whole vocabulary the probabilities sum to 1 and the greedy token is the likeliest at every step.
    vocab = list(range(model.config.text_config.vocab_size))
    _, steps = models.generate(model, processor, examples, max_new_tokens=6, batch_size=2, token_probs=vocab)
    for t, p in (step for answer_steps in steps for step in answer_steps):
        assert p.sum() == pytest.approx(1, abs=1e-4) and int(p.argmax()) == t


def test_lora_config_exact_modules(tiny):
    from peft import get_peft_model

    model, _ = models.load_model_and_processor(tiny)
    peft_model = get_peft_model(model, models.lora_config(r=4, alpha=8))
    lora = {n for n, _ in peft_model.named_modules() if n.endswith("lora_A")}
    assert lora and all(".language_model." in n for n in lora)
    saved = {n for n, _ in peft_model.named_modules() if n.endswith("modules_to_save")}
    assert saved and all("multi_modal_projector" in n for n in saved)
    all_targets = get_peft_model(
        models.load_model_and_processor(tiny)[0], models.lora_config(target_modules="all")
    )
    assert any(".vision_tower." in n for n, _ in all_targets.named_modules() if n.endswith("lora_A"))
    assert models.lora_config(train_projector=False).modules_to_save is None


def _save_adapter(base, out):
    """A LoRA adapter whose B matrices are random (PEFT starts them at zero, a no-op adapter)."""
    import torch
    from peft import get_peft_model

    model, processor = models.load_model_and_processor(base)
    peft_model = get_peft_model(model, models.lora_config(r=4, alpha=8))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    peft_model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def _logits(model, processor, ex):
    import torch

    text = processor.apply_chat_template(ex["prompt"], add_generation_prompt=True, tokenize=False)
    inputs = processor(text=[text], images=[list(ex["images"])], return_tensors="pt")
    with torch.inference_mode():
        return model(**inputs).logits[0, -1]


def test_adapter_round_trip(tiny, tmp_path):
    from peft import PeftModel

    adapter = _save_adapter(tiny, tmp_path / "adapter")
    ex = [prompts.make_example(_image(4), "text4seg", 4, "plain")]
    # For inference the float32 adapter is merged into the weights: no PEFT wrapper, no LoRA layers.
    merged, processor = models.load_model_and_processor(tiny, adapter_dir=adapter)
    assert not isinstance(merged, PeftModel)
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    assert not any(p.requires_grad for p in merged.parameters())
    # ... and computes what the unmerged adapter computes, which differs from the bare base model.
    unmerged, _ = models.load_model_and_processor(tiny, adapter_dir=adapter, trainable=True)
    assert isinstance(unmerged, PeftModel) and any(p.requires_grad for p in unmerged.parameters())
    unmerged.eval()
    base, _ = models.load_model_and_processor(tiny)
    got, want = _logits(merged, processor, ex[0]), _logits(unmerged, processor, ex[0])
    assert float((got - want).abs().max()) < 1e-4
    assert float((_logits(base, processor, ex[0]) - want).abs().max()) > 1e-2
    assert models.generate(merged, processor, ex, max_new_tokens=5) == models.generate(
        unmerged, processor, ex, max_new_tokens=5
    )


def test_bf16_adapter_stays_unmerged(tiny, tmp_path):
    from peft import PeftModel

    adapter = _save_adapter(tiny, tmp_path / "adapter")
    model, _ = models.load_model_and_processor(tiny, adapter_dir=adapter, dtype="bfloat16", device="cpu")
    assert isinstance(model, PeftModel)
    assert any("lora_B" in n for n, _ in model.named_parameters())


def test_adapter_on_another_model_names_both(tiny, tmp_path):
    adapter = _save_adapter(tiny, tmp_path / "adapter")
    other = tmp_path / "tiny-gemma3-other"
    models.build_tiny(other, models.TinySpec(hidden=64, layers=2))
    with pytest.raises(models.AdapterMismatchError, match="tiny-gemma3-other") as err:
        models.load_model_and_processor(other, adapter_dir=adapter)
    assert models.Path(tiny).name in str(err.value)
    # Same folder name, other shapes: PEFT's own error is wrapped, still naming both.
    same_name = tmp_path / "copy" / models.Path(tiny).name
    shutil.copytree(other, same_name)
    with pytest.raises(models.AdapterMismatchError, match="does not fit base model"):
        models.load_model_and_processor(same_name, adapter_dir=adapter)


def test_missing_adapter_config(tiny, tmp_path):
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        models.load_model_and_processor(tiny, adapter_dir=tmp_path)


def test_model_info_from_folder(tiny):
    info = models.model_info(tiny)
    assert info.kind == "tiny" and info.image_tokens == 64
    assert json.loads((models.Path(tiny) / "tiny_spec.json").read_text())["hidden"] == 128
    assert models.model_info("google/gemma-3-4b-it").image_tokens == 256


def test_token_budget_measured_with_the_tiny_processor(loaded, tmp_path):
    _, processor = loaded
    rng = np.random.default_rng(0)
    semantic = np.kron(rng.integers(0, 4, (4, 4)), np.ones((16, 16))).astype(np.uint8)
    tiles = [
        prompts.TileRecord("t", "s", "train", rng.integers(0, 255, (64, 64, 3), dtype=np.uint8), semantic)
    ]
    settings = prompts.budget_settings([16, 64], [8])
    assert {(s["format"], s["effective"], s["patch_layout"]) for s in settings} == {
        ("text4seg", 16, 1), ("magseg", 16, 2), ("text4seg", 64, 1), ("magseg", 64, 8)
    }  # fmt: skip
    df = prompts.token_budget(processor, tiles, settings, image_tokens_real=256)
    t4s = df[(df["format"] == "text4seg") & (df["encoding"] == "plain") & (df["effective"] == 16)].iloc[0]
    assert t4s["answer_tokens_mean"] == 16 * 16 * 2 - 1 + 1  # labels + separators + <end_of_turn>
    assert t4s["image_tokens"] == 64 and t4s["gemma3_prompt_tokens"] == t4s["prompt_tokens"] - 64 + 256
    crop = df[(df["variant"] == "crop") & (df["encoding"] == "plain") & (df["effective"] == 64)].iloc[0]
    assert crop["conversations_per_tile"] == 64 and crop["images_per_conversation"] == 2
    assert crop["answer_tokens_mean"] == 8 * 8 * 2 and crop["image_tokens"] == 128
    assert crop["tile_tokens"] == round(64 * (crop["prompt_tokens"] + crop["answer_tokens_mean"]))
    fig = vf.plot_token_budget(df, variant="crop")
    fig.savefig(tmp_path / "budget.png")
    assert (tmp_path / "budget.png").stat().st_size > 1000


def test_processor_for_counting_falls_back_to_tiny(tiny):
    processor, note = models.processor_for_counting("google/gemma-3-4b-it", models.Path(tiny).parent)
    assert "tiny-gemma3 tokenizer" in note and "not on this machine" in note
    assert processor.tokenizer.convert_tokens_to_ids("<image_soft_token>") == 9
