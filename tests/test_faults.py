"""Fault injection: kill -9 mid-training, concurrent runs, tampered caches, damaged unpacks, hostile
names, markup in scene ids, bad profiles, Ctrl-C. Each case is done for real (a real runner process,
real kernels, real files) on smoke-sized inputs, and none may write outside its run folder / data root.
"""

from __future__ import annotations

import ast
import json
import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from magseg_nb import chain, cli, files, profile_schema
from magseg_nb import manifest as mf
from magseg_nb.training import last_checkpoint

from .test_chain import _notebook
from .test_manifest import _local_manifest, ftw_archive  # noqa: F401 - a fixture
from .test_training import convs  # noqa: F401 - a fixture

ROOT = Path(__file__).resolve().parents[1]

# A "training" stage: a checkpoint every step, weights first and trainer_state.json last (as the
# Trainer saves them), resuming from training.last_checkpoint like notebooks 03/04.
TRAIN_BODY = """
import json, os, subprocess, sys, time
from magseg_nb.training import last_checkpoint
(stage.dir / "kernel.pid").write_text(str(os.getpid()))
# a worker in its own session (as a pool's forkserver may be): it must not outlive a dead runner
worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
(stage.dir / "worker.pid").write_text(str(worker.pid))
ck = stage.dir / "checkpoints"
ck.mkdir(exist_ok=True)
resume = last_checkpoint(ck)
first = int(resume.rsplit("-", 1)[1]) if resume else 0
with open(stage.dir / "resumed_from.txt", "a") as fh:
    fh.write(f"{first}\\n")
for step in range(first + 1, steps + 1):
    time.sleep(step_s)
    d = ck / f"checkpoint-{step}"
    d.mkdir()
    (d / "adapter_model.safetensors").write_bytes(b"w" * 64)
    time.sleep(step_s)
    (d / "trainer_state.json").write_text(json.dumps({"global_step": step}))
(stage.dir / "adapter.txt").write_text(f"trained {steps} steps, seed {seed}")
value = steps
"""
PARAMS = 'run_dir = "runs/t"\nprofile = "t"\nseed = 0\nsteps = 4\nstep_s = 0.4\n'


@pytest.fixture()
def repo(tmp_path, monkeypatch):
    """A throwaway repo whose one stage trains slowly enough to be killed in the middle."""
    root = tmp_path / "repo"
    (root / "notebooks").mkdir(parents=True)
    (root / "profiles").mkdir()
    (root / "pyproject.toml").write_text("[project]\nname='x'\n")
    _notebook(root / "notebooks" / "01_dataset_prep.ipynb", "01_dataset_prep", [], TRAIN_BODY, PARAMS)
    _write_profile(root, "t", seed=1)
    monkeypatch.chdir(root)
    return root


def _write_profile(root: Path, name: str, run_dir: str = "runs/t", **common) -> Path:
    path = root / "profiles" / f"{name}.yaml"
    path.write_text(
        yaml.safe_dump({"description": name, "common": {"run_dir": run_dir, **common}, "stages": {}})
    )
    return path


def _default_sigint() -> None:
    # As a terminal's foreground command: when pytest itself runs in the background of a
    # non-interactive shell (`cmd &`), SIGINT arrives ignored and the child would inherit that.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _runner(root: Path, *args: str) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.Popen(
        [sys.executable, "-m", "magseg_nb.cli", "run", *args],
        cwd=root,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_default_sigint,
    )


def _wait_for(check, timeout: float = 120.0, what: str = "") -> None:
    deadline = time.time() + timeout
    while not check():
        if time.time() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)


def _half_written(partial: Path, step: int):
    ckpt = partial / "checkpoints" / f"checkpoint-{step}"
    return lambda: (
        (ckpt / "adapter_model.safetensors").exists() and not (ckpt / "trainer_state.json").exists()
    )


def _tree(root: Path, skip: tuple[Path, ...] = ()) -> set[str]:
    return {
        p.relative_to(root).as_posix()
        for p in root.rglob("*")
        if not any(p == s or s in p.parents for s in skip) and "__pycache__" not in p.parts
    }


