"""The notebook chain: stages, their state files, profiles, and the papermill runner.

A stage writes into ``<run_dir>/<stage>.partial/`` and ``Stage.finish`` renames it to
``<run_dir>/<stage>/`` after writing ``state.json``, so a failed run never leaves half-written
outputs in place of good ones.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from magseg_nb import files

STAGES: tuple[str, ...] = (
    "01_dataset_prep",
    "02_instruction_format",
    "03_sft",
    "04_grpo",
    "05_inference",
    "06_metrics",
)
STATE_FILE = "state.json"
PARTIAL_SUFFIX = ".partial"
KERNEL_NAME = "python3"
_VERSIONED = ("magseg-nb", "torch", "transformers", "trl", "peft", "rasterio", "segment-anything", "numpy")
_IPYTHON_NAMES = {"In", "Out", "exit", "quit", "get_ipython"}


class StageError(RuntimeError):
    """A stage cannot start or finish; the message says what to run or fix."""


def repo_root(start: Path | None = None) -> Path:
    """The folder holding ``pyproject.toml`` above ``start`` (default: cwd), else cwd."""
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / "pyproject.toml").exists() and (folder / "notebooks").is_dir():
            return folder
    return here


def resolve_run_dir(run_dir: str | os.PathLike) -> Path:
    """Relative run folders are taken from the repo root, so notebooks opened in notebooks/ agree."""
    path = Path(run_dir)
    return path if path.is_absolute() else repo_root() / path


def stage_name(key: str) -> str:
    """'3', '03' or '03_sft' -> '03_sft'."""
    key = str(key).strip()
    for name in STAGES:
        if name == key or name.split("_", 1)[0] == key.zfill(2):
            return name
    raise StageError(f"unknown stage {key!r}; stages are {', '.join(STAGES)}")


def collect_params(namespace: dict[str, Any]) -> dict[str, Any]:
    """The literal values of a notebook's parameters cell (call it right after that cell)."""
    literal = (str, int, float, bool, type(None), list, dict, tuple)
    out = {}
    for name, value in namespace.items():
        if name.startswith("_") or name in _IPYTHON_NAMES or not isinstance(value, literal):
            continue
        out[name] = list(value) if isinstance(value, tuple) else value
    return dict(sorted(out.items()))


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _hash_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def package_versions() -> dict[str, str]:
    versions = {}
    for name in _VERSIONED:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def read_state(stage_dir: Path) -> dict | None:
    path = Path(stage_dir) / STATE_FILE
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise StageError(
            f"{path} is not valid JSON ({err}); delete {stage_dir} and rerun that stage"
        ) from err


def _list_outputs(folder: Path, with_hash: bool = True) -> dict[str, dict]:
    outputs = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.name != STATE_FILE:
            rel = path.relative_to(folder).as_posix()
            # Checkpoints are resumable scratch, not outputs; hashing GBs of them would be slow.
            if "/checkpoints/" in f"/{rel}":
                continue
            entry = {"size": path.stat().st_size}
            if with_hash:
                entry["sha256"] = sha256_file(path)
            outputs[rel] = entry
    return outputs


def outputs_intact(stage_dir: Path, state: dict) -> bool:
    """True when every file listed in the state exists with the recorded size."""
    for rel, entry in state.get("outputs", {}).items():
        path = Path(stage_dir) / rel
        if not path.is_file() or path.stat().st_size != entry["size"]:
            return False
    return True


