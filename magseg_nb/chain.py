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
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import yaml

from magseg_nb import files, profile_schema, progress

STAGES: tuple[str, ...] = (
    "01_dataset_prep",
    "02_instruction_format",
    "03_sft",
    "04_grpo",
    "05_inference",
    "06_metrics",
    "07_resolution_study",
)
STATE_FILE = "state.json"
RESULTS_FILE = "results.json"
PARTIAL_SUFFIX = ".partial"
RUN_LOCK = ".run.lock"  # held by `magseg-nb run` for the whole chain (+ .holder.json beside it)
RUNNER_ENV = "MAGSEG_RUNNER_PID"  # set for the kernels the runner starts: they die with it
STAGE_LOCK_WAIT_S = 120.0  # how long a kernel waits for another kernel still writing its stage
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
        state = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        state, err_text = None, str(err)
    else:
        err_text = "not a JSON object with 'outputs'"
    if not isinstance(state, dict) or not isinstance(state.get("outputs"), dict):
        raise StageError(f"{path} is damaged ({err_text}); delete {stage_dir} and rerun that stage")
    return state


def _list_outputs(folder: Path, with_hash: bool = True) -> dict[str, dict]:
    outputs = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.relative_to(folder).as_posix() not in (STATE_FILE, RESULTS_FILE):
            rel = path.relative_to(folder).as_posix()
            # Checkpoints are resumable scratch, not outputs; hashing GBs of them would be slow.
            if "/checkpoints/" in f"/{rel}":
                continue
            st = path.stat()
            entry = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns}
            if with_hash:
                entry["sha256"] = files.sha256_file(path)
            outputs[rel] = entry
    return outputs


def output_problem(stage_dir: Path, state: dict) -> str | None:
    """None when every file listed in the state exists with its recorded size and SHA-256.

    Otherwise the first problem in words, naming the file (so a rerun says why it reruns).
    """
    stage_dir = Path(stage_dir)
    for rel, entry in state.get("outputs", {}).items():
        path = stage_dir / rel
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != entry.get("size"):
            return f"{path} changed size ({path.stat().st_size} bytes, state.json says {entry.get('size')})"
        if _unchanged_since_finish(path, entry):
            continue
        if "sha256" in entry and files.sha256_file(path) != entry["sha256"]:
            return f"{path} changed (its SHA-256 differs from the one in state.json)"
    return None


def _unchanged_since_finish(path: Path, entry: dict) -> bool:
    """True when the file's modification *and* inode-change times are the ones recorded at finish.

    Any write (a byte flipped in place, an edit, a copy over it) moves ``ctime``, which no user tool
    can set back, so such a file is hashed again; an untouched file is not, which keeps a cached
    rerun cheap (hashing every output cost ~7 % of it on the demo folder)."""
    if "ctime_ns" not in entry or "mtime_ns" not in entry:
        return False
    st = path.stat()
    return st.st_ctime_ns == entry["ctime_ns"] and st.st_mtime_ns == entry["mtime_ns"]


def outputs_intact(stage_dir: Path, state: dict) -> bool:
    """True when every file listed in the state exists with the recorded size and SHA-256."""
    return output_problem(stage_dir, state) is None


# --- locks and the kernel's life ------------------------------------------------------------------


