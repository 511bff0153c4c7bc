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
