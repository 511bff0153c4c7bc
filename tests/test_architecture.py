"""ARCHITECTURE.md stays true: every module's package imports follow the stated directions."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "magseg_nb"
HEAVY = {"torch", "transformers", "trl", "peft", "segment_anything", "leafmap"}
RUNNER = {"chain", "profile_schema", "cli", "report", "seed_spread", "readme_figures"}
MODELS = {
    "models",
    "tiny_base",
    "training",
    "side_by_side",
    "pretraining",
    "inference",
    "validation",
    "study",
}
DATA = {"geo", "landscape", "manifest", "prompts", "tile_conversations"}
# module -> package modules it must not import (ARCHITECTURE.md, "Rooms")
FORBIDDEN = {
    "labels": "*",
    "files": "*",
    "layout": "* except files",
    "progress": "* except files",
    "metrics": "* except labels",
    "textgrid": "* except labels",
    "rewards": "* except labels textgrid",
    "evaluation": "* except files labels layout metrics prompts",  # prompts: 02's formats.json reader
    **{m: RUNNER | MODELS | {"evaluation", "viz"} for m in DATA},
    **{
        m: RUNNER | MODELS | {"evaluation", "viz"}
        for m in ("instances", "refine", "baseline", "pixel_baseline")
    },
    **{m: RUNNER - {"profile_schema"} for m in MODELS},
}
KNOWN_EXCEPTIONS: set[tuple[str, str]] = set()  # e.g. {("geo", "chain")} while hashing lives in chain


def modules() -> dict[str, Path]:
    return {".".join(p.relative_to(PKG).with_suffix("").parts): p for p in sorted(PKG.rglob("*.py"))}


def package_imports(path: Path) -> set[str]:
    """Package modules imported anywhere in the file (top level or inside functions)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path.name}: relative import of {node.module}; use absolute imports"
            if node.module == "magseg_nb":
                out |= {a.name for a in node.names}
            elif node.module and node.module.startswith("magseg_nb."):
                out.add(node.module.removeprefix("magseg_nb."))
        elif isinstance(node, ast.Import):
            out |= {a.name.removeprefix("magseg_nb.") for a in node.names if a.name.startswith("magseg_nb.")}
    return {m.removesuffix(".__init__") for m in out}


def forbidden_for(module: str) -> set[str] | str:
    rule = FORBIDDEN.get(module)
    if rule is None:
        return set()
    if isinstance(rule, str):
        allowed = set(rule.split(" except ")[1].split()) if " except " in rule else set()
        return {m for m in modules() if m.split(".")[0] not in allowed} - {module}
    return rule


@pytest.mark.parametrize("module", sorted(modules()))
def test_imports_follow_the_stated_directions(module):
    imported = package_imports(modules()[module])
    bad = {m for m in imported if m.split(".")[0] in forbidden_for(module) or m in forbidden_for(module)}
    bad -= {m for mod, m in KNOWN_EXCEPTIONS if mod == module}
    if module.startswith("viz"):
        bad |= {m for m in imported if m.split(".")[0] in {"chain", "cli"}}
    assert not bad, f"{module} imports {sorted(bad)} against ARCHITECTURE.md"


def test_nothing_below_the_runner_imports_it():
    for module, path in modules().items():
        if module.split(".")[0] in RUNNER or module == "__init__":
            continue
        assert not package_imports(path) & (RUNNER - {"profile_schema"}), f"{module} imports the runner"


def test_heavy_libraries_are_imported_inside_functions_only():
    for module, path in modules().items():
        for node in ast.parse(path.read_text()).body:  # module level only
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            heavy = {n.split(".")[0] for n in names} & HEAVY
            assert not heavy, (
                f"{module} imports {heavy} at module level (optional, heavy: import inside the function)"
            )


def test_the_checker_catches_a_wrong_direction(tmp_path):
    bad = tmp_path / "m.py"
    bad.write_text("from magseg_nb import chain\nfrom magseg_nb.metrics import x\n")
    assert package_imports(bad) == {"chain", "metrics"}
    assert "chain" in forbidden_for("geo") and "geo" in forbidden_for("metrics")
    bad.write_text("from .metrics import x\n")
    with pytest.raises(AssertionError, match="relative import"):
        package_imports(bad)
