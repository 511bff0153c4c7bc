import json

import numpy as np
import pytest

from magseg_nb import files


def test_write_json_numpy_values_and_sorted_keys(tmp_path):
    path = files.write_json(
        tmp_path / "a.json", {"b": np.int64(3), "a": np.array([1.5, 2.0])}, sort_keys=True
    )
    text = path.read_text()
    assert json.loads(text) == {"a": [1.5, 2.0], "b": 3}
    assert text.index('"a"') < text.index('"b"')
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_write_jsonl_one_object_per_line(tmp_path):
    path = files.write_jsonl(tmp_path / "r.jsonl", [{"i": np.float32(0.5)}, {"i": 2}])
    assert [json.loads(line) for line in path.read_text().splitlines()] == [{"i": 0.5}, {"i": 2}]


def test_failed_write_keeps_the_old_file_and_no_temporary(tmp_path):
    path = files.write_jsonl(tmp_path / "r.jsonl", [{"old": 1}])

    def rows():
        yield {"new": 1}
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        files.write_jsonl(path, rows())
    assert path.read_text() == '{"old": 1}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.jsonl"]


def test_write_text_replaces_and_cleans_up_when_the_rename_fails(tmp_path, monkeypatch):
    path = files.write_text(tmp_path / "t.md", "first")
    monkeypatch.setattr(files.os, "replace", lambda *a: (_ for _ in ()).throw(OSError("read-only")))
    with pytest.raises(OSError, match="read-only"):
        files.write_text(path, "second")
    assert path.read_text() == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.md"]


@pytest.mark.parametrize("good", ["s0_r0_c1__p2_3", "IN_123", "vietnam", "a.b-c+d=e", 5])
def test_safe_id_accepts_plain_names(good):
    assert files.safe_id(good) == str(good)


@pytest.mark.parametrize(
    "bad",
    ["..", "../x", "a/../b", "/etc", "a/b", "a\\b", "", ".hidden", "a..b", "x y", "<script>", None, True],
)
def test_safe_id_refuses_what_could_leave_a_folder_or_inject_markup(bad):
    with pytest.raises(files.UnsafeNameError, match=r"aoi_id .* cannot be used as a file name"):
        files.safe_id(bad, "aoi_id")


def test_safe_path_stays_inside_its_root(tmp_path):
    assert files.safe_path(tmp_path, "a", "b") == tmp_path / "a" / "b"
    (tmp_path / "link").symlink_to(tmp_path.parent)
    with pytest.raises(files.UnsafeNameError, match="outside"):
        files.safe_path(tmp_path, "link", "x")
    with pytest.raises(files.UnsafeNameError, match="cannot be used"):
        files.safe_path(tmp_path, "..")


def test_atomic_renames_on_success_and_keeps_the_old_file_on_failure(tmp_path):
    target = tmp_path / "table.csv"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="half way"):
        with files.atomic(target) as tmp:
            assert tmp.parent == tmp_path and tmp.suffix == ".csv" and tmp != target
            tmp.write_text("half")
            raise RuntimeError("half way")
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["table.csv"]
    with files.atomic(target) as tmp:
        tmp.write_text("new")
    assert target.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["table.csv"]
    folder = tmp_path / "model"
    (folder / "old.bin").parent.mkdir()
    (folder / "old.bin").write_text("x")
    with files.atomic(folder) as tmp:
        tmp.mkdir()
        (tmp / "weights.bin").write_text("w")
    assert sorted(p.name for p in folder.iterdir()) == ["weights.bin"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "table.csv"]


def test_renames_live_in_files_and_the_stage_finish_only():
    """Atomic writes have one owner (files); chain keeps the stage folder and notebook moves."""
    import re
    from pathlib import Path

    pkg = Path(files.__file__).parent
    users = sorted(
        p.relative_to(pkg).as_posix() for p in pkg.rglob("*.py") if re.search(r"os\.replace\(", p.read_text())
    )
    assert users == ["chain.py", "files.py"], users
