"""benchmarks/gpu_check.py on the CPU with the tiny model: --prepare, then every part for a couple of
steps (SFT both formats, GRPO with generation, batched inference, SFT under accelerate launch)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


def _run(args, timeout=420):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return proc


def _finite_numbers(obj, where=""):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _finite_numbers(v, f"{where}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _finite_numbers(v, f"{where}[{i}]")
    elif isinstance(obj, int | float) and not isinstance(obj, bool):
        yield where, obj


def test_gpu_check_cpu_tiny_path(tmp_path):
    inputs, out = tmp_path / "inputs", tmp_path / "out"
    _run(["--prepare", str(inputs), "--prepare-tiles", "2"])
    manifest = json.loads((inputs / "inputs.json").read_text())
    assert manifest["n_tiles"] == 2 and (inputs / "tiny-gemma3" / "config.json").exists()
    rows = (inputs / manifest["conversations"]["magseg"]).read_text().splitlines()
    assert len(rows) == 2 * 16  # 4 x 4 patches per tile, as in the gpu profile
    # a stated peak so the MFU path runs too (a CPU has no bf16 peak in the table)
    _run(
        [
            *("--inputs", str(inputs), "--out", str(out), "--device", "cpu", "--model", "tiny"),
            *("--sft-steps", "2", "--grpo-steps", "1", "--infer-tiles", "1", "--peak-tflops", "1"),
            *("--max-new-tokens", "8", "--max-completion-length", "8"),
        ]
    )
    result = json.loads((out / "gpu_check.json").read_text())
    for key in ("environment", "sft", "grpo", "inference", "accelerate_sft", "mfu_formula", "peak_flops"):
        assert key in result, key
    assert "errors" not in result
    bad = [(w, v) for w, v in _finite_numbers(result) if not math.isfinite(v)]
    assert bad == []
    sft = {r["format"]: r for r in result["sft"]}
    assert set(sft) == {"magseg", "text4seg"}
    for r in sft.values():
        assert r["steps"] == 2 and r["step_s_median"] > 0 and r["tokens_per_s"] > 0 and r["peak_mem_gib"] > 0
        assert 0 < r["mfu"] < 1 and r["mfu"] == r["achieved_tflops"] * 1e12 / result["peak_flops"]
        assert r["n_lm"] > 0 and r["n_vision"] > 0
    # Text4Seg describes the whole tile at 64 x 64 cells: much longer sequences than one 16 x 16 patch
    assert sft["text4seg"]["seq_len_first_batch"] > 2 * sft["magseg"]["seq_len_first_batch"]
    g = result["grpo"]
    assert g["steps"] == 1 and g["generate_calls"] >= 1 and g["generated_tokens"] > 0
    assert 0 < g["generation_share"] <= 1 and g["generation_tokens_per_s"] > 0
    inf = {r["format"]: r for r in result["inference"]}
    assert inf["magseg"]["answers"] == 16 and inf["text4seg"]["answers"] == 1
    assert all(
        r["tiles"] == 1 and r["tiles_per_s"] > 0 and 0 < r["answer_tokens_mean"] <= 8 for r in inf.values()
    )
    acc = result["accelerate_sft"]
    assert acc["returncode"] == 0 and acc["launcher"]["launched_by_accelerate"] and acc["steps"] == 2
    assert acc["launcher"]["num_processes"] == 1 and acc["format"] == "magseg"


def test_weights_check_before_any_stage(tmp_path, monkeypatch):
    """models.weights_problem, called by profile_schema.check_profile when the chain is about to run."""
    import yaml

    from magseg_nb import models, profile_schema

    assert models.weights_problem("tiny-gemma3") is None
    folder = tmp_path / "gemma"
    folder.mkdir()
    assert models.weights_problem(str(folder)) == (
        f"model_id folder {folder} lacks config.json, weights (*.safetensors or pytorch_model*.bin)"
    )
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors.index.json").write_text(
        '{"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}'
    )
    (folder / "model-00001-of-00002.safetensors").write_bytes(b"x")
    assert (
        models.weights_problem(str(folder))
        == f"model_id folder {folder} lacks model-00002-of-00002.safetensors"
    )
    (folder / "model-00002-of-00002.safetensors").write_bytes(b"x")
    assert models.weights_problem(str(folder)) is None
    assert "no such folder" in models.weights_problem(str(tmp_path / "nope"))
    # a gated hub id with an empty cache and no token
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setattr(c, "HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(c, "HF_TOKEN_PATH", str(tmp_path / "hf" / "token"))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)
    line = models.weights_problem("google/gemma-3-4b-it")
    assert "gated" in line and "hf auth login" in line and "\n" not in line
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    assert "HF_HUB_OFFLINE" in models.weights_problem("google/gemma-3-4b-it")
    # the hook: only when the chain is about to run (declared given) or asked for
    data = yaml.safe_load((ROOT / "profiles" / "gpu-mini.yaml").read_text())
    data["common"]["model_id"] = str(tmp_path / "nope")
    assert profile_schema.check_profile(data, "gpu-mini.yaml") == []
    problems = profile_schema.check_profile(data, "gpu-mini.yaml", declared={})
    assert len(problems) == 1 and "common.model_id" in problems[0] and "no such folder" in problems[0]


def _bundle_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "build_gpu_bundle", ROOT / "benchmarks" / "build_gpu_bundle.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_bundle_small_build_and_the_size_check(tmp_path):
    """Wheels from the registry (or pip's cache) + inputs of 2 tiles, pyarrow left to the image."""
    bgb = _bundle_module()
    bundle = tmp_path / "bundle"
    manifest = bgb.build(bundle, tiles=2, pyarrow="image")
    names = sorted(w.split("-")[0].lower() for w in manifest["wheels"])
    assert names == ["accelerate", "datasets", "dill", "fsspec", "multiprocess", "peft", "trl", "xxhash"]
    assert all((bundle / "wheels" / w).stat().st_size > 10_000 for w in manifest["wheels"])
    assert not (bundle / "pyarrow.tar.xz").exists() and manifest["bytes"]["pyarrow_tar_xz"] == 0
    assert json.loads((bundle / "inputs" / "inputs.json").read_text())["n_tiles"] == 2
    on_disk = sum(p.stat().st_size for p in bundle.rglob("*") if p.is_file())
    assert manifest["bundle_bytes"] == on_disk
    assert json.loads((bundle / "bundle.json").read_text())["wheels"] == manifest["wheels"]
    assert manifest["repo_tracked_bytes"] > 1_000_000  # the tracked files travel with it
    assert on_disk + manifest["repo_tracked_bytes"] < 64 * 2**20
    cmd = manifest["gpu_command"]
    assert "--target /tmp/site" in cmd and "wheels/*.whl" in cmd and "pyarrow.tar.xz" not in cmd
    assert cmd.endswith("/inputs --out $OUT")
    # over the limit: one line with the sizes and what to do
    with pytest.raises(
        bgb.BundleTooLarge, match=r"GPU bundle too large: 50\.0 MiB bundle \+ 20\.0 MiB .* > 64 MiB"
    ):
        bgb.check_size(50 * 2**20, 20 * 2**20, 64)
    bgb.check_size(40 * 2**20, 20 * 2**20, 64)


def test_wheel_to_tar_xz_keeps_every_file(tmp_path):
    import tarfile
    import zipfile

    bgb = _bundle_module()
    wheel = tmp_path / "pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("pkg/__init__.py", "X = 1\n")
        zf.writestr("pkg/libfoo.so.26", b"\x7fELF" + bytes(1000))
        zf.writestr("pkg-1.0.dist-info/METADATA", "Name: pkg\n")
    out = bgb.wheel_to_tar_xz(wheel, tmp_path / "pkg.tar.xz")
    with tarfile.open(out) as tar:
        members = {m.name: m for m in tar.getmembers()}
        assert sorted(members) == ["pkg-1.0.dist-info/METADATA", "pkg/__init__.py", "pkg/libfoo.so.26"]
        assert members["pkg/libfoo.so.26"].mode == 0o755 and members["pkg/__init__.py"].mode == 0o644
        assert tar.extractfile("pkg/libfoo.so.26").read() == b"\x7fELF" + bytes(1000)


@pytest.mark.slow
def test_gpu_bundle_default_build_is_under_64_mib(tmp_path):
    """The bundle as the README builds it (32 tiles, pyarrow as tar.xz): about 4 min here (xz)."""
    bgb = _bundle_module()
    manifest = bgb.build(tmp_path / "bundle")  # raises BundleTooLarge when over 64 MiB
    assert manifest["n_tiles"] == 32 and manifest["bytes"]["pyarrow_tar_xz"] > 20 * 2**20
    assert manifest["bundle_bytes"] + manifest["repo_tracked_bytes"] < 64 * 2**20