# --- 1. kill -9 during training ------------------------------------------------------------------


def test_sigkill_mid_training_then_rerun_resumes_and_force_restarts(repo):
    run = repo / "runs" / "t"
    partial = run / "01_dataset_prep.partial"
    before = _tree(repo.parent, skip=(repo / "runs",))
    proc = _runner(repo, "--profile", "t")
    _wait_for(_half_written(partial, 3), what="a half-written checkpoint-3")
    proc.kill()  # SIGKILL: the runner gets no chance to shut its kernel down
    proc.wait(timeout=30)
    kernel = int((partial / "kernel.pid").read_text())
    _wait_for(lambda: not chain._pid_alive(kernel), timeout=10, what="the orphaned kernel to die")
    worker = int((partial / "worker.pid").read_text())
    _wait_for(lambda: not chain._pid_alive(worker), timeout=10, what="the kernel's worker process to die")
    time.sleep(1.0)  # a surviving kernel would finish checkpoint-3 (0.4 s) and start checkpoint-4
    assert not (partial / "checkpoints" / "checkpoint-3" / "trainer_state.json").exists()
    assert not (partial / "checkpoints" / "checkpoint-4").exists()
    assert json.loads((run / ".run.lock.holder.json").read_text())["pid"] == proc.pid  # left behind

    logs = []
    assert [r["status"] for r in chain.run_chain("t", log=logs.append)] == ["ran"]
    assert logs[0].startswith(f"warning: taking over the lock on run folder {run} from PID {proc.pid}")
    assert logs[0].endswith("which is no longer running")
    final = run / "01_dataset_prep"
    assert (final / "resumed_from.txt").read_text().split() == ["0", "2"]  # skipped the broken step 3
    executed = (run / "notebooks" / "01_dataset_prep.ipynb").read_text()
    assert "warning: removing incomplete checkpoint" in executed and "checkpoint-3" in executed
    assert (final / "adapter.txt").read_text() == "trained 4 steps, seed 1"
    assert last_checkpoint(final / "checkpoints").endswith("checkpoint-4")

    # Killed again halfway through a changed run: --force throws the scratch away and starts at 0.
    _write_profile(repo, "t", seed=2)
    proc = _runner(repo, "--profile", "t")
    _wait_for(_half_written(partial, 2), what="a half-written checkpoint-2")
    proc.kill()
    proc.wait(timeout=30)
    _wait_for(lambda: not chain._pid_alive(int((partial / "kernel.pid").read_text())), timeout=10)
    assert chain.run_chain("t", force=True, log=lambda *_: None)[0]["status"] == "ran"
    assert (final / "resumed_from.txt").read_text().split() == ["0"]
    assert (final / "adapter.txt").read_text() == "trained 4 steps, seed 2"
    assert not partial.exists() and not (run / ".run.lock.holder.json").exists()
    assert _tree(repo.parent, skip=(repo / "runs",)) == before  # nothing written outside the run folder
    assert [p.name for p in (repo / "runs").iterdir()] == ["t"]


def test_a_kernel_killed_before_its_stage_starts_dies_with_the_runner(tmp_path, monkeypatch):
    """The runner's watch runs from the kernel's first line (not only from ``Stage.start``), and
    ipykernel's own parent poller, which would ``os._exit`` the kernel before the watch kills its
    children, is off."""
    import nbformat

    root = tmp_path / "repo"
    (root / "notebooks").mkdir(parents=True)
    (root / "profiles").mkdir()
    (root / "pyproject.toml").write_text("[project]\nname='x'\n")
    probe = root / "probe.json"
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_code_cell(PARAMS, metadata={"tags": ["parameters"]}),
        nbformat.v4.new_code_cell(
            "import json, os, threading, time\n"
            "from ipykernel.kernelapp import IPKernelApp\n"
            f"open({str(probe)!r}, 'w').write(json.dumps({{'pid': os.getpid(), "
            "'poller': IPKernelApp.instance().poller is not None, "
            "'threads': [t.name for t in threading.enumerate()]}))\n"
            "time.sleep(600)"
        ),
    ]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, root / "notebooks" / "01_dataset_prep.ipynb")
    _write_profile(root, "t", seed=1)
    monkeypatch.chdir(root)
    proc = _runner(root, "--profile", "t")
    _wait_for(probe.exists, what="the kernel's first cell")
    time.sleep(0.2)  # the file is written in one call; let it close
    seen = json.loads(probe.read_text())
    proc.kill()
    proc.wait(timeout=30)
    assert seen["poller"] is False and "magseg-runner-watch" in seen["threads"]
    _wait_for(lambda: not chain._pid_alive(seen["pid"]), timeout=10, what="the orphaned kernel to die")


