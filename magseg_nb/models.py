"""Model registry, the tiny offline Gemma 3, loading (with adapters), batched generation, LoRA settings.

Every model loads through ``from_pretrained(path_or_id)``: the tiny model is built once into a folder
(``<run_dir>/models/tiny-gemma3-<hash>/``) that looks exactly like a hub checkpoint, so the rest of the
chain does not care which model it runs.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from magseg_nb import prompts, textgrid
from magseg_nb.labels import CLASSES

# Same first ids as the real Gemma tokenizer (pad 0, eos 1, bos 2, unk 3, mask 4), then the turn and image markers.
SPECIAL_TOKENS = (
    "<pad>",
    "<eos>",
    "<bos>",
    "<unk>",
    "<mask>",
    "<start_of_turn>",
    "<end_of_turn>",
    "<start_of_image>",
    "<end_of_image>",
    "<image_soft_token>",
)
TOKENIZER_VERSION = 2  # bump when the corpus or the tokenizer pipeline changes (changes the cache hash)


@dataclass(frozen=True)
class TinySpec:
    """Shape of the tiny Gemma 3 (defaults: trains for minutes on 2 CPU cores)."""

    image_size: int = 64  # real gemma-3: 896
    # real: 14. 4 here: each vision patch is 2 x 2 pixels of the close-up, pooled to mm_tokens after the
    # vision layers, so a token carries a count of classified pixels (with 8: demo mean Dice 0.029 lower;
    # docs/experiments.md)
    patch_size: int = 4
    mm_tokens: int = (
        64  # image tokens per image; a square whose side divides image_size/patch_size (real: 256)
    )
    hidden: int = 128
    layers: int = 4
    heads: int = 2
    vision_hidden: int = 128
    vision_layers: int = 2
    vocab_size: int = 1024
    seed: int = 0

    def config_hash(self) -> str:
        key = json.dumps({**asdict(self), "tokenizer": TOKENIZER_VERSION}, sort_keys=True)
        return hashlib.sha256(key.encode()).hexdigest()[:8]


@dataclass(frozen=True)
class ModelInfo:
    model_id: str
    kind: str  # "tiny" (built here) or "hub"
    image_size: int
    image_tokens: int  # soft tokens per image in the prompt
    notes: str = ""
    tiny: TinySpec | None = field(default=None)
    pretrained: str = ""  # repo-relative folder of a shipped, SHA-256-checked checkpoint (tiny kind)


REGISTRY: dict[str, ModelInfo] = {
    "tiny-gemma3": ModelInfo(
        "tiny-gemma3",
        "tiny",
        TinySpec().image_size,
        TinySpec().mm_tokens,
        "random ~1 M-parameter Gemma 3 built offline; tokenizer trained on the prompts and label grids",
        TinySpec(),
    ),
    "tiny-gemma3-proxy": ModelInfo(
        "tiny-gemma3-proxy",
        "tiny",
        TinySpec().image_size,
        TinySpec().mm_tokens,
        "tiny-gemma3 after label-free proxy pretraining on generated landscapes (seeds 1001+), shipped in "
        "pretrained/tiny-gemma3-proxy/ with RECIPE.json and SHA256SUMS; rebuild: scripts/build_tiny_base.py",
        TinySpec(),
        pretrained="pretrained/tiny-gemma3-proxy",
    ),
    "google/gemma-3-4b-it": ModelInfo(
        "google/gemma-3-4b-it",
        "hub",
        896,
        256,
        "gated on the Hugging Face hub: accept the licence on the model page, then `hf auth login`",
    ),
    "google/gemma-3-12b-it": ModelInfo(
        "google/gemma-3-12b-it",
        "hub",
        896,
        256,
        "gated on the Hugging Face hub: accept the licence on the model page, then `hf auth login`",
    ),
}


# --- the tiny model ---------------------------------------------------------------------------------


def tokenizer_corpus(seed: int = 0, n: int = 1500) -> list[str]:
    """Instruction wordings plus random label grids in both encodings."""
    rng = random.Random(seed)
    texts = prompts.corpus_sentences()
    texts.append("You are a helpful assistant for remote sensing segmentation. user model")
    texts.append("0123456789 abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ .,:;!?*|()[]{}-_/\\'\"\n\t")
    for _ in range(n):
        g = rng.choice([4, 8, 16])
        mask = [[rng.randrange(len(CLASSES)) for _ in range(g)] for _ in range(g)]
        # Blocky masks so run-length rows have realistic run counts (1..g).
        mask = [[mask[i // 2 * 2][j // 3 * 3] for j in range(g)] for i in range(g)]
        texts.append(textgrid.encode(mask, "plain"))
        texts.append(textgrid.encode(mask, "rle"))
    return texts


def build_tokenizer(vocab_size: int = 1024, seed: int = 0):
    """A real ``GemmaTokenizer`` from BPE pieces trained offline, with Gemma's special tokens."""
    from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers, trainers
    from tokenizers import models as tok_models
    from transformers import GemmaTokenizer
    from trl.chat_template_utils import gemma3_chat_template

    tok = Tokenizer(tok_models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    # Training-time split only: isolate "|", newlines, " *", digits and punctuation so that no merge
    # crosses a cell (real Gemma writes "field|tree" as field,|,tree and splits digits);
    # GemmaTokenizer then rebuilds Gemma's pipeline (no pre-split) from the vocab and merges.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"[|\n0-9.,:;()'!?]|▁?\*"), behavior="isolated"),
            pre_tokenizers.Split(Regex("▁"), behavior="merged_with_next"),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False
    )
    tok.train_from_iterator(tokenizer_corpus(seed), trainer=trainer)
    data = json.loads(tok.to_str())
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in data["model"]["merges"]]
    # Specials first, then Gemma's 256 byte-fallback tokens, then the learned pieces.
    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for piece, _ in sorted(data["model"]["vocab"].items(), key=lambda kv: kv[1]):
        vocab.setdefault(piece, len(vocab))
    out = GemmaTokenizer(
        vocab=vocab,
        merges=merges,
        extra_special_tokens={
            "boi_token": "<start_of_image>",
            "eoi_token": "<end_of_image>",
            "image_token": "<image_soft_token>",
        },
    )
    out.add_special_tokens(
        {"additional_special_tokens": list(SPECIAL_TOKENS[5:])}, replace_extra_special_tokens=False
    )
    # The identical string TRL knows, so it can swap in its training variant ({% generation %}).
    out.chat_template = gemma3_chat_template
    return out


