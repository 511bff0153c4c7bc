"""The chain runner on two throwaway notebooks in a temporary repo (real papermill, real kernel)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import nbformat
import pytest
import yaml

from magseg_nb import chain, files

STAGE_CODE = """
from pathlib import Path
from magseg_nb.chain import Stage, collect_params
PARAMS = collect_params(globals())
stage = Stage.start("{name}", PARAMS, needs={needs})
{body}
stage.finish(summary={{"value": value}})
"""


def _notebook(path: Path, name: str, needs: list[str], body: str, params: str) -> None:
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_markdown_cell(f"# {name}"),
        nbformat.v4.new_code_cell(params, metadata={"tags": ["parameters"]}),
        nbformat.v4.new_code_cell(STAGE_CODE.format(name=name, needs=needs, body=body)),
    ]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)


@pytest.fixture()
def repo(tmp_path, monkeypatch):
    (tmp_path / "pyproject.toml").write_text("[project]\nname='x'\n")
    (tmp_path / "notebooks").mkdir()
    (tmp_path / "profiles").mkdir()
    params = 'run_dir = "runs/t"\nprofile = "t"\nseed = 0\nscale = 2\nfail = False\n'
    _notebook(
        tmp_path / "notebooks" / "01_dataset_prep.ipynb",
        "01_dataset_prep",
        [],
        'value = seed * scale\n(stage.dir / "data.txt").write_text(str(value))',
        params,
    )
    _notebook(
        tmp_path / "notebooks" / "02_instruction_format.ipynb",
        "02_instruction_format",
        ["01_dataset_prep"],
        'value = int((stage.input("01_dataset_prep") / "data.txt").read_text()) + 1\n'
        '(stage.dir / "half.txt").write_text("x")\n'
        'assert not fail, "asked to fail"\n'
        '(stage.dir / "out.txt").write_text(str(value))',
        params,
    )
    profile = {
        "description": "test",
        "common": {"profile": "t", "run_dir": "runs/t", "seed": 3},
        "stages": {},
    }
    (tmp_path / "profiles" / "t.yaml").write_text(yaml.safe_dump(profile))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _set_profile(repo: Path, **stages) -> None:
    path = repo / "profiles" / "t.yaml"
    data = yaml.safe_load(path.read_text())
    data["stages"] = stages
    path.write_text(yaml.safe_dump(data))


def test_runs_in_order_then_skips_and_reruns_on_change(repo):
    records = chain.run_chain("t", log=lambda *_: None)
    assert [r["status"] for r in records] == ["ran", "ran"]
    run = repo / "runs" / "t"
    assert (run / "01_dataset_prep" / "data.txt").read_text() == "6"  # seed 3 from common * scale 2
    assert (run / "02_instruction_format" / "out.txt").read_text() == "7"
    state = json.loads((run / "02_instruction_format" / "state.json").read_text())
    assert state["summary"] == {"value": 7}
    assert state["inputs"]["01_dataset_prep"] == chain.read_state(run / "01_dataset_prep")["fingerprint"]
    assert set(state["outputs"]) == {"half.txt", "out.txt"}
    assert (run / "notebooks" / "02_instruction_format.ipynb").exists()
    assert not list(run.glob("*.partial"))

    assert [r["status"] for r in chain.run_chain("t", log=lambda *_: None)] == ["skipped", "skipped"]

    # A parameter change in stage 01 reruns it, and 02 because its input changed.
    _set_profile(repo, **{"01": {"scale": 5}})
    assert [r["status"] for r in chain.run_chain("t", log=lambda *_: None)] == ["ran", "ran"]
    assert (run / "02_instruction_format" / "out.txt").read_text() == "16"


def test_failed_stage_keeps_the_last_good_output(repo):
    chain.run_chain("t", log=lambda *_: None)
    run = repo / "runs" / "t"
    _set_profile(repo, **{"02": {"fail": True}})
    with pytest.raises(chain.StageError, match=r"\[02_instruction_format\] failed .*asked to fail"):
        chain.run_chain("t", start="02", log=lambda *_: None)
    assert (run / "02_instruction_format" / "out.txt").read_text() == "7"  # untouched
    partial = run / "02_instruction_format.partial"
    assert (partial / "half.txt").exists() and not (partial / "out.txt").exists()


def test_missing_previous_stage_names_the_notebook_to_run(repo):
    with pytest.raises(chain.StageError, match=r"run notebook 01_dataset_prep.ipynb first"):
        chain.run_chain("t", start="02", log=lambda *_: None)


def test_changed_output_of_previous_stage_is_detected(repo):
    chain.run_chain("t", log=lambda *_: None)
    (repo / "runs" / "t" / "01_dataset_prep" / "data.txt").write_text("123456")
    fresh, why = chain.is_up_to_date(repo / "runs" / "t", "01_dataset_prep", "any")
    assert not fresh
    with pytest.raises(chain.StageError, match="incomplete or was changed"):
        chain.run_chain("t", start="02", force=True, log=lambda *_: None)


def test_profile_key_unknown_to_the_notebook_is_an_error(repo):
    _set_profile(repo, **{"01": {"tile_size": 64}})  # valid for the schema, unknown to this notebook
    with pytest.raises(chain.StageError, match=r"stages.01_dataset_prep sets \['tile_size'\]"):
        chain.run_chain("t", log=lambda *_: None)


def test_unknown_profile_lists_the_known_ones(repo):
    with pytest.raises(chain.StageError, match=r"no profile 'nope'.*known profiles: t"):
        chain.load_profile("nope")


def test_stage_names_and_params():
    assert chain.stage_name("3") == "03_sft"
    assert chain.stage_name("05_inference") == "05_inference"
    with pytest.raises(chain.StageError, match="unknown stage"):
        chain.stage_name("09")
    ns = {"a": 1, "b": (1, 2), "_x": 2, "In": [], "f": print, "os": os}
    assert chain.collect_params(ns) == {"a": 1, "b": [1, 2]}


def test_partial_folder_is_kept_only_for_the_same_parameters(tmp_path):
    params = {"run_dir": str(tmp_path), "lr": 1}
    first = chain.Stage.start("03_sft", params)
    (first.dir / "checkpoint.bin").write_text("x")
    assert (chain.Stage.start("03_sft", params).dir / "checkpoint.bin").exists()
    assert not (chain.Stage.start("03_sft", {**params, "lr": 2}).dir / "checkpoint.bin").exists()


def test_cpu_model_reads_the_model_name_and_falls_back_to_the_platform(tmp_path, monkeypatch):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC\n\nprocessor\t: 1\n")
    assert chain.cpu_model(info) == "AMD EPYC"
    monkeypatch.setattr(chain.platform, "processor", lambda: "arm")
    assert chain.cpu_model(tmp_path / "missing") == "arm"  # macOS, Windows: no /proc/cpuinfo
    info.write_text("processor\t: 0\nmodel name\t:   \n")  # an empty name is not a name
    assert chain.cpu_model(info) == "arm"


def test_finish_writes_results_json(tmp_path, monkeypatch):
    import subprocess
    import sys

    import torch  # noqa: F401 - results.json reports torch's threads when torch is imported

    repo = tmp_path / "repo"
    (repo / "notebooks").mkdir(parents=True)
    (repo / "pyproject.toml").write_text("[project]\nname='x'\n")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q", str(repo)], check=True)
    subprocess.run([*git, "-C", str(repo), "add", "pyproject.toml"], check=True)
    subprocess.run([*git, "-C", str(repo), "commit", "-qm", "x"], check=True)
    head = subprocess.run(
        ["git", "-C", str(repo), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    monkeypatch.chdir(repo)
    params = {"run_dir": str(repo / "runs" / "r"), "profile": "r", "seed": 7}
    stage = chain.Stage.start("01", params)
    (stage.dir / "a.txt").write_text("a")
    clock = iter([stage.started + 2.5])
    monkeypatch.setattr(chain.time, "time", lambda: next(clock))
    final = stage.finish(summary={"dice": 0.5})
    res = json.loads((final / "results.json").read_text())
    assert res["stage"] == "01_dataset_prep" and res["profile"] == "r" and res["seed"] == 7
    assert res["git"] == {"commit": head, "dirty": False}
    assert res["versions"] == chain.package_versions()
    assert res["cpu"] == {
        "model": chain.cpu_model(),
        "os_cpu_count": os.cpu_count(),
        "torch_threads": sys.modules["torch"].get_num_threads(),
    }
    assert res["wall_s"] == 2.5 and res["summary"] == {"dice": 0.5}
    state = chain.read_state(final)
    assert set(state["outputs"]) == {"a.txt"}  # results.json is a record, not an output
    assert res["finished"] == state["finished"]

    # A tracked file changed: dirty. Outside git: None.
    (repo / "pyproject.toml").write_text("[project]\nname='y'\n")
    assert chain.git_commit(repo) == {"commit": head, "dirty": True}
    outside = tmp_path / "plain"
    outside.mkdir()
    assert chain.git_commit(outside) is None


def test_cached_output_is_verified_by_hash_and_named(repo):
    chain.run_chain("t", log=lambda *_: None)
    run = repo / "runs" / "t"
    data = run / "01_dataset_prep" / "data.txt"
    data.write_text("9")  # same size as "6", other bytes
    logs = []
    records = chain.run_chain("t", log=logs.append)
    assert [r["status"] for r in records] == ["ran", "skipped"]  # 02's input fingerprint is unchanged
    assert f"[01_dataset_prep] running (output changed: {data} changed (its SHA-256 differs" in logs[0]
    assert data.read_text() == "6"


def test_executed_notebook_of_a_failed_run_does_not_replace_the_good_one(repo):
    chain.run_chain("t", log=lambda *_: None)
    nbs = repo / "runs" / "t" / "notebooks"
    good = (nbs / "02_instruction_format.ipynb").read_text()
    _set_profile(repo, **{"02": {"fail": True}})
    with pytest.raises(chain.StageError, match=r"02_instruction_format\.failed\.ipynb"):
        chain.run_chain("t", start="02", log=lambda *_: None)
    assert (nbs / "02_instruction_format.ipynb").read_text() == good
    failed = (nbs / "02_instruction_format.failed.ipynb").read_text()
    assert "asked to fail" in failed and "fail = True" in failed
    assert sorted(p.name for p in nbs.iterdir()) == [
        "01_dataset_prep.ipynb",
        "01_dataset_prep.kernel.log",
        "02_instruction_format.failed.ipynb",
        "02_instruction_format.ipynb",
        "02_instruction_format.kernel.log",
    ]


def test_the_runner_shows_sections_progress_and_a_readable_summary(repo):
    """A stage that writes the status file (as the training callback does) and prints inference-style
    tile counts: the runner shows its sections and a plain progress line, then a short summary."""
    import io

    nb = nbformat.read(repo / "notebooks" / "01_dataset_prep.ipynb", as_version=4)
    nb.cells.insert(2, nbformat.v4.new_markdown_cell("## Training the thing"))
    nb.cells[3].source = nb.cells[3].source.replace(
        "value = seed * scale",
        "import time\nfrom magseg_nb import progress\n"
        "progress.write_status('training 01/magseg', 3, 12, time.time() - 6, loss=1.25)\n"
        "time.sleep(2.5)\nvalue = seed * scale",
    )
    nbformat.write(nb, repo / "notebooks" / "01_dataset_prep.ipynb")
    out, logs = io.StringIO(), []
    records = chain.run_chain("t", stop="01", log=logs.append, stream=out)
    text = out.getvalue()
    assert "[01_dataset_prep] Training the thing\n" in text
    line = next(x for x in text.splitlines() if "step 3/12" in x)
    assert line.startswith("[01_dataset_prep] training 01/magseg · step 3/12 · loss 1.250 · ")
    assert "elapsed" in line and "~18 s left" in line  # 6 s for 3 steps, 9 steps to go
    assert "\r" not in text and "\033[" not in text  # not a terminal: plain lines only
    assert logs[-1] == "  value 6" and logs[-2].startswith("[01_dataset_prep] done in ")
    assert records[0]["summary"] == {"value": 6}
    assert not (repo / "runs" / "t" / "notebooks" / "01_dataset_prep.progress.json").exists()
    kernel_log = (repo / "runs" / "t" / "notebooks" / "01_dataset_prep.kernel.log").read_text()
    assert "without encryption" not in kernel_log  # the kernel talks over IPC, not TCP


def test_final_report_lists_times_and_relative_paths(repo):
    records = chain.run_chain("t", log=lambda *_: None, stream=open(os.devnull, "w"))
    lines = chain.final_report(records, "t")
    text = "\n".join(lines)
    import re

    assert re.search(r"01_dataset_prep +ran +\d+ s", text) and re.search(r"02_instruction_format +ran", text)
    assert "executed notebooks " in text and "runs/t/notebooks" in text and str(repo) not in text


def test_untouched_outputs_are_not_rehashed_but_an_in_place_edit_is(tmp_path, monkeypatch):
    stage = chain.Stage.start("01", {"run_dir": str(tmp_path / "r")})
    (stage.dir / "mask.bin").write_bytes(b"\x00" * 64)
    final = stage.finish()
    state = chain.read_state(final)
    hashed = []
    real = files.sha256_file
    monkeypatch.setattr(files, "sha256_file", lambda p, *a: hashed.append(p) or real(p, *a))
    assert chain.output_problem(final, state) is None and hashed == []  # times unchanged: trusted
    path = final / "mask.bin"
    mtime = path.stat().st_mtime_ns
    with open(path, "r+b") as fh:  # a same-size byte flip, mtime put back as a careful editor would
        fh.write(b"\x01")
    os.utime(path, ns=(mtime, mtime))
    problem = chain.output_problem(final, state)
    assert hashed == [path] and problem == f"{path} changed (its SHA-256 differs from the one in state.json)"
    # The fingerprint ignores file times: the same bytes finished again give the same fingerprint.
    again = chain.Stage.start("01", {"run_dir": str(tmp_path / "r")})
    (again.dir / "mask.bin").write_bytes(b"\x00" * 64)
    assert chain.read_state(again.finish())["fingerprint"] == state["fingerprint"]


def test_a_rebuilt_shipped_base_reruns_the_stages(repo):
    """The shipped weights are data the stages read: a new SHA256SUMS (a rebuilt base) reruns them."""
    assert [r["status"] for r in chain.run_chain("t", log=lambda *_: None)] == ["ran", "ran"]
    sums = repo / "pretrained" / "tiny-base" / "SHA256SUMS"
    sums.parent.mkdir(parents=True)
    sums.write_text("0" * 64 + "  model.safetensors\n")
    key = chain.run_key("01_dataset_prep", {}, chain.notebook_path("01_dataset_prep"))
    assert chain.run_chain("t", log=lambda *_: None)[0]["status"] == "ran"
    assert [r["status"] for r in chain.run_chain("t", log=lambda *_: None)] == ["skipped", "skipped"]
    sums.write_text("1" * 64 + "  model.safetensors\n")
    assert key != chain.run_key("01_dataset_prep", {}, chain.notebook_path("01_dataset_prep"))
    assert [r["status"] for r in chain.run_chain("t", log=lambda *_: None)] == ["ran", "ran"]