def test_incomplete_checkpoints_are_skipped_and_removed(tmp_path, capsys):
    ck = tmp_path / "checkpoints"
    for step, state in ((2, {"global_step": 2}), (4, None), (6, "{half"), (8, {"global_step": 7})):
        (ck / f"checkpoint-{step}").mkdir(parents=True)
        if state is not None:
            text = state if isinstance(state, str) else json.dumps(state)
            (ck / f"checkpoint-{step}" / "trainer_state.json").write_text(text)
    assert last_checkpoint(ck) == str(ck / "checkpoint-2")
    assert sorted(p.name for p in ck.iterdir()) == ["checkpoint-2"]
    out = capsys.readouterr().out.splitlines()
    assert out == [
        f"warning: removing incomplete checkpoint {ck / 'checkpoint-8'} (trainer_state.json says step 7)",
        f"warning: removing incomplete checkpoint {ck / 'checkpoint-6'} (no readable trainer_state.json (JSONDecodeError))",
        f"warning: removing incomplete checkpoint {ck / 'checkpoint-4'} (no readable trainer_state.json (FileNotFoundError))",
    ]
    assert last_checkpoint(tmp_path / "none") is None


def test_a_save_cut_off_midway_never_becomes_a_checkpoint(convs, tmp_path, monkeypatch, capsys):  # noqa: F811
    """Real SFTTrainer on the tiny model: the save of step 2 dies after the weights (as a kill would);
    no ``checkpoint-2`` appears, the rerun resumes from step 1 and finishes with a complete step 2."""
    import transformers

    from magseg_nb import models, training

    base = models.resolve_model("tiny-gemma3", tmp_path / "models")
    out = tmp_path / "sft"
    cfg = dict(
        base_model=str(base),
        train_jsonl=str(convs / "magseg_train.jsonl"),
        output_dir=str(out),
        max_steps=2,
        batch_size=4,
        save_steps=1,
        save_total_limit=3,
        logging_steps=1,
        eval_max_examples=0,
    )
    real = transformers.Trainer._save_rng_state

    def dies_at_step_2(self, output_dir):
        if self.state.global_step == 2:
            raise KeyboardInterrupt("killed while saving")
        return real(self, output_dir)

    monkeypatch.setattr(transformers.Trainer, "_save_rng_state", dies_at_step_2)
    with pytest.raises(KeyboardInterrupt):
        training.run_sft(cfg)
    ck = out / "checkpoints"

    # README.md is the model card; INPUTS stamps which inputs wrote these checkpoints
    def listing():
        return sorted(p.name for p in ck.iterdir() if p.name not in ("README.md", training.INPUTS_STAMP))

    assert listing() == [".saving", "checkpoint-1"]
    assert (ck / training.INPUTS_STAMP).read_text().strip() == training.inputs_hash(
        training.SFTSettings(**cfg)
    )
    assert (ck / ".saving" / "checkpoint-2" / "adapter_model.safetensors").exists()  # the weights got out
    assert not (ck / ".saving" / "checkpoint-2" / "trainer_state.json").exists()

    monkeypatch.setattr(transformers.Trainer, "_save_rng_state", real)
    capsys.readouterr()
    assert training.run_sft(cfg)["steps"] == 2
    assert f"resuming from {ck / 'checkpoint-1'}" in capsys.readouterr().out
    assert listing() == ["checkpoint-1", "checkpoint-2"]
    assert json.loads((ck / "checkpoint-2" / "trainer_state.json").read_text())["global_step"] == 2


