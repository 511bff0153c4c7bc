"""Build the folder that travels to the GPU machine for ``gpu_check.py``: wheels + inputs, under 64 MiB.

    .venv/bin/python benchmarks/build_gpu_bundle.py --out .gpu/bundle            # about 4 min (xz)
    .venv/bin/python benchmarks/build_gpu_bundle.py --out .gpu/bundle --pyarrow image

The GPU image (Python 3.12, torch + transformers, no package registry) lacks trl and datasets. TRL's
trainers import ``datasets`` at module level and ``datasets`` imports pyarrow, so neither can be left
out of the GPU side. pyarrow's wheel alone is 55 MiB (the others 3.7 MiB together), and what travels
(the repository's tracked files, about 6 MiB, plus this folder) may be at most 64 MiB. Two ways:

- ``--pyarrow xz`` (default): pyarrow's files as one ``pyarrow.tar.xz`` (55 -> ~36 MiB), unpacked on the
  GPU machine into the same ``--target`` folder as the wheels; works whatever the image holds;
- ``--pyarrow image``: no pyarrow; the image's own is used (KINDS.md's package list of the H200 image,
  read 2026-11-17, has pyarrow; ``datasets`` needs >= 24, which ``gpu_check.py`` checks first).

The bundle folder holds ``wheels/*.whl`` (``pip download`` for cp312 manylinux x86-64: from the
registry, or pip's local cache), optionally ``pyarrow.tar.xz``, ``inputs/`` (``gpu_check.prepare``:
32 tiles' conversations of both formats + the tiny model) and ``bundle.json`` (files, sizes, the
command to run there). It exits with an error naming the sizes when the bundle plus the repository's
tracked files exceed ``--limit-mib``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MIB = 2**20
LIMIT_MIB = 64  # what may travel to the GPU machine (working tree + carried paths)
# What the GPU image lacks for gpu_check.py, pinned as in pyproject.toml (train extra) and
# datasets' needs. accelerate, peft, fsspec and xxhash are small; shipping them pins the versions.
WHEELS = [
    "trl==1.16.0",
    "peft==0.21.2",
    "accelerate==1.15.0",
    "datasets==5.2.0",
    "dill==0.4.1",
    "multiprocess==0.70.19",
    "fsspec==2026.9.0",
    "xxhash==4.1.0",
]
PYARROW = "pyarrow==26.0.1"
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64"]
SITE = "/tmp/site"


class BundleTooLarge(SystemExit):
    """The bundle would not fit the GPU machine's transfer limit."""


def download(specs: list[str], dest: Path) -> list[Path]:
    """``pip download`` cp312 manylinux x86-64 wheels of ``specs`` (no dependencies) into ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    platforms = [a for p in PLATFORMS for a in ("--platform", p)]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version",
           "3.12", "--implementation", "cp", *platforms, "-d", str(dest), *specs]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"pip download failed for {specs}:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    names = {s.split("==")[0].replace("-", "_").lower() for s in specs}
    return sorted(p for p in dest.glob("*.whl") if p.name.split("-")[0].lower() in names)


def wheel_to_tar_xz(wheel: Path, out: Path, preset: int = 6) -> Path:
    """The wheel's files as a tar.xz: unpacked into a --target folder it is the installed package."""
    tmp = out.with_suffix(".tmp")
    with zipfile.ZipFile(wheel) as zf, tarfile.open(tmp, "w:xz", preset=preset) as tar:
        for info in zf.infolist():
            if info.is_dir():
                continue
            member = tarfile.TarInfo(info.filename)
            member.size = info.file_size
            member.mode = 0o755 if info.filename.endswith(".so") or ".so." in info.filename else 0o644
            with zf.open(info) as fh:
                tar.addfile(member, fh)
    tmp.replace(out)
    return out


def tracked_bytes(root: Path = ROOT) -> int:
    """Bytes of the repository's tracked files (they travel with the bundle); 0 outside a git checkout."""
    proc = subprocess.run(["git", "ls-files", "-z"], cwd=root, capture_output=True)
    if proc.returncode != 0:
        return 0
    paths = [root / p for p in proc.stdout.decode().split("\0") if p]
    return sum(p.stat().st_size for p in paths if p.is_file())


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def check_size(bundle_bytes: int, repo_bytes: int, limit_mib: float) -> None:
    """Raise BundleTooLarge with the sizes when bundle + tracked files exceed ``limit_mib``."""
    total = bundle_bytes + repo_bytes
    if total > limit_mib * MIB:
        raise BundleTooLarge(
            f"GPU bundle too large: {bundle_bytes / MIB:.1f} MiB bundle + {repo_bytes / MIB:.1f} MiB tracked "
            f"repository files = {total / MIB:.1f} MiB > {limit_mib:g} MiB. Fix: --pyarrow image (if the GPU "
            "image has pyarrow >= 24) or fewer --tiles"
        )


