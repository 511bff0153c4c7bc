"""The notebooks follow the house rules: stripped, titled, a literal parameters cell, logic in the package."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import nbformat
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
COMMON = {"run_dir", "profile", "seed", "model_id"}
MAX_FUNCTION_LINES = 6


def _parameters_cell(nb):
    cells = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(cells) == 1, "exactly one cell must be tagged 'parameters'"
    return cells[0]


def _literal_assignments(source: str) -> dict:
    values = {}
    for node in ast.parse(source).body:
        assert isinstance(node, ast.Assign) and len(node.targets) == 1, (
            f"not a plain assignment: {ast.unparse(node)}"
        )
        values[node.targets[0].id] = ast.literal_eval(node.value)  # raises for anything but literals
    return values


def test_there_are_notebooks():
    assert NOTEBOOKS and NOTEBOOKS[0].name == "01_dataset_prep.ipynb"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_rules(path):
    nb = nbformat.read(path, as_version=4)
    assert nb.cells[0].cell_type == "markdown" and nb.cells[0].source.startswith("# "), (
        "first cell: the title"
    )
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, "commit notebooks without outputs"
            assert "sys.path" not in cell.source, "the package is installed; never edit sys.path"
            for node in ast.walk(ast.parse(cell.source.replace("%matplotlib inline", ""))):
                if isinstance(node, ast.FunctionDef | ast.ClassDef):
                    lines = node.end_lineno - node.lineno + 1
                    assert lines <= MAX_FUNCTION_LINES, (
                        f"{node.name} is {lines} lines: move it into magseg_nb"
                    )
    params = _literal_assignments(_parameters_cell(nb).source)
    assert COMMON <= set(params), f"missing common parameters {COMMON - set(params)}"
    assert params["profile"] == "demo" and params["run_dir"] == "runs/demo", "defaults are the demo profile"
    sources = "\n".join(c.source for c in nb.cells)
    assert "from magseg_nb" in sources and "Stage.start(" in sources and ".finish(" in sources


@pytest.mark.parametrize("profile", sorted((ROOT / "profiles").glob("*.yaml")), ids=lambda p: p.stem)
def test_profiles_only_set_declared_parameters(profile):
    from magseg_nb import chain

    data = chain.load_profile(str(profile))
    for stage, values in data["stages"].items():
        nb_path = ROOT / "notebooks" / f"{stage}.ipynb"
        assert nb_path.exists(), f"{profile.name} configures {stage}, which has no notebook"
        declared = set(_literal_assignments(_parameters_cell(nbformat.read(nb_path, as_version=4)).source))
        assert set(values) <= declared, f"{profile.name}: {set(values) - declared} unknown to {stage}"


def test_demo_profile_matches_notebook_defaults():
    """Opening a notebook in JupyterLab without the runner gives the demo profile."""
    demo = yaml.safe_load((ROOT / "profiles" / "demo.yaml").read_text())
    for stage, values in (demo.get("stages") or {}).items():
        nb = nbformat.read(ROOT / "notebooks" / f"{stage}.ipynb", as_version=4)
        defaults = _literal_assignments(_parameters_cell(nb).source)
        differ = {k: (v, defaults.get(k)) for k, v in (values or {}).items() if defaults.get(k) != v}
        assert not differ, f"{stage}: demo profile vs notebook default (profile, notebook): {differ}"


# Profiles that describe themselves as the demo with a few changes: what each may change. A change to
# the demo's data or recipe then reaches them too, or this test names the copy left behind.
DEMO_VARIANTS = {
    "check-seed1": {"common": {"seed"}, "03_sft": {"formats"}},
    "check-seed2": {"common": {"seed"}, "03_sft": {"formats"}},
    "check-hard": {
        "01_dataset_prep": {
            "bund_visibility",
            "bund_gap_frac",
            "same_crop_prob",
            "within_field_variance",
            "haze",
            "cloud_shadows",
            "noise",
        },
        "03_sft": {"formats"},
    },
}


@pytest.mark.parametrize("name", sorted(DEMO_VARIANTS))
def test_demo_variants_differ_from_the_demo_only_where_they_say(name):
    demo = yaml.safe_load((ROOT / "profiles" / "demo.yaml").read_text())
    other = yaml.safe_load((ROOT / "profiles" / f"{name}.yaml").read_text())
    allowed = DEMO_VARIANTS[name]
    sections = {"common": (demo["common"], other["common"])}
    # Stages a variant leaves out (notebook 07) are not run; those it keeps must match the demo's.
    sections |= {st: (demo["stages"][st] or {}, v or {}) for st, v in other["stages"].items()}
    for section, (a, b) in sections.items():
        differ = {k for k in set(a) | set(b) if a.get(k) != b.get(k)} - {"profile", "run_dir"}
        assert differ <= allowed.get(section, set()), (
            f"{name}.yaml {section} differs from demo.yaml in {differ - allowed.get(section, set())}"
        )
    assert other["common"]["profile"] == name and other["common"]["run_dir"] == f"runs/{name}"


MAX_CELL_LINES = 16  # a code cell longer than this holds logic that belongs in magseg_nb


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_code_cells_are_short(path):
    """Every code cell but the parameters cell (one literal a line) stays within MAX_CELL_LINES."""
    nb = nbformat.read(path, as_version=4)
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code" or "parameters" in cell.metadata.get("tags", []):
            continue
        n = len(cell.source.splitlines())
        assert n <= MAX_CELL_LINES, f"{path.name} cell {i} has {n} lines: move logic into magseg_nb"


def _notebook_defaults(stage: str) -> dict:
    return _literal_assignments(
        _parameters_cell(nbformat.read(ROOT / "notebooks" / f"{stage}.ipynb", 4)).source
    )


def _field_defaults(cls) -> dict:
    return {
        f.name: f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        for f in dataclasses.fields(cls)
    }


@pytest.mark.parametrize("stage, cls_name", [("03_sft", "SFTSettings"), ("04_grpo", "GRPOSettings")])
def test_training_defaults_have_one_source(stage, cls_name):
    """The settings dataclasses hold the defaults; the notebook's parameters cell repeats them exactly."""
    from magseg_nb import training

    defaults = _field_defaults(getattr(training, cls_name))
    params = _notebook_defaults(stage)
    shared = set(params) & set(defaults)
    assert {"learning_rate", "max_steps", "batch_size", "save_steps"} <= shared
    differ = {k: (params[k], defaults[k]) for k in shared if params[k] != defaults[k]}
    assert not differ, f"{stage} parameters vs training.{cls_name} defaults (notebook, dataclass): {differ}"