# --- 2. two runs on one folder -------------------------------------------------------------------


def test_concurrent_runs_on_one_folder_fail_with_the_lock_message(repo, capsys):
    run = repo / "runs" / "t"
    first = _runner(repo, "--profile", "t")
    _wait_for(lambda: (run / ".run.lock.holder.json").exists(), what="the first run to take its lock")
    holder = json.loads((run / ".run.lock.holder.json").read_text())
    assert holder["pid"] == first.pid
    # The same profile, and another profile with other parameters into the same folder: both refused.
    _write_profile(repo, "other", seed=5)
    for profile in ("t", "other"):
        assert cli.main(["run", "--profile", profile]) == 1
        err = capsys.readouterr().err
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder["started"]))
        assert err.startswith(f"magseg-nb: run folder {run} is locked by PID {first.pid} (started {when}")
        assert err.count("\n") == 1
    out, err = first.communicate(timeout=180)
    assert first.returncode == 0, err
    state = chain.read_state(run / "01_dataset_prep")
    assert state["params"]["seed"] == 1 and state["summary"] == {"value": 4}  # the first run's, unmixed
    assert (run / "01_dataset_prep" / "adapter.txt").read_text() == "trained 4 steps, seed 1"
    assert not list(run.glob("*.partial")) and not (run / ".run.lock.holder.json").exists()
    assert sorted(p.name for p in (run / "notebooks").iterdir()) == [
        "01_dataset_prep.ipynb",
        "01_dataset_prep.kernel.log",
    ]


def test_a_second_kernel_waits_for_the_stage_lock(tmp_path, monkeypatch):
    """A kernel of a killed run that is still dying holds its stage: a new kernel waits, then fails."""
    from filelock import FileLock

    monkeypatch.setattr(chain, "STAGE_LOCK_WAIT_S", 0.3)
    run = tmp_path / "run"
    run.mkdir()
    other = FileLock(str(run / ".01_dataset_prep.lock"))
    other.acquire()  # another open file description: like another process
    files.write_json(run / ".01_dataset_prep.lock.holder.json", {"pid": 4242, "started": 0, "command": "k"})
    try:
        with pytest.raises(chain.StageError, match=r"stage 01_dataset_prep in .* is locked by PID 4242"):
            chain.Stage.start("01", {"run_dir": str(run)})
    finally:
        other.release()
    assert chain.Stage.start("01", {"run_dir": str(run)}).dir.is_dir()


# --- 3. tampered cache ---------------------------------------------------------------------------


def test_same_size_byte_flip_in_a_cached_output_reruns_the_stage(repo):
    chain.run_chain("t", log=lambda *_: None)
    adapter = repo / "runs" / "t" / "01_dataset_prep" / "adapter.txt"
    good = adapter.read_bytes()
    adapter.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))  # same size, one bit
    logs = []
    assert chain.run_chain("t", log=logs.append)[0]["status"] == "ran"
    assert logs[0] == (
        f"[01_dataset_prep] running (output changed: {adapter} changed (its SHA-256 differs from the one "
        "in state.json))"
    )
    assert adapter.read_bytes() == good
    assert chain.run_chain("t", log=lambda *_: None)[0]["status"] == "skipped"


# --- 4. damaged unpack ---------------------------------------------------------------------------