@dataclass
class Stage:
    """One stage of the chain, opened by its notebook."""

    name: str
    run_dir: Path
    params: dict[str, Any]
    inputs: dict[str, str]  # needed stage -> its fingerprint when this stage started
    started: float

    @classmethod
    def start(cls, name: str, params: dict[str, Any], needs: list[str] | tuple[str, ...] = ()) -> Stage:
        """Open a stage: check the stages it needs, prepare ``<run_dir>/<name>.partial``."""
        name = stage_name(name)
        if "run_dir" not in params:
            raise StageError("the parameters cell must define run_dir (for example 'runs/demo')")
        run_dir = resolve_run_dir(params["run_dir"])
        inputs = {}
        for need in needs:
            need = stage_name(need)
            state = read_state(run_dir / need)
            if state is None:
                raise StageError(
                    f"stage {need} has no finished output in {run_dir / need}: run notebook {need}.ipynb "
                    f"first (magseg-nb run --profile {params.get('profile', '<profile>')} --to {need[:2]})"
                )
            if not outputs_intact(run_dir / need, state):
                raise StageError(
                    f"stage {need} in {run_dir / need} is incomplete or was changed after it finished: "
                    f"rerun it (magseg-nb run --profile {params.get('profile', '<profile>')} "
                    f"--from {need[:2]} --to {need[:2]} --force)"
                )
            inputs[need] = state["fingerprint"]
        stage = cls(name, run_dir, dict(params), inputs, time.time())
        partial = stage.dir
        marker = partial / ".params.json"
        key = _hash_json({"params": stage.params, "inputs": inputs})
        if partial.exists():
            old = json.loads(marker.read_text()) if marker.exists() else {}
            if old.get("key") != key:  # different settings: the scratch cannot be reused
                shutil.rmtree(partial)
        partial.mkdir(parents=True, exist_ok=True)
        files.write_json(marker, {"key": key}, sort_keys=True)
        return stage

    @property
    def dir(self) -> Path:
        return self.run_dir / f"{self.name}{PARTIAL_SUFFIX}"

    @property
    def final_dir(self) -> Path:
        return self.run_dir / self.name

    def input(self, need: str) -> Path:
        need = stage_name(need)
        if need not in self.inputs:
            raise StageError(f"{self.name} did not declare {need} in needs=[...] of Stage.start")
        return self.run_dir / need

    def finish(self, summary: dict[str, Any] | None = None) -> Path:
        """Write state.json and move the partial folder into place; returns the final folder."""
        partial = self.dir
        (partial / ".params.json").unlink(missing_ok=True)
        outputs = _list_outputs(partial)
        if not outputs:
            raise StageError(f"stage {self.name} wrote no files into {partial}; nothing to finish")
        state = {
            "stage": self.name,
            "params": self.params,
            "inputs": self.inputs,
            "outputs": outputs,
            "summary": summary or {},
            "versions": package_versions(),
            "started": self.started,
            "finished": time.time(),
        }
        state["fingerprint"] = _hash_json({k: state[k] for k in ("stage", "params", "inputs", "outputs")})
        files.write_json(partial / STATE_FILE, state, sort_keys=True)
        final = self.final_dir
        if final.exists():
            trash = final.with_name(final.name + ".old")
            shutil.rmtree(trash, ignore_errors=True)
            os.replace(final, trash)
            os.replace(partial, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(partial, final)
        return final


# --- profiles -------------------------------------------------------------------------------------


def profile_path(profile: str) -> Path:
    """A profile name ('smoke') from ``profiles/`` in the repo, or a path to a YAML file."""
    path = Path(profile)
    if path.suffix in {".yaml", ".yml"}:
        if not path.exists():
            raise StageError(f"profile file {path} does not exist")
        return path
    candidate = repo_root() / "profiles" / f"{profile}.yaml"
    if not candidate.exists():
        known = sorted(p.stem for p in (repo_root() / "profiles").glob("*.yaml"))
        raise StageError(f"no profile {profile!r} ({candidate} missing); known profiles: {', '.join(known)}")
    return candidate


def load_profile(profile: str) -> dict[str, Any]:
    """Read a profile: ``common`` parameters for every notebook, ``stages`` per notebook."""
    path = profile_path(profile)
    data = yaml.safe_load(path.read_text()) or {}
    unknown = set(data) - {"description", "common", "stages"}
    if unknown:
        raise StageError(f"{path}: unknown top-level keys {sorted(unknown)}; use description/common/stages")
    stages = {stage_name(k): v or {} for k, v in (data.get("stages") or {}).items()}
    common = dict(data.get("common") or {})
    common.setdefault("profile", path.stem)
    common.setdefault("run_dir", f"runs/{common['profile']}")
    return {"path": path, "description": data.get("description", ""), "common": common, "stages": stages}


def stage_parameters(profile: dict, stage: str, notebook_params: set[str]) -> dict[str, Any]:
    """The parameters to inject into one notebook: common keys it declares, plus its own section."""
    own = profile["stages"].get(stage, {})
    missing = set(own) - notebook_params
    if missing:
        raise StageError(
            f"{profile['path']}: stages.{stage} sets {sorted(missing)}, which notebook {stage}.ipynb "
            f"has no parameter for; its parameters are {sorted(notebook_params)}"
        )
    params = {k: v for k, v in profile["common"].items() if k in notebook_params}
    params.update(own)
    params["run_dir"] = str(resolve_run_dir(params.get("run_dir", profile["common"]["run_dir"])))
    return params


# --- the runner -----------------------------------------------------------------------------------


def notebook_path(stage: str) -> Path:
    return repo_root() / "notebooks" / f"{stage}.ipynb"


def _code_fingerprint(nb_path: Path) -> str:
    """Hash of the notebook's cell sources and the package's source: editing either reruns a stage."""
    import nbformat

    nb = nbformat.read(nb_path, as_version=4)
    digest = hashlib.sha256()
    for cell in nb.cells:
        digest.update(cell.source.encode())
    for path in sorted(Path(__file__).parent.rglob("*.py")):
        digest.update(path.read_bytes())
    return digest.hexdigest()


def run_key(stage: str, params: dict, nb_path: Path) -> str:
    return _hash_json({"stage": stage, "params": params, "code": _code_fingerprint(nb_path)})


def is_up_to_date(run_dir: Path, stage: str, key: str) -> tuple[bool, str]:
    """Whether a stage can be skipped, and why not."""
    state = read_state(run_dir / stage)
    if state is None:
        return False, "no finished output"
    if state.get("run_key") != key:
        return False, "parameters, notebook or package code changed"
    if not outputs_intact(run_dir / stage, state):
        return False, "outputs missing or changed"
    for need, fingerprint in state.get("inputs", {}).items():
        current = read_state(run_dir / need)
        if current is None or current.get("fingerprint") != fingerprint:
            return False, f"input stage {need} changed"
    return True, "up to date"


def run_chain(
    profile: str,
    start: str | None = None,
    stop: str | None = None,
    force: bool = False,
    log=print,
) -> list[dict]:
    """Execute the notebooks of a profile in order with papermill; returns one record per stage."""
    import papermill

    prof = load_profile(profile)
    names = list(STAGES)
    first = names.index(stage_name(start)) if start else 0
    last = names.index(stage_name(stop)) if stop else len(names) - 1
    run_dir = resolve_run_dir(prof["common"]["run_dir"])
    (run_dir / "notebooks").mkdir(parents=True, exist_ok=True)
    records = []
    for stage in names[first : last + 1]:
        nb_path = notebook_path(stage)
        if not nb_path.exists():
            log(f"[{stage}] notebook {nb_path.name} does not exist yet; the chain stops here")
            break
        declared = set(papermill.inspect_notebook(str(nb_path)).keys())
        params = stage_parameters(prof, stage, declared)
        key = run_key(stage, params, nb_path)
        fresh, why = is_up_to_date(run_dir, stage, key)
        if fresh and not force:
            log(f"[{stage}] skipped: {why}")
            records.append({"stage": stage, "status": "skipped", "seconds": 0.0})
            continue
        log(f"[{stage}] running ({why if not force else 'forced'})")
        t0 = time.time()
        out_nb = run_dir / "notebooks" / nb_path.name
        try:
            papermill.execute_notebook(
                str(nb_path),
                str(out_nb),
                parameters=params,
                kernel_name=KERNEL_NAME,
                cwd=str(nb_path.parent),
                progress_bar=False,
            )
        except papermill.PapermillExecutionError as err:
            raise StageError(
                f"[{stage}] failed in cell {err.exec_count}: {err.ename}: {err.evalue}\n"
                f"executed notebook with the traceback: {out_nb}"
            ) from None
        state = read_state(run_dir / stage)
        if state is None:
            raise StageError(
                f"[{stage}] ran but wrote no {STATE_FILE}: the notebook must call stage.finish()"
            )
        state["run_key"] = key
        files.write_json(run_dir / stage / STATE_FILE, state, sort_keys=True)
        seconds = time.time() - t0
        log(
            f"[{stage}] done in {seconds:.0f} s; summary: {json.dumps(state.get('summary', {}), default=str)}"
        )
        records.append({"stage": stage, "status": "ran", "seconds": seconds, "summary": state.get("summary")})
    return records