def _pid_alive(pid: int) -> bool:
    """Whether a process runs (a zombie, killed but not yet reaped, counts as dead)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def _describe_holder(holder: dict) -> str:
    started = holder.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if started else "an unknown time"
    return f"PID {holder.get('pid')} (started {when}: {holder.get('command', '?')})"


class HeldLock:
    """An exclusive lock (``filelock``, released by the OS when its process dies) plus a record of
    who holds it, ``<lock>.holder.json``, so that the next one can say who holds it and notice a
    holder that died without releasing it."""

    def __init__(self, path: Path, what: str):
        from filelock import FileLock

        self.path, self.what = Path(path), what
        self.holder_path = self.path.with_name(self.path.name + ".holder.json")
        self._lock = FileLock(str(self.path), thread_local=False)

    def holder(self) -> dict:
        try:
            return json.loads(self.holder_path.read_text())
        except (OSError, ValueError):
            return {}

    def acquire(self, timeout: float = 0.0, log=print) -> HeldLock:
        from filelock import Timeout

        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._lock.acquire(timeout=timeout)
        except Timeout:
            raise StageError(
                f"{self.what} is locked by {_describe_holder(self.holder())}; wait for it to finish or "
                f"stop that process (lock file {self.path})"
            ) from None
        old = self.holder()
        if old.get("pid") and old.get("pid") != os.getpid():
            state = "which is no longer running" if not _pid_alive(int(old["pid"])) else "which let go of it"
            log(f"warning: taking over the lock on {self.what} from {_describe_holder(old)}, {state}")
        command = " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:200] if sys.argv else "?"
        files.write_json(self.holder_path, {"pid": os.getpid(), "started": time.time(), "command": command})
        return self

    def release(self) -> None:
        if self.holder().get("pid") == os.getpid():
            self.holder_path.unlink(missing_ok=True)
        self._lock.release()

    def __enter__(self) -> HeldLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


_STAGE_LOCKS: dict[str, HeldLock] = {}  # held by this process (a kernel) until it exits
_WATCHED: set[int] = set()


def _lock_stage(run_dir: Path, name: str) -> None:
    """A kernel holds its stage's lock until it exits: a rerun's kernel waits for an old one that is
    still dying, and a notebook opened in JupyterLab cannot write into a stage the runner writes."""
    key = str(run_dir / name)
    if key in _STAGE_LOCKS:
        return
    lock = HeldLock(run_dir / f".{name}.lock", f"stage {name} in {run_dir}")
    _STAGE_LOCKS[key] = lock.acquire(timeout=STAGE_LOCK_WAIT_S)


def kill_descendants() -> list[int]:
    """SIGKILL every process this one started, recursively; their PIDs."""
    procs = psutil.Process().children(recursive=True)
    for proc in procs:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    return [p.pid for p in procs]


_WATCH_RUNNER_LINE = "import magseg_nb.chain as _m; _m._die_with_runner(); del _m"


def _die_with_runner() -> None:
    """In a kernel started by the runner, stop this kernel (and its process group) when the runner
    is gone, even after a SIGKILL that gave it no chance to shut the kernel down. The runner's kernel
    manager runs this as the kernel's first line (``_WATCH_RUNNER_LINE``)."""
    pid = os.environ.get(RUNNER_ENV, "")
    if not pid.isdigit() or int(pid) == os.getpid() or int(pid) in _WATCHED:
        return
    runner = int(pid)
    _WATCHED.add(runner)
    child = os.getppid() == runner

    def watch() -> None:
        while (os.getppid() == runner) if child else _pid_alive(runner):
            time.sleep(0.2)
        print(f"the runner (PID {runner}) is gone: stopping this kernel", file=sys.stderr, flush=True)
        kill_descendants()  # worker pools (their forkserver too) may sit outside the process group
        if os.getpgrp() == os.getpid():  # a session leader (how jupyter_client starts kernels)
            os.killpg(os.getpid(), signal.SIGKILL)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="magseg-runner-watch", daemon=True).start()


# --- results.json ---------------------------------------------------------------------------------


def git_commit(root: Path | None = None) -> dict | None:
    """``{"commit": short hash, "dirty": tracked files changed}``, or None outside git."""
    root = root or repo_root()
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10
        )
        if head.returncode != 0:
            return None
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": head.stdout.strip(), "dirty": bool(status.stdout.strip())}


def cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The CPU's model name ("AMD EPYC", "Intel(R) Xeon(R) ..."), or the platform's processor string
    where there is no /proc/cpuinfo. Stage times depend on it: the same 2-core VM size has been drawn on
    hosts on which the demo took 24 to 35 minutes (README, benchmarks/README.md)."""
    try:
        for line in cpuinfo.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and value.strip():
                return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def cpu_info() -> dict:
    """CPU model and cores of the machine, and torch's intra-op threads (None when torch is not imported)."""
    torch = sys.modules.get("torch")
    threads = torch.get_num_threads() if torch is not None and hasattr(torch, "get_num_threads") else None
    return {"model": cpu_model(), "os_cpu_count": os.cpu_count(), "torch_threads": threads}


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

        progress.quiet_known_noise()
        name = stage_name(name)
        if "run_dir" not in params:
            raise StageError("the parameters cell must define run_dir (for example 'runs/demo')")
        run_dir = resolve_run_dir(params["run_dir"])
        _lock_stage(run_dir, name)
        inputs = {}
        for need in needs:
            need = stage_name(need)
            state = read_state(run_dir / need)
            if state is None:
                raise StageError(
                    f"stage {need} has no finished output in {run_dir / need}: run notebook {need}.ipynb "
                    f"first (magseg-nb run --profile {params.get('profile', '<profile>')} --to {need[:2]})"
                )
            problem = output_problem(run_dir / need, state)
            if problem:
                raise StageError(
                    f"stage {need} in {run_dir / need} is incomplete or was changed after it finished "
                    f"({problem}): rerun it (magseg-nb run --profile {params.get('profile', '<profile>')} "
                    f"--from {need[:2]} --to {need[:2]} --force)"
                )
            inputs[need] = state["fingerprint"]
        stage = cls(name, run_dir, dict(params), inputs, time.time())
        partial = stage.dir
        marker = partial / ".params.json"
        key = files.sha256_json({"params": stage.params, "inputs": inputs})
        if partial.exists():
            try:
                old = json.loads(marker.read_text()) if marker.exists() else {}
            except ValueError:
                old = {}
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

    def results(self, summary: dict[str, Any], finished: float) -> dict[str, Any]:
        """The machine-readable record of this stage's run (``results.json``)."""
        return {
            "stage": self.name,
            "git": git_commit(),
            "profile": self.params.get("profile"),
            "seed": self.params.get("seed"),
            "versions": package_versions(),
            "cpu": cpu_info(),
            "started": self.started,
            "finished": finished,
            "wall_s": round(finished - self.started, 3),
            "summary": summary,
        }

    def finish(self, summary: dict[str, Any] | None = None) -> Path:
        """Write state.json and results.json, move the partial folder into place; returns the final folder."""
        partial = self.dir
        (partial / ".params.json").unlink(missing_ok=True)
        outputs = _list_outputs(partial)
        if not outputs:
            raise StageError(f"stage {self.name} wrote no files into {partial}; nothing to finish")
        finished = time.time()
        state = {
            "stage": self.name,
            "params": self.params,
            "inputs": self.inputs,
            "outputs": outputs,
            "summary": summary or {},
            "versions": package_versions(),
            "started": self.started,
            "finished": finished,
        }
        # The fingerprint covers content only (sizes and hashes, not file times), so a rerun that
        # writes the same bytes leaves the stages after it cached.
        content = {rel: {k: e[k] for k in ("size", "sha256") if k in e} for rel, e in outputs.items()}
        state["fingerprint"] = files.sha256_json(
            {**{k: state[k] for k in ("stage", "params", "inputs")}, "outputs": content}
        )
        files.write_json(partial / RESULTS_FILE, self.results(summary or {}, finished), sort_keys=True)
        files.write_json(partial / STATE_FILE, state, sort_keys=True)
        final = self.final_dir
        trash = final.with_name(final.name + ".old")
        shutil.rmtree(trash, ignore_errors=True)
        if final.exists():
            os.replace(final, trash)
        os.replace(partial, final)
        shutil.rmtree(trash, ignore_errors=True)
        return final


# --- profiles -------------------------------------------------------------------------------------


