"""pyproject.toml and environment.yml describe the same installation."""

import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _name_version(spec: str) -> tuple[str, str]:
    match = re.match(r"^([A-Za-z0-9_.\-]+)\s*(?:==?\s*([^\s;]+))?", spec)
    return match.group(1).lower().replace("_", "-"), match.group(2) or ""


def test_conda_environment_matches_pyproject_core_dependencies():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = dict(_name_version(s) for s in project["dependencies"])
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    conda = {}
    pip_lines = []
    for dep in env["dependencies"]:
        if isinstance(dep, dict):
            pip_lines += dep["pip"]
        elif not dep.startswith(("python=", "pip")):
            name, version = _name_version(dep)
            conda[name] = version
    assert set(conda) == set(core), (
        f"only in environment.yml: {set(conda) - set(core)}; only in pyproject: {set(core) - set(conda)}"
    )
    assert {n: v for n, v in conda.items() if v != core[n]} == {}, "versions differ"
    assert "-e .[all]" in pip_lines  # the extras (train, sam, maps, dev) come from pyproject via pip


def test_every_extra_is_pinned():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for extra, specs in project["optional-dependencies"].items():
        for spec in specs:
            if spec.startswith("magseg-nb"):
                continue
            assert "==" in spec, f"extra {extra}: {spec} is not pinned to a tested version"