def test_damaged_unpack_is_repaired_on_the_next_fetch(tmp_path, ftw_archive):  # noqa: F811
    man = _local_manifest(
        tmp_path, "fields_of_the_world.yaml", "fields_of_the_world", {"india.zip": ftw_archive}
    )
    data_root = tmp_path / "data"
    before = _tree(tmp_path, skip=(data_root,))
    ds = mf.prepare_dataset(man, "fields_of_the_world", data_root, files=["india.zip"], log=lambda m: None)
    target = ds / "ftw" / "india"
    listing = json.loads((target / mf.UNPACK_RECORD).read_text())["files"]
    with zipfile.ZipFile(ftw_archive) as zf:
        assert listing == {i.filename: i.file_size for i in zf.infolist() if not i.is_dir()}
    chips = target / "chips_india.parquet"
    tif = target / "s2_images" / "window_a" / "g1_00001.tif"
    good_tif = tif.read_bytes()

    def damage_and_fetch(damage, expect: str) -> None:
        damage()
        logs = []
        mf.prepare_dataset(man, "fields_of_the_world", data_root, files=["india.zip"], log=logs.append)
        assert logs == [f"{target}: {expect}; unpacking india.zip again"]
        assert tif.read_bytes() == good_tif and chips.is_file()
        assert not target.with_name("india.partial").exists() and not target.with_name("india.old").exists()

    damage_and_fetch(tif.unlink, "s2_images/window_a/g1_00001.tif is missing")
    damage_and_fetch(
        lambda: tif.write_bytes(good_tif[:100]),
        f"s2_images/window_a/g1_00001.tif has 100 bytes, the archive has {len(good_tif)}",
    )
    # half-unpacked (an unpack cut off, or a folder from before completion records): no record
    damage_and_fetch(
        (target / mf.UNPACK_RECORD).unlink,
        "it has no record of a finished unpack (interrupted, or unpacked by something else)",
    )
    logs = []
    mf.prepare_dataset(man, "fields_of_the_world", data_root, files=["india.zip"], log=logs.append)
    assert logs == [f"{target} is already unpacked from india.zip"]
    assert [
        s.scene_id for s in mf.dataset_sources(man, "fields_of_the_world", data_root, log=lambda m: None)
    ] == ["india_g1_00001"]

    # A damaged download: the error's advice (delete it, fetch again) works when followed.
    archive = ds / "downloads" / "india.zip"
    raw = bytearray(archive.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    archive.write_bytes(bytes(raw))
    with pytest.raises(mf.ChecksumError, match=r"india.zip already exists but sha256 mismatch.*delete it"):
        mf.prepare_dataset(man, "fields_of_the_world", data_root, files=["india.zip"], log=lambda m: None)
    archive.unlink()
    logs = []
    mf.prepare_dataset(man, "fields_of_the_world", data_root, files=["india.zip"], log=logs.append)
    assert logs == [
        f"{target}: india.zip was downloaded again after it was unpacked; unpacking india.zip again"
    ]
    assert archive.read_bytes() == ftw_archive.read_bytes() and tif.read_bytes() == good_tif
    assert _tree(tmp_path, skip=(data_root,)) == before | {"fields_of_the_world.yaml"}


def test_unpack_error_advice_names_the_archive(tmp_path):
    broken = tmp_path / "broken.zip"
    broken.write_bytes(b"<html>not data</html>")
    with pytest.raises(mf.UnpackError) as err:
        mf.unpack(broken, tmp_path / "out", log=lambda m: None)
    assert str(err.value).endswith(
        f"delete {broken} and fetch again (the same command downloads and unpacks it anew)"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.zip"]


# --- 5. hostile names ----------------------------------------------------------------------------


def test_hostile_aoi_id_is_refused_and_nothing_leaves_the_data_root(tmp_path, ftw_archive):  # noqa: F811
    man = _local_manifest(
        tmp_path, "fields_of_the_world.yaml", "fields_of_the_world", {"india.zip": ftw_archive}
    )
    data_root = tmp_path / "deep" / "data"
    mf.prepare_dataset(man, "fields_of_the_world", data_root, files=["india.zip"], log=lambda m: None)
    chips = data_root / "fields_of_the_world" / "ftw" / "india" / "chips_india.parquet"
    pd.DataFrame({"aoi_id": ["g1_00001", "../../../.."], "split": ["train", "test"]}).to_parquet(chips)
    before = _tree(tmp_path, skip=(data_root,))
    with pytest.raises(
        files.UnsafeNameError, match=rf"aoi_id in {chips} '\.\./\.\./\.\./\.\.' cannot be used"
    ):
        mf.dataset_sources(man, "fields_of_the_world", data_root, log=lambda m: None)
    assert _tree(tmp_path, skip=(data_root,)) == before


@pytest.mark.parametrize("bad", ["../../escape", "/abs", "a/b", "x<script>"])
def test_hostile_ids_are_refused_where_they_become_paths(tmp_path, bad):
    """Every place that turns a tile or scene id into a path checks it (files.safe_id), before writing."""
    from magseg_nb import geo, inference, prompts

    run01 = tmp_path / "run" / "01"
    with pytest.raises(files.UnsafeNameError, match="tile id"):
        geo.read_tile(run01, bad)
    with pytest.raises(files.UnsafeNameError, match="scene id"):
        geo.scene_paths(run01, bad)
    tile = prompts.TileRecord(bad, "s0", "train", np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8), np.uint8))
    with pytest.raises(files.UnsafeNameError, match="tile id"):
        prompts.conversation_rows(tile, tmp_path / "convs", "text4seg", 4, "rle")
    rows = pd.DataFrame({"tile_id": ["t0"], "scene_id": [bad], "row_off": [0], "col_off": [0]})
    with pytest.raises(files.UnsafeNameError, match="scene id in tiles.csv"):
        inference.infer_scene(None, None, run01, rows, None)
    assert _tree(tmp_path) <= {"convs", "convs/images"}  # nothing else was written