def profile_path(profile: str) -> Path:
    """A profile name ('smoke') from ``profiles/`` in the repo, or a path to a YAML file."""
    path = Path(profile)
    if path.suffix in {".yaml", ".yml"}:
        if not path.is_file():
            raise StageError(f"profile file {path} does not exist")
        return path
    candidate = repo_root() / "profiles" / f"{profile}.yaml"
    if not candidate.exists():
        known = sorted(p.stem for p in (repo_root() / "profiles").glob("*.yaml"))
        raise StageError(f"no profile {profile!r} ({candidate} missing); known profiles: {', '.join(known)}")
    return candidate


def notebook_parameters() -> dict[str, set[str]]:
    """The parameters each existing notebook declares (its tagged parameters cell)."""
    import papermill

    return {
        stage: set(papermill.inspect_notebook(str(notebook_path(stage))).keys())
        for stage in STAGES
        if notebook_path(stage).exists()
    }


def load_profile(profile: str, declared: dict[str, set[str]] | None = None) -> dict[str, Any]:
    """Read and check a profile: ``common`` parameters for every notebook, ``stages`` per notebook.

    Every problem (YAML syntax, unknown keys, wrong types, values out of range) is reported at once,
    one line each, naming the file and the key (``magseg_nb.profile_schema``). ``declared`` (from
    :func:`notebook_parameters`) also accepts parameters that notebooks declare but the schema lacks.
    """
    path = profile_path(profile)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise StageError(f"{path}: not valid YAML{where}: {problem}; fix the file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise StageError(f"{path}: cannot be read ({err})") from None
    problems = profile_schema.check_profile(data, path, stage_name, declared)
    if problems:
        raise StageError("\n".join(problems))
    data = data or {}
    stages = {stage_name(k): v or {} for k, v in (data.get("stages") or {}).items()}
    common = dict(data.get("common") or {})
    common.setdefault("profile", path.stem)
    try:
        files.safe_id(common["profile"], "profile name")
    except files.UnsafeNameError as err:
        raise StageError(f"{path}: {err}; set common.profile") from None
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
    """Hash of the notebook's cell sources, the package's source and the shipped pretrained weights'
    SHA256SUMS: editing any of them (or rebuilding a shipped base) reruns a stage."""
    import nbformat

    nb = nbformat.read(nb_path, as_version=4)
    digest = hashlib.sha256()
    for cell in nb.cells:
        digest.update(cell.source.encode())
    for path in sorted(Path(__file__).parent.rglob("*.py")):
        digest.update(path.read_bytes())
    for path in sorted((repo_root() / "pretrained").glob("*/SHA256SUMS")):
        digest.update(path.read_bytes())
    return digest.hexdigest()


def run_key(stage: str, params: dict, nb_path: Path) -> str:
    return files.sha256_json({"stage": stage, "params": params, "code": _code_fingerprint(nb_path)})


def is_up_to_date(run_dir: Path, stage: str, key: str) -> tuple[bool, str]:
    """Whether a stage can be skipped, and why not (naming a changed file)."""
    state = read_state(run_dir / stage)
    if state is None:
        return False, "no finished output"
    if state.get("run_key") != key:
        return False, "parameters, notebook, package code or a shipped pretrained base changed"
    problem = output_problem(run_dir / stage, state)
    if problem:
        return False, f"output changed: {problem}"
    for need, fingerprint in state.get("inputs", {}).items():
        current = read_state(run_dir / need)
        if current is None or current.get("fingerprint") != fingerprint:
            return False, f"input stage {need} changed"
    return True, "up to date"


def executed_notebook(run_dir: Path, stage: str, kind: str = "") -> Path:
    """Where the runner keeps a stage's executed notebook: ``notebooks/<stage>.ipynb`` for the last
    good run, ``<stage>.running.ipynb`` while it runs, ``<stage>.failed.ipynb`` for the last failure."""
    return Path(run_dir) / "notebooks" / f"{stage}{'.' + kind if kind else ''}.ipynb"


def _logged_kernel_manager(log_path: Path):
    """A kernel manager whose kernel writes its own stdout/stderr (ipykernel's log, tracebacks of an
    interrupted cell, the runner watch) to ``log_path`` instead of the runner's terminal.

    The kernel talks to the runner over IPC (Unix sockets) rather than TCP on localhost: nothing
    listens on a port, and ipykernel has no reason to warn that TCP traffic is not encrypted."""

    from jupyter_client import AsyncKernelManager
    from traitlets import default

    class LoggedKernelManager(AsyncKernelManager):
        @default("transport")
        def _transport_default(self):
            return "ipc"

        @default("ip")
        def _ip_default(self):
            if self.transport != "ipc":
                return super()._ip_default()
            return os.path.join(tempfile.gettempdir(), f"magseg-kernel-{uuid.uuid4().hex[:12]}")

        async def _async_launch_kernel(self, kernel_cmd, **kw):
            # ipykernel's own parent poller would os._exit the kernel within a second of the runner's
            # death, racing the watch that first kills the kernel's children (seen in CI: a worker
            # outlived its kernel). parent_handle=1 ("the parent is init") is ipykernel's way to run
            # no poller while keeping the rest of its with-a-parent behaviour; the kernel starts the
            # watch itself, from its first line.
            kernel_cmd = [
                *kernel_cmd,
                "--IPKernelApp.parent_handle=1",
                f"--IPKernelApp.exec_lines={_WATCH_RUNNER_LINE}",
            ]
            with open(log_path, "ab") as log:  # the kernel keeps its own copy of the descriptor
                kw["stdout"] = kw["stderr"] = log
                return await super()._async_launch_kernel(kernel_cmd, **kw)

    return LoggedKernelManager


ENGINE_NAME = "magseg"


def _register_engine() -> str:
    """papermill's nbclient engine, telling ``on_cell(cells, index)`` when each cell starts."""
    from papermill.engines import NBClientEngine, papermill_engines

    class SectionEngine(NBClientEngine):
        @classmethod
        def execute_managed_notebook(cls, nb_man, kernel_name, on_cell=None, **kwargs):
            if on_cell is not None:
                start = nb_man.cell_start

                def cell_start(cell, cell_index=None, **kw):
                    if cell_index is not None:
                        on_cell(nb_man.nb.cells, cell_index)
                    return start(cell, cell_index, **kw)

                nb_man.cell_start = cell_start
            return super().execute_managed_notebook(nb_man, kernel_name, **kwargs)

    papermill_engines.register(ENGINE_NAME, SectionEngine)
    return ENGINE_NAME


def run_chain(
    profile: str,
    start: str | None = None,
    stop: str | None = None,
    force: bool = False,
    log=print,
    stream=None,
) -> list[dict]:
    """Execute the notebooks of a profile in order with papermill; returns one record per stage.

    The profile and every stage's parameters are checked before any stage starts. The run folder is
    locked for the whole run (a second run of it fails at once, naming the holder). ``stream``
    (default stdout) shows the section being executed and a live progress line.
    """
    declared = notebook_parameters()
    prof = load_profile(profile, declared)
    names = list(STAGES)
    first = names.index(stage_name(start)) if start else 0
    last = names.index(stage_name(stop)) if stop else len(names) - 1
    run_dir = resolve_run_dir(prof["common"]["run_dir"])
    plan = []
    for stage in names[first : last + 1]:
        nb_path = notebook_path(stage)
        if not nb_path.exists():
            plan.append((stage, nb_path, None))
            break
        plan.append((stage, nb_path, stage_parameters(prof, stage, declared[stage])))
    lock = HeldLock(run_dir / RUN_LOCK, f"run folder {run_dir}").acquire(log=log)
    previous = os.environ.get(RUNNER_ENV)
    os.environ[RUNNER_ENV] = str(os.getpid())
    try:
        (run_dir / "notebooks").mkdir(parents=True, exist_ok=True)
        return _run_plan(plan, run_dir, force, log, stream)
    finally:
        if previous is None:
            os.environ.pop(RUNNER_ENV, None)
        else:
            os.environ[RUNNER_ENV] = previous
        lock.release()


def _run_plan(plan: list, run_dir: Path, force: bool, log, stream=None) -> list[dict]:
    import papermill

    stream = stream or sys.stdout
    colour = progress.interactive(stream)
    engine = _register_engine()
    records = []
    for stage, nb_path, params in plan:
        if params is None:
            log(f"[{stage}] notebook {nb_path.name} does not exist yet; the chain stops here")
            break
        key = run_key(stage, params, nb_path)
        fresh, why = is_up_to_date(run_dir, stage, key)
        if fresh and not force:
            log(f"[{stage}] skipped: {why}")
            state = read_state(run_dir / stage) or {}
            records.append(
                {"stage": stage, "status": "skipped", "seconds": 0.0, "summary": state.get("summary")}
            )
            continue
        if force:  # start clean: no scratch (nor a broken checkpoint) from an earlier attempt
            shutil.rmtree(run_dir / f"{stage}{PARTIAL_SUFFIX}", ignore_errors=True)
        log(f"[{stage}] running ({why if not force else 'forced'})")
        t0 = time.time()
        running = executed_notebook(run_dir, stage, "running")
        failed = executed_notebook(run_dir, stage, "failed")
        kernel_log = run_dir / "notebooks" / f"{stage}.kernel.log"
        kernel_log.unlink(missing_ok=True)
        status_file = run_dir / "notebooks" / f"{stage}.progress.json"
        status_file.unlink(missing_ok=True)
        previous = os.environ.get(progress.ENV)
        os.environ[progress.ENV] = str(status_file)
        reporter = progress.Reporter(stage, status_file, stream=stream, tty=colour)
        try:
            with reporter:
                papermill.execute_notebook(
                    str(nb_path),
                    str(running),
                    parameters=params,
                    kernel_name=KERNEL_NAME,
                    cwd=str(nb_path.parent),
                    progress_bar=False,
                    engine_name=engine,
                    on_cell=reporter.cell_started,
                    stdout_file=progress.StreamSink(reporter.stdout),
                    stderr_file=progress.StreamSink(reporter.warning),
                    kernel_manager_class=_logged_kernel_manager(kernel_log),
                )
        except BaseException as err:
            if running.exists():
                os.replace(running, failed)  # the last good executed notebook stays in place
            if isinstance(err, papermill.PapermillExecutionError):
                raise StageError(
                    f"[{stage}] failed in cell {err.exec_count}: {err.ename}: {err.evalue}\n"
                    f"executed notebook with the traceback: {failed}"
                ) from None
            raise
        finally:
            if previous is None:
                os.environ.pop(progress.ENV, None)
            else:
                os.environ[progress.ENV] = previous
            status_file.unlink(missing_ok=True)
        state = read_state(run_dir / stage)
        if state is None or state.get("finished", 0) < t0:
            os.replace(running, failed)
            raise StageError(
                f"[{stage}] ran but wrote no new {STATE_FILE}: the notebook must call stage.finish() "
                f"(executed notebook: {failed})"
            )
        os.replace(running, executed_notebook(run_dir, stage))
        state["run_key"] = key
        files.write_json(run_dir / stage / STATE_FILE, state, sort_keys=True)
        seconds = time.time() - t0
        summary = state.get("summary", {})
        late = progress.stopped_early(summary)
        done = f"[{stage}] done in {progress.format_seconds(seconds)}"
        log(progress.red(f"{done}; stopped early: {', '.join(late)}", colour) if late else done)
        for line in progress.stage_lines(stage, summary, colour):
            log(f"  {line}")
        records.append({"stage": stage, "status": "ran", "seconds": seconds, "summary": summary})
    return records


def final_report(records: list[dict], profile: str, colour: bool = False) -> list[str]:
    """The lines printed at the end of ``magseg-nb run`` (headline numbers, times, output paths)."""

    prof = load_profile(profile)
    return progress.final_report(records, resolve_run_dir(prof["common"]["run_dir"]), repo_root(), colour)