PATH_KEYS = {"base_model", "adapter_dir", "train_jsonl", "val_jsonl", "output_dir"}


@pytest.mark.parametrize(
    "config, profile, stage",
    [
        ("gpu_sft.yaml", "gpu", "03_sft"),
        ("gpu_grpo.yaml", "gpu", "04_grpo"),
        ("tiny_sft_cpu.yaml", "demo", "03_sft"),
    ],
)
def test_cli_configs_agree_with_their_profile(config, profile, stage):
    """`python -m magseg_nb.training --config X` trains what the profile's notebook would (paths aside)."""
    from magseg_nb import training

    cfg = yaml.safe_load((ROOT / "configs" / "training" / config).read_text())
    params = {
        **_notebook_defaults(stage),
        **yaml.safe_load((ROOT / "profiles" / f"{profile}.yaml").read_text())["stages"][stage],
    }
    if stage == "03_sft":
        cli, nb = training.SFTSettings(**cfg), training.sft_settings(params, "magseg", "b", "r", "o")
    else:
        cli, nb = training.GRPOSettings(**cfg), training.grpo_settings(params, "magseg", "b", "r", "a", "o")
    differ = {
        f.name: (getattr(cli, f.name), getattr(nb, f.name))
        for f in dataclasses.fields(cli)
        if f.name not in PATH_KEYS and getattr(cli, f.name) != getattr(nb, f.name)
    }
    assert not differ, (
        f"configs/training/{config} vs profiles/{profile}.yaml {stage} (config, profile): {differ}"
    )


def test_text4seg_grid_is_derived_not_typed():
    from magseg_nb import prompts

    assert "text4seg_grid" not in _notebook_defaults("02_instruction_format")
    for path in (ROOT / "profiles").glob("*.yaml"):
        assert "text4seg_grid:" not in path.read_text(), f"{path.name} types text4seg_grid by hand"
    assert prompts.effective_grid(4, 16) == 64