@pytest.mark.parametrize(
    "where, value, message",
    [
        ("dataset", "../../x", r"datasets\.\.\./\.\./x: dataset name '\.\./\.\./x' cannot be used"),
        ("countries", ["india", "../x"], r"countries: country '\.\./x' cannot be used"),
        ("unpack_to", "ok/../../x", r"unpack_to: expected a relative folder of plain names"),
        ("name", "../india.zip", r"files\[0\]\.name: must be a plain file name"),
    ],
)
def test_hostile_names_in_a_manifest_are_refused(tmp_path, where, value, message):
    data = yaml.safe_load((ROOT / "data_manifests" / "fields_of_the_world.yaml").read_text())
    spec = data["datasets"]["fields_of_the_world"]
    if where == "dataset":
        data["datasets"] = {value: spec}
    elif where == "countries":
        spec["countries"] = value
    else:
        spec["files"][0][where] = value
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(mf.ManifestError, match=message):
        mf.load_manifest(path)
    with pytest.raises(files.UnsafeNameError, match="dataset name"):
        mf.prepare_dataset(ROOT / "data_manifests" / "fields_of_the_world.yaml", "../x", tmp_path, files=[])


# --- 6. markup in a scene id ---------------------------------------------------------------------


def test_scene_id_with_script_is_escaped_in_the_map(tmp_path):
    import geopandas as gpd
    from affine import Affine
    from shapely.geometry import box

    from magseg_nb import geo
    from magseg_nb.viz import maps

    evil = '<script>alert("x")</script>'
    image = geo.write_geotiff(
        tmp_path / "image.tif",
        np.full((3, 16, 16), 120, np.uint8),
        "EPSG:32648",
        Affine(1.0, 0, 500000.0, 0, -1.0, 1200000.0),
    )
    fields = gpd.GeoDataFrame(
        {"class": ['<img src=x onerror=alert("y")>'], "field_id": [1]},
        geometry=[box(500002, 1199986, 500010, 1199994)],
        crs="EPSG:32648",
    )
    m = maps.scene_map(image, fields, None, title=f"MAgSeg · {evil}")
    path = maps.save_offline_html(m, tmp_path / "map.html", title=f"MAgSeg · {evil} · magseg-sft")
    html = path.read_text()
    assert "<script>alert" not in html and "<img src=x" not in html
    assert "<title>MAgSeg · &lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; · magseg-sft</title>" in html
    legend = "legend-title'>MAgSeg \\u00b7 &lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;</div>"
    assert legend in html  # inside the page's JSON, where a raw </script> would end the script
    assert "&lt;img src=x onerror=alert(&quot;y&quot;)&gt;" in html  # popup text


# --- 7. bad profiles -----------------------------------------------------------------------------

