"""Mask <-> text: exact round trips, and honest repairs of malformed model text."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from magseg_nb import textgrid
from magseg_nb.labels import CLASSES

masks = st.tuples(st.integers(1, 24), st.integers(1, 24)).flatmap(
    lambda shape: arrays(np.uint8, shape, elements=st.integers(0, len(CLASSES) - 1))
)


@settings(max_examples=150, deadline=None)
@given(mask=masks, encoding=st.sampled_from(textgrid.ENCODINGS))
def test_round_trip(mask, encoding):
    text = textgrid.encode(mask, encoding)
    for declared in (encoding, "auto"):
        out = textgrid.decode(text, mask.shape, encoding=declared)
        np.testing.assert_array_equal(out.mask, mask)
        assert out.report.valid and out.report.parsed
        assert out.report.repairs == [] and out.report.repaired_fraction == 0.0


@settings(max_examples=100, deadline=None)
@given(mask=masks, encoding=st.sampled_from(textgrid.ENCODINGS), cut=st.integers(0, 400))
def test_truncated_text_never_raises(mask, encoding, cut):
    """A generation cut off anywhere (max_new_tokens) decodes to the right shape with a report."""
    text = textgrid.encode(mask, encoding)
    out = textgrid.decode(text[:cut], mask.shape)
    assert out.mask.shape == mask.shape
    assert 0.0 <= out.report.repaired_fraction <= 1.0
    if cut < len(text.rstrip()):
        assert not out.report.valid


def test_encodings_look_like_text4seg():
    mask = np.array([[1, 1, 1, 0], [2, 3, 3, 3]])
    assert textgrid.encode(mask, "plain") == "field|field|field|others\ntree|water|water|water"
    assert textgrid.encode(mask, "rle") == "field *3| others *1\ntree *1| water *3"


def test_encode_rejects_nodata_and_bad_encoding():
    with pytest.raises(ValueError, match="outside the classes"):
        textgrid.encode(np.array([[0, 255]]))
    with pytest.raises(ValueError, match="unknown encoding"):
        textgrid.encode(np.zeros((2, 2), int), "json")


def test_wrong_row_counts():
    few = textgrid.decode("field|field\ntree|tree", (3, 2))
    np.testing.assert_array_equal(few.mask, [[1, 1], [2, 2], [0, 0]])
    assert not few.report.valid and "found 2 rows, expected 3" in few.report.repairs
    assert few.report.repaired_fraction == pytest.approx(2 / 6)
    many = textgrid.decode("field|field\ntree|tree\nwater|water", (2, 2))
    np.testing.assert_array_equal(many.mask, [[1, 1], [2, 2]])
    assert "found 3 rows, expected 2" in many.report.repairs


def test_extra_and_missing_cells():
    out = textgrid.decode("field|field|tree\nwater", (2, 2))
    np.testing.assert_array_equal(out.mask, [[1, 1], [3, 0]])
    assert "row 0: 3 cells, expected 2" in out.report.repairs
    assert "row 1: 1 cells, expected 2" in out.report.repairs
    assert out.report.repaired_fraction == pytest.approx(2 / 4)


def test_unknown_labels_become_others():
    out = textgrid.decode("field|road\ncow|tree", (2, 2))
    np.testing.assert_array_equal(out.mask, [[1, 0], [0, 2]])
    assert "unknown labels ['cow', 'road'] set to 'others'" in out.report.repairs
    assert out.report.repaired_fraction == pytest.approx(0.5)


def test_wrong_case_is_read_but_reported():
    out = textgrid.decode("Field|TREE", (1, 2))
    np.testing.assert_array_equal(out.mask, [[1, 2]])
    assert out.report.repairs == ["labels in the wrong case"] and not out.report.valid


def test_bad_run_counts():
    out = textgrid.decode("field *x| tree *3\nwater *0| field *3", (2, 4), encoding="rle")
    np.testing.assert_array_equal(out.mask, [[1, 2, 2, 2], [3, 1, 1, 1]])
    assert any(r.startswith("2 bad run count(s)") for r in out.report.repairs)
    over = textgrid.decode("field *9", (1, 4))
    np.testing.assert_array_equal(over.mask, [[1, 1, 1, 1]])
    assert "row 0: 9 cells, expected 4" in over.report.repairs


def test_text_around_the_grid():
    text = "Sure! Here is the grid:\n```\nfield|tree\nwater|field\n```\nHope this helps."
    out = textgrid.decode(text, (2, 2))
    np.testing.assert_array_equal(out.mask, [[1, 2], [3, 1]])
    assert out.report.repairs == ["dropped 4 line(s) of text around the grid"]
    assert out.report.repaired_fraction == 0.0 and out.report.parsed


def test_no_grid_at_all():
    for text in ["", "I cannot see any fields.", None, "```\n```"]:
        out = textgrid.decode(text, (3, 3))
        assert out.mask.shape == (3, 3) and not out.mask.any()
        assert not out.report.parsed and out.report.repaired_fraction == 1.0


def test_one_line_grid_is_split():
    out = textgrid.decode("field|tree|water|others", (2, 2))
    np.testing.assert_array_equal(out.mask, [[1, 2], [3, 0]])
    assert not out.report.valid


def test_declared_encoding_mismatch_is_reported():
    assert (
        "expected a plain grid, found run counts"
        in textgrid.decode("field *2", (1, 2), "plain").report.repairs
    )
    assert "expected run-length encoding, found a plain grid" in (
        textgrid.decode("field|field", (1, 2), "rle").report.repairs
    )


def test_empty_cells_are_reported():
    out = textgrid.decode("field||tree", (1, 2))
    np.testing.assert_array_equal(out.mask, [[1, 2]])
    assert "1 empty cell(s) between separators" in out.report.repairs


def test_bad_shape_and_encoding_raise():
    with pytest.raises(ValueError, match="positive"):
        textgrid.decode("field", (0, 2))
    with pytest.raises(ValueError, match="unknown encoding"):
        textgrid.decode("field", (1, 1), encoding="xml")


def test_report_as_dict():
    d = textgrid.decode("field", (1, 2)).report.as_dict()
    assert set(d) == {"valid", "repairs", "repaired_fraction", "parsed"} and d["valid"] is False


@settings(max_examples=200, deadline=None)
@given(text=st.text(alphabet=st.sampled_from(list("fieldtrwaosh|*0123456789 \n-_xX")), max_size=200))
def test_any_text_decodes(text):
    out = textgrid.decode(text, (3, 4))
    assert out.mask.shape == (3, 4) and out.mask.max() < len(CLASSES)
    assert 0.0 <= out.report.repaired_fraction <= 1.0
    assert out.report.valid == (not out.report.repairs)


def test_a_run_cut_before_its_count_is_reported():
    """'field *1' cut to 'field' at the end of an answer looks like a plain cell: still a repair."""
    mask = np.array([[0, 1, 0, 1]], dtype=np.uint8)
    text = textgrid.encode(mask, "rle")
    out = textgrid.decode(text[: -len(" *1")], mask.shape)
    assert not out.report.valid
    assert out.report.repairs == ["1 bare label(s) among 'label *count' runs; read as 1"]
    assert out.report.repaired_fraction == 0.25
    assert out.mask.tolist() == mask.tolist()


def test_runaway_run_counts_are_read_as_one():
    # A model answered a run of 10**20 cells (OverflowError when expanded) and one of 5000 digits.
    out = textgrid.decode(f"field *{10**20}| tree *3\nwater *{'9' * 5000}| field *3", (2, 4), encoding="rle")
    np.testing.assert_array_equal(out.mask, [[1, 2, 2, 2], [3, 1, 1, 1]])
    assert not out.report.valid
    assert any(
        r.startswith("2 bad run count(s), e.g. bad run count '1000'... (21 digits); read as 1")
        for r in out.report.repairs
    ), out.report.repairs
    digits = textgrid.decode(f"water *{'9' * 5000}| field *3", (1, 4), encoding="rle")
    assert "bad run count '9999'... (5000 digits)" in digits.report.repairs[0]