def gpu_command(bundle: Path, has_pyarrow: bool) -> str:
    """The shell line that installs the bundle and runs the check on the GPU machine (repo root)."""
    rel = bundle.resolve().relative_to(ROOT) if bundle.resolve().is_relative_to(ROOT) else bundle
    unpack = f" && tar xJf {rel}/pyarrow.tar.xz -C {SITE}" if has_pyarrow else ""
    return (
        f"python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target {SITE} "
        f"{rel}/wheels/*.whl{unpack} && export PYTHONPATH={SITE} && "
        f"python3 benchmarks/gpu_check.py --inputs {rel}/inputs --out $OUT"
    )


def build(out: Path, tiles: int = 32, pyarrow: str = "xz", limit_mib: float = LIMIT_MIB) -> dict:
    """Write the bundle into ``out`` (replaced) and return its manifest; BundleTooLarge when over the limit."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import gpu_check

    if pyarrow not in ("xz", "image"):
        raise ValueError(f"pyarrow must be 'xz' or 'image', not {pyarrow!r}")
    out = Path(out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    wheels = download(WHEELS, out / "wheels")
    if len(wheels) != len(WHEELS):
        raise SystemExit(f"expected {len(WHEELS)} wheels, pip left {[w.name for w in wheels]}")
    if pyarrow == "xz":
        cache = out / "_download"
        (wheel,) = download([PYARROW], cache)
        wheel_to_tar_xz(wheel, out / "pyarrow.tar.xz")
        shutil.rmtree(cache)
    inputs = gpu_check.prepare(out / "inputs", tiles)
    sizes = {str(p.relative_to(out)): p.stat().st_size for p in sorted(out.rglob("*")) if p.is_file()}
    parts = {
        "wheels": sum(v for k, v in sizes.items() if k.startswith("wheels/")),
        "pyarrow_tar_xz": sizes.get("pyarrow.tar.xz", 0),
        "inputs": sum(v for k, v in sizes.items() if k.startswith("inputs/")),
    }
    manifest = {
        "pyarrow": pyarrow,
        "n_tiles": inputs["n_tiles"],
        "wheels": [w.name for w in wheels],
        "bytes": parts,
        "bundle_bytes": sum(parts.values()),
        "repo_tracked_bytes": tracked_bytes(),
        "limit_mib": limit_mib,
        "gpu_command": gpu_command(out, pyarrow == "xz"),
    }
    (out / "bundle.json").write_text(json.dumps(manifest, indent=2))
    manifest["bundle_bytes"] += (out / "bundle.json").stat().st_size
    check_size(manifest["bundle_bytes"], manifest["repo_tracked_bytes"], limit_mib)
    return manifest


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(ROOT / ".gpu" / "bundle"), help="bundle folder (replaced)")
    ap.add_argument("--tiles", type=int, default=32, help="tiles of inputs (default 32: inference over 32)")
    ap.add_argument("--pyarrow", choices=["xz", "image"], default="xz", help="ship pyarrow as tar.xz or not")
    ap.add_argument("--limit-mib", type=float, default=LIMIT_MIB)
    args = ap.parse_args(argv)
    manifest = build(Path(args.out), args.tiles, args.pyarrow, args.limit_mib)
    b = manifest["bytes"]
    print(
        f"bundle {args.out}: wheels {b['wheels'] / MIB:.1f} MiB, pyarrow.tar.xz {b['pyarrow_tar_xz'] / MIB:.1f} "
        f"MiB, inputs {b['inputs'] / MIB:.1f} MiB ({manifest['n_tiles']} tiles); with the tracked repository "
        f"{(manifest['bundle_bytes'] + manifest['repo_tracked_bytes']) / MIB:.1f} MiB of {args.limit_mib:g}"
    )
    print(f"on the GPU machine (repository root):\n  {manifest['gpu_command']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