BAD_PROFILES = [
    ("common: [\n", "not valid YAML at line 2, column 1: expected the node content"),
    (
        "stages:\n  01_dataset_prep: tile_size\n",
        "stages.01_dataset_prep must be a mapping of parameter: value, got 'tile_size'",
    ),
    (
        'stages:\n  01: {tile_size: "128"}\n',
        "stages.01_dataset_prep.tile_size is '128'; allowed: an integer >= 16",
    ),
    (
        "stages:\n  01: {scene_size: -384}\n",
        "stages.01_dataset_prep.scene_size is -384; allowed: an integer >= 64",
    ),
    ("common: {seed: zero}\n", "common.seed is 'zero'; allowed: an integer >= 0"),
    (
        "stages:\n  03: {max_steps: -3}\n",
        "stages.03_sft.max_steps is -3; allowed: an integer >= 1 or a mapping with keys from magseg, text4seg to an integer >= 1",
    ),
    ("stages:\n  04: {max_steps: 0}\n", "stages.04_grpo.max_steps is 0; allowed: an integer >= 1"),
    (
        "stages:\n  02: {magseg_encoding: zip}\n",
        "stages.02_instruction_format.magseg_encoding is 'zip'; allowed: one of 'plain', 'rle'",
    ),
    (
        "stages:\n  05: {sam_backend: vit_x}\n",
        "stages.05_inference.sam_backend is 'vit_x'; allowed: one of 'none', 'superpixels', 'selftrained', 'tiny', 'vit_b', 'vit_h'",
    ),
    ("stages:\n  06: {n_boot: .nan}\n", "stages.06_metrics.n_boot is nan; allowed: an integer >= 1"),
    ("stages:\n  09: {}\n", "stages.09: unknown stage '09'; stages are 01_dataset_prep"),
    (
        "stages:\n  01: {tile_sise: 128}\n",
        "stages.01_dataset_prep.tile_sise is not a parameter here; known keys: ",
    ),
    (
        "common: {profile: ../../x}\n",
        "common.profile is '../../x'; allowed: text (letters, digits, . _ + = -)",
    ),
    ("stages: [01]\n", "stages must be a mapping of stage name: {parameter: value}"),
    ("colour: red\n", "unknown top-level key 'colour'; use description, common, stages"),
]