def build_tiny(out_dir: Path, spec: TinySpec = TinySpec()) -> Path:
    """Build, initialise and save a tiny Gemma 3 + processor into ``out_dir`` (from_pretrained-able)."""
    import torch
    from transformers import (
        Gemma3Config,
        Gemma3ForConditionalGeneration,
        Gemma3ImageProcessor,
        Gemma3Processor,
        Gemma3TextConfig,
        GenerationConfig,
        SiglipVisionConfig,
    )

    side = int(round(spec.mm_tokens**0.5))
    if side * side != spec.mm_tokens or (spec.image_size // spec.patch_size) % side:
        raise ValueError(
            f"mm_tokens={spec.mm_tokens} must be a square whose side divides "
            f"image_size/patch_size={spec.image_size // spec.patch_size}"
        )
    torch.manual_seed(spec.seed)
    tok = build_tokenizer(spec.vocab_size, spec.seed)
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    text_cfg = Gemma3TextConfig(
        vocab_size=len(tok),
        hidden_size=spec.hidden,
        intermediate_size=spec.hidden * 2,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=1,
        head_dim=spec.hidden // spec.heads,
        query_pre_attn_scalar=spec.hidden // spec.heads,
        sliding_window=512,
        max_position_embeddings=32768,
        layer_types=[
            ("full_attention" if (i + 1) % 2 == 0 else "sliding_attention") for i in range(spec.layers)
        ],
        pad_token_id=ids["<pad>"],
        eos_token_id=ids["<eos>"],
        bos_token_id=ids["<bos>"],
    )
    vision_cfg = SiglipVisionConfig(
        hidden_size=spec.vision_hidden,
        intermediate_size=spec.vision_hidden * 2,
        num_hidden_layers=spec.vision_layers,
        num_attention_heads=2,
        image_size=spec.image_size,
        patch_size=spec.patch_size,
        vision_use_head=False,  # as in the real gemma-3 config
    )
    cfg = Gemma3Config(
        text_config=text_cfg,
        vision_config=vision_cfg,
        mm_tokens_per_image=spec.mm_tokens,
        boi_token_index=ids["<start_of_image>"],
        eoi_token_index=ids["<end_of_image>"],
        image_token_index=ids["<image_soft_token>"],
    )
    model = Gemma3ForConditionalGeneration(cfg)
    with torch.no_grad():
        # Gemma 3 initialises the projector to zeros: a random model would never see the image.
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(0.0, 0.02)
    model.generation_config = GenerationConfig(
        bos_token_id=ids["<bos>"],
        eos_token_id=[ids["<eos>"], ids["<end_of_turn>"]],  # as in gemma-3-*-it
        pad_token_id=ids["<pad>"],
        do_sample=True,
        top_k=64,
        top_p=0.95,
    )
    processor = Gemma3Processor(
        image_processor=Gemma3ImageProcessor(size={"height": spec.image_size, "width": spec.image_size}),
        tokenizer=tok,
        chat_template=tok.chat_template,
        image_seq_length=spec.mm_tokens,
    )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    (out_dir / "tiny_spec.json").write_text(json.dumps(asdict(spec), indent=2))
    return out_dir


def _complete(folder: Path) -> bool:
    return (folder / "config.json").exists() and (folder / "tiny_spec.json").exists()


def resolve_model(model_id: str, cache_dir: Path) -> str:
    """A folder or hub id that ``from_pretrained`` takes; the tiny model is built and cached once.

    ``model_id``: a registry key, a local model folder, or any other hub id ("org/name").
    """
    info = REGISTRY.get(model_id)
    if info is not None and info.pretrained:
        from magseg_nb import tiny_base  # inside: tiny_base builds with training, which imports models

        # Shipped in the repository: every file must match SHA256SUMS (else one line saying how to rebuild).
        return str(tiny_base.verify(tiny_base.ROOT / info.pretrained))
    if info is not None and info.kind == "tiny":
        folder = Path(cache_dir) / f"{model_id}-{info.tiny.config_hash()}"
        if _complete(folder):
            return str(folder)
        # Build beside the target and rename, so a half-built folder is never picked up.
        tmp = folder.with_name(f".{folder.name}.{os.getpid()}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        build_tiny(tmp, info.tiny)
        try:
            os.rename(tmp, folder)  # not files.move: a folder another process finished first must stay
        except OSError:  # another process finished first
            shutil.rmtree(tmp, ignore_errors=True)
            if not _complete(folder):
                raise
        return str(folder)
    if Path(model_id).is_dir():
        return str(model_id)
    if info is not None or "/" in model_id:
        return model_id
    raise ValueError(
        f"unknown model_id {model_id!r}: use one of {sorted(REGISTRY)}, a local model folder or a hub id 'org/name'"
    )


def shipped_base(path_or_id: str) -> str:
    """``path_or_id``, or this checkout's copy of a shipped model when it is the absolute path of one in
    another checkout (a run folder made in a clone that was moved or deleted records that path)."""
    path = Path(str(path_or_id))
    if not path.is_absolute() or path.exists():
        return str(path_or_id)
    from magseg_nb import tiny_base

    for info in REGISTRY.values():
        if info.pretrained and Path(info.pretrained).name == path.name:
            here = tiny_base.ROOT / info.pretrained
            if here.is_dir():
                return str(here)
    return str(path_or_id)


WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin", "model*.bin")


def weights_problem(model_id: str) -> str | None:
    """One line saying why ``model_id``'s weights cannot load on this machine, else None (no download).

    A registry tiny id is built here. A local folder (an existing path, or an id that looks like a
    path) must hold config.json and weights (``*.safetensors`` or ``pytorch_model*.bin``; every shard a
    ``*.index.json`` names). A gated hub id needs a cached copy (under ``HF_HOME``) or a token.
    """
    model_id = str(model_id)
    info = REGISTRY.get(model_id)
    if info is not None and info.kind == "tiny":
        return None
    path = Path(model_id).expanduser()
    looks_like_path = model_id.startswith((".", "/", "~")) or model_id.count("/") > 1
    if path.exists() or looks_like_path:
        if not path.is_dir():
            return (
                f"model_id {model_id}: no such folder"
                if not path.exists()
                else f"model_id {model_id}: not a folder"
            )
        missing = [] if (path / "config.json").exists() else ["config.json"]
        weights = [p for pat in WEIGHT_PATTERNS for p in path.glob(pat)]
        for index in path.glob("*.index.json"):
            try:
                shards = set(json.loads(index.read_text()).get("weight_map", {}).values())
            except (OSError, ValueError):
                shards = {f"{index.name} (unreadable)"}
            missing += sorted(s for s in shards if not (path / s).exists())
        if not weights:
            missing.append("weights (*.safetensors or pytorch_model*.bin)")
        return f"model_id folder {path} lacks {', '.join(missing)}" if missing else None
    if info is None or "gated" not in info.notes:
        return None  # a public hub id: from_pretrained downloads it
    from huggingface_hub import constants, get_token, try_to_load_from_cache

    if isinstance(try_to_load_from_cache(model_id, "config.json"), str):
        return None  # cached (weights are checked when they load)
    if constants.HF_HUB_OFFLINE:
        return (
            f"model_id {model_id} is not in the hub cache ({constants.HF_HOME}) and HF_HUB_OFFLINE is set: "
            "download it once online, or set model_id to a local folder of the weights"
        )
    if get_token() is None:
        return (
            f"model_id {model_id} is gated and this machine has no Hugging Face token nor a cached copy "
            f"({constants.HF_HOME}): accept the licence on https://huggingface.co/{model_id}, then `hf auth "
            "login` (or set HF_TOKEN), or set model_id to a local folder of the weights"
        )
    return None


def model_info(path_or_id: str) -> ModelInfo | None:
    """The registry entry for a registry key or a folder built by resolve_model."""
    if path_or_id in REGISTRY:
        return REGISTRY[path_or_id]
    spec_file = Path(path_or_id) / "tiny_spec.json"
    if spec_file.exists():
        spec = TinySpec(**json.loads(spec_file.read_text()))
        recipe = Path(path_or_id) / "RECIPE.json"  # a shipped pretrained base names its registry id
        key = json.loads(recipe.read_text()).get("model_id") if recipe.exists() else None
        key = key if key in REGISTRY else "tiny-gemma3"
        return ModelInfo(key, "tiny", spec.image_size, spec.mm_tokens, REGISTRY[key].notes, spec)
    return None


def local_tokenizer(model_id: str):
    """The tokenizer of a hub model when it is already on this machine (never downloads), else None."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_id, local_files_only=True)
    except Exception:  # not cached, gated, or offline: the caller says so
        return None


TINY_TOKENIZER_NOTE = (
    "tiny-gemma3 tokenizer, built to mimic Gemma's one-label-one-token behaviour "
    "(the real Gemma 3 tokenizer is not on this machine)"
)


def processor_for_counting(path_or_id: str, cache_dir: Path):
    """(processor, note) to count tokens with: the model's own, else the tiny one, and a note saying which."""
    from transformers import AutoProcessor

    info = model_info(str(path_or_id))
    if info is None or info.kind != "tiny":
        try:
            return AutoProcessor.from_pretrained(path_or_id), f"{path_or_id} tokenizer"
        except Exception:  # gated or offline hub model: fall back to the tiny one, and say so
            path_or_id = resolve_model("tiny-gemma3", cache_dir)
    return AutoProcessor.from_pretrained(path_or_id), TINY_TOKENIZER_NOTE


# --- loading and generation -----------------------------------------------------------------------


class AdapterMismatchError(ValueError):
    """An adapter was trained on another base model than the one it is being loaded onto."""


def _base_name(path_or_id: str) -> str:
    return Path(str(path_or_id).rstrip("/")).name


def _pick_device(device: str) -> str:
    import torch

    if device != "auto":
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


def _pick_dtype(dtype, device: str):
    import torch

    if dtype != "auto":
        return getattr(torch, dtype) if isinstance(dtype, str) else dtype
    return torch.bfloat16 if device.startswith("cuda") else torch.float32


def load_model_and_processor(path_or_id, adapter_dir=None, dtype="auto", device="auto", trainable=False):
    """(model, processor) from a folder or hub id, with an optional PEFT adapter on top.

    ``trainable=False`` gives a frozen model in eval mode (inference); ``True`` leaves it trainable
    (and the adapter's weights trainable). Raises ``AdapterMismatchError`` naming both models when the adapter belongs to another base.
    """
    from transformers import AutoModelForImageTextToText, AutoProcessor

    path_or_id = str(path_or_id)
    device = _pick_device(device)
    if adapter_dir is not None:
        _adapter_base(Path(adapter_dir), path_or_id)  # fail before loading a multi-GB base model
    try:
        model = AutoModelForImageTextToText.from_pretrained(path_or_id, dtype=_pick_dtype(dtype, device))
    except OSError as err:
        hint = REGISTRY[path_or_id].notes if path_or_id in REGISTRY else "check the path or hub id"
        raise OSError(f"cannot load model {path_or_id!r}: {err}\n({hint})") from err
    model.to(device)
    processor_source = path_or_id
    if adapter_dir is not None:
        adapter_dir = Path(adapter_dir)
        model = _attach_adapter(model, path_or_id, adapter_dir, trainable)
        # Training saves the processor beside the adapter; it is the same as the base's otherwise.
        if (adapter_dir / "processor_config.json").exists() or (
            adapter_dir / "tokenizer_config.json"
        ).exists():
            processor_source = str(adapter_dir)
    processor = AutoProcessor.from_pretrained(processor_source)
    if not trainable:
        model = merge_lora(model)
        model.eval()
        model.requires_grad_(False)
    return model, processor


def merge_lora(model):
    """For generation: a float32 PEFT model with its LoRA folded into the base weights, else ``model``.

    The merged model computes one matmul per projection instead of the base's plus the adapter's, so
    greedy answers stay the same and come faster (benchmarks/README.md, "Merged LoRA"). bf16/fp16 stay
    unmerged: rounding W + BA to 8 mantissa bits would drop the adapter's small updates. The PEFT
    wrapper is spent afterwards; use the returned model."""
    import torch
    from peft import PeftModel

    if isinstance(model, PeftModel) and next(model.parameters()).dtype in (torch.float32, torch.float64):
        return model.merge_and_unload()
    return model


def _adapter_base(adapter_dir: Path, base: str) -> str:
    """The base model an adapter was trained on; raises when it is clearly not ``base``."""
    config_file = adapter_dir / "adapter_config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"{adapter_dir} holds no adapter_config.json: is it a PEFT adapter folder?")
    trained_on = json.loads(config_file.read_text()).get("base_model_name_or_path") or "?"
    if trained_on != "?" and _base_name(trained_on) != _base_name(base):
        raise AdapterMismatchError(
            f"adapter {adapter_dir} was trained on base model {trained_on!r}, "
            f"but is being loaded onto {base!r}; load it with the base model it was trained on"
        )
    return trained_on


def _attach_adapter(model, base: str, adapter_dir: Path, trainable: bool):
    from peft import PeftModel

    trained_on = _adapter_base(adapter_dir, base)
    try:
        return PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=trainable)
    except (RuntimeError, KeyError, ValueError) as err:
        raise AdapterMismatchError(
            f"adapter {adapter_dir} (trained on {trained_on!r}) does not fit base model {base!r}: {err}"
        ) from err


@contextlib.contextmanager
def shared_image_features(model):
    """Within the block, identical images of one batch go through the vision tower once.

    A tile's MAgSeg prompts all show the tile, and the chain batches them together, so half of a batch's
    images are one image. The features of each image are what the tower gives it; only the repeats are
    not computed again (``benchmarks/bench_shared_images.py``: the same answers in less time). Models
    without a vision tower are left as they are."""
    import torch

    owner = next(
        (m for m in model.modules() if "vision_tower" in m._modules and hasattr(m, "get_image_features")),
        None,
    )
    if owner is None:
        yield
        return
    encode = owner.get_image_features

    def once_per_image(pixel_values, **kwargs):
        # Images are compared bit for bit (an integer view: exact, and sortable for every dtype on every
        # device); the unique rows, viewed back, are the distinct images themselves.
        rows = pixel_values.reshape(len(pixel_values), -1).contiguous()
        bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[rows.element_size()]
        unique, inverse = torch.unique(rows.view(bits), dim=0, return_inverse=True)
        if len(unique) == len(pixel_values):
            return encode(pixel_values, **kwargs)
        out = encode(unique.view(pixel_values.dtype).reshape(-1, *pixel_values.shape[1:]), **kwargs)

        def spread(value):
            return value[inverse] if torch.is_tensor(value) and value.shape[:1] == unique.shape[:1] else value

        if isinstance(out, dict):  # a ModelOutput
            for key, value in list(out.items()):
                out[key] = spread(value)
            return out
        return tuple(spread(value) for value in out)

    owner.get_image_features = once_per_image
    try:
        yield
    finally:
        del owner.get_image_features  # the class's method again


def generate(
    model,
    processor,
    examples: list[dict],
    max_new_tokens: int,
    batch_size: int = 8,
    do_sample: bool = False,
    temperature: float = 1.0,
    token_probs: Sequence[int] | None = None,
    share_images: bool = True,
    **generate_kwargs,
):
    """Answers (text only) for ``examples`` = [dict(images=[PIL...], prompt=[messages])], in order.

    ``generate_kwargs`` go to ``model.generate`` (benchmarks force answer lengths with ``min_new_tokens``).
    With ``token_probs`` (token ids), returns ``(answers, steps)``: per answer, a list of
    ``(generated token id, probabilities of the token_probs ids at that step)``, padding dropped.
    ``share_images``: encode a batch's identical images once (:func:`shared_image_features`)."""
    import torch

    tokenizer = processor.tokenizer
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # decoder-only: new tokens must follow the prompt directly
    sampling = {"do_sample": True, "temperature": temperature} if do_sample else {"do_sample": False}
    if not do_sample:
        sampling.update(top_k=None, top_p=None, temperature=None)
    answers: list[str] = []
    steps: list[list] = []
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(setattr, tokenizer, "padding_side", old_side)
        if share_images:
            cleanup.enter_context(shared_image_features(model))
        for start in range(0, len(examples), batch_size):
            batch = examples[start : start + batch_size]
            texts = [
                processor.apply_chat_template(ex["prompt"], add_generation_prompt=True, tokenize=False)
                for ex in batch
            ]
            images = [list(ex["images"]) for ex in batch]
            inputs = processor(text=texts, images=images, padding=True, return_tensors="pt").to(model.device)
            if "pixel_values" in inputs:
                inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
            scored = {"output_scores": True, "return_dict_in_generate": True} if token_probs else {}
            with torch.inference_mode():
                out = model.generate(
                    **inputs,
                    max_new_tokens=max_new_tokens,
                    pad_token_id=tokenizer.pad_token_id,
                    **sampling,
                    **scored,
                    **generate_kwargs,
                )
            sequences = out.sequences if token_probs else out
            new = sequences[:, inputs["input_ids"].shape[1] :]
            answers.extend(t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True))
            if token_probs:
                probs = (
                    torch.stack(out.scores, 1).float().softmax(-1)[..., list(token_probs)]
                )  # batch, step, k
                for ids, p in zip(new.tolist(), probs.numpy(), strict=True):
                    steps.append([(t, p[i]) for i, t in enumerate(ids) if t != tokenizer.pad_token_id])
    return (answers, steps) if token_probs else answers


# --- LoRA -----------------------------------------------------------------------------------------

_LM_PROJ = "q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj"
_VISION_PROJ = "q_proj|k_proj|v_proj|out_proj|fc1|fc2"


def lora_config(
    r=16, alpha=32, dropout=0.05, target_modules="language", train_projector=True, train_embeddings=False
):
    """PEFT settings. ``target_modules``: "language" (the LM's projections), "all" (also the vision
    tower), or an explicit list/regex. ``train_projector`` trains the multimodal projector fully.
    ``train_embeddings`` also trains the (tied) token embeddings / LM head and the LM's final norm: a
    randomly initialised tiny model needs them, or its output distribution stays near uniform (greedy
    decoding learns, sampling stays noise and GRPO gets no signal). Real Gemma 3 does not.

    Module names are exact: PEFT matches ``modules_to_save`` by suffix, and a loose name such as
    "norm" also catches the projector's norm and breaks loading the adapter.
    """
    from peft import LoraConfig

    if target_modules == "language":
        target = rf".*language_model.*\.({_LM_PROJ})$"
    elif target_modules == "all":
        target = rf"(.*language_model.*\.({_LM_PROJ})|.*vision_tower.*\.({_VISION_PROJ}))$"
    else:
        target = target_modules
    save = (["multi_modal_projector"] if train_projector else []) + (
        ["language_model.embed_tokens", "language_model.norm"] if train_embeddings else []
    )
    return LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=target,
        modules_to_save=save or None,
        ensure_weight_tying=train_embeddings,
        task_type="CAUSAL_LM",
    )