@pytest.mark.parametrize("text, message", BAD_PROFILES)
def test_bad_profile_gives_one_line_before_any_stage(tmp_path, monkeypatch, capsys, text, message):
    monkeypatch.chdir(ROOT)
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    if not text.startswith("common: ["):  # parsable: send any run folder into tmp_path
        data = yaml.safe_load(text)
        data["common"] = {**data.get("common", {}), "run_dir": str(tmp_path / "run")}
        path.write_text(yaml.safe_dump(data))
    assert cli.main(["run", "--profile", str(path)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert err.startswith(f"magseg-nb: {path}: {message}"), err
    assert "Traceback" not in err and not (tmp_path / "run").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml"]


def test_every_notebook_parameter_has_a_rule_its_default_passes():
    import papermill

    for stage in chain.STAGES:
        for key, info in papermill.inspect_notebook(str(ROOT / "notebooks" / f"{stage}.ipynb")).items():
            rule = profile_schema.rule_for(stage, key)
            assert rule is not None, f"{stage}: parameter {key} has no rule in magseg_nb/profile_schema.py"
            default = ast.literal_eval(info["default"])
            assert rule.check(default), f"{stage}.{key} = {default!r} fails {rule.describe()}"
    from magseg_nb import instances, prompts, refine, views

    assert profile_schema.SAM_BACKENDS == refine.SAM_BACKENDS and profile_schema.FORMATS == prompts.FORMATS
    assert profile_schema.FIELD_SPLITTERS == instances.SPLITTERS
    assert profile_schema.TEST_VIEWS.choices == views.VIEW_COUNTS
    for profile in ("smoke", "demo", "gpu"):
        data = yaml.safe_load((ROOT / "profiles" / f"{profile}.yaml").read_text())
        assert profile_schema.check_profile(data, profile, chain.stage_name) == []


def test_debug_shows_the_traceback(tmp_path, monkeypatch, capsys):
    def broken(*a, **k):
        raise ValueError("deep\ninside")

    monkeypatch.setattr(chain, "run_chain", broken)
    assert cli.main(["run", "--profile", "x"]) == 1
    assert (
        capsys.readouterr().err == "magseg-nb: ValueError: deep inside (run with --debug for the traceback)\n"
    )
    assert cli.main(["run", "--profile", "x", "--debug"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("Traceback (most recent call last)") and 'raise ValueError("deep' in err


# --- 8. Ctrl-C -----------------------------------------------------------------------------------


def test_an_orphaned_cell_task_that_finds_the_kernel_dead_prints_nothing(caplog):
    """The race behind a CI failure: after Ctrl-C, the cell's task ended with DeadKernelError that
    nobody awaited, and asyncio printed its traceback below the runner's one line."""
    import asyncio
    import gc
    import logging

    from nbclient.exceptions import DeadKernelError

    log, pm_log = logging.getLogger("asyncio"), logging.getLogger("papermill")
    installed = list(log.filters), list(pm_log.filters)  # cli.main, run by an earlier test, installs them
    log.filters[:], pm_log.filters[:] = [], []

    async def fails(err):
        raise err

    def orphan(err) -> None:
        loop = asyncio.new_event_loop()
        task = loop.create_task(fails(err))
        loop.run_until_complete(asyncio.sleep(0.01))
        assert task.done()
        loop.close()
        del task
        gc.collect()

    def logged(err) -> list[str]:
        caplog.clear()
        orphan(err)
        return [f"{r.getMessage()} {r.exc_info[1]!r}" for r in caplog.records if r.name == "asyncio"]

    assert "DeadKernelError('Kernel died')" in logged(DeadKernelError("Kernel died"))[0]  # before the fix
    cli.quiet_orphaned_cell_errors()
    cli.quiet_orphaned_cell_errors()
    try:
        assert logged(DeadKernelError("Kernel died")) == []
        lost = logged(ValueError("another bug"))  # other lost errors still show
        assert len(lost) == 1 and lost[0].startswith("Task exception was never retrieved")
        assert lost[0].endswith("ValueError('another bug')")
        assert sum(isinstance(f, cli._OrphanedCellError) for f in log.filters) == 1
        caplog.clear()
        pm_log.error("Kernel died while waiting for execute reply.")  # nbclient's line, through papermill
        pm_log.error("Timeout waiting for execute reply (5s).")
        assert [r.getMessage() for r in caplog.records] == ["Timeout waiting for execute reply (5s)."]
    finally:
        log.filters[:], pm_log.filters[:] = installed


def test_ctrl_c_prints_one_line_and_keeps_the_last_good_notebook(repo):
    run = repo / "runs" / "t"
    chain.run_chain("t", log=lambda *_: None)
    nbs = run / "notebooks"
    good = (nbs / "01_dataset_prep.ipynb").read_text()
    # 50 steps: a runner that did not react to the signal would finish and exit 0, not hang the test.
    _write_profile(repo, "t", seed=3, steps=50)
    proc = _runner(repo, "--profile", "t")
    partial = run / "01_dataset_prep.partial"
    _wait_for(_half_written(partial, 2), what="checkpoint-2")
    assert proc.poll() is None, "the run ended before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == cli.INTERRUPTED
    assert err.strip().splitlines()[-1] == (
        "magseg-nb: interrupted; finished stages are kept, rerun the same command to resume"
    )
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    _wait_for(lambda: not chain._pid_alive(int((partial / "kernel.pid").read_text())), timeout=10)
    assert (nbs / "01_dataset_prep.ipynb").read_text() == good  # the last good run's notebook
    assert "seed = 3" in (nbs / "01_dataset_prep.failed.ipynb").read_text()
    assert (nbs / "01_dataset_prep.kernel.log").read_text().startswith("[IPKernelApp]")  # not the terminal
    assert (run / "01_dataset_prep" / "adapter.txt").read_text() == "trained 4 steps, seed 1"
