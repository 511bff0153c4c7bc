"""Rewards on hand-made completions: perfect, empty, malformed, partly right."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from magseg_nb import rewards, textgrid
from magseg_nb.labels import NODATA

GT = np.array(
    [
        [1, 1, 1, 0],
        [1, 1, 2, 2],
        [3, 3, 2, 2],
        [3, 3, 0, 0],
    ]
)


def conv(text):
    """A completion as GRPOTrainer passes it for conversational prompts."""
    return [{"role": "assistant", "content": text}]


def both(texts, gt=GT):
    comps = [conv(t) for t in texts]
    gts = [gt.tolist()] * len(texts)
    return (
        rewards.dice_reward(prompts=[None] * len(texts), completions=comps, gt_mask=gts),
        rewards.format_reward(prompts=[None] * len(texts), completions=comps, gt_mask=gts),
    )


def test_mean_dice_perfect_and_disjoint():
    assert rewards.mean_dice(GT, GT) == 1.0
    assert rewards.mean_dice(np.ones((2, 2)), np.zeros((2, 2))) == 0.0


def test_mean_dice_averages_over_present_classes_only():
    gt = np.array([[1, 1], [0, 0]])
    pred = np.array([[1, 0], [0, 0]])
    # field: 2*1/(2+1) = 2/3; others: 2*2/(2+3) = 4/5; tree and water absent from both: left out.
    assert rewards.mean_dice(gt, pred) == pytest.approx((2 / 3 + 4 / 5) / 2)
    per_class = rewards.per_class_dice(gt, pred)
    assert per_class.tolist() == pytest.approx([4 / 5, 2 / 3, 1.0, 1.0])  # absent from both -> 1.0


def test_mean_dice_ignores_nodata_and_checks_shapes():
    gt = np.array([[1, NODATA], [0, NODATA]])
    pred = np.array([[1, 2], [0, 3]])
    assert rewards.mean_dice(gt, pred) == 1.0
    assert rewards.mean_dice(np.full((2, 2), NODATA), np.zeros((2, 2))) == 1.0
    with pytest.raises(ValueError, match="shape"):
        rewards.mean_dice(np.zeros((2, 2)), np.zeros((3, 3)))


def test_perfect_completion_scores_one_in_both_encodings():
    d, f = both([textgrid.encode(GT, "plain"), textgrid.encode(GT, "rle")])
    assert d == [1.0, 1.0]
    assert f == [1.0, 1.0]


def test_empty_and_garbage_completions_score_zero_format():
    d, f = both(["", "I cannot see any fields here."])
    assert f == [0.0, 0.0]
    # the decoder fills unrecovered cells with "others": only the others cells can match
    assert all(0.0 <= x < 0.5 for x in d)


def test_malformed_completion_gets_partial_format_credit():
    rows = textgrid.encode(GT, "plain").split("\n")
    truncated = "\n".join(rows[:2])  # two rows missing
    d, f = both([truncated])
    assert 0.0 < f[0] <= rewards.REPAIRED_MAX
    assert 0.0 < d[0] < 1.0


def test_partly_right_completion_scores_between():
    pred = GT.copy()
    pred[0, :] = 2  # first row wrong
    d, f = both([textgrid.encode(pred, "rle")])
    assert f == [1.0]  # well-formed, just wrong
    assert 0.0 < d[0] < 1.0
    assert d[0] == pytest.approx(rewards.mean_dice(GT, pred))


def test_plain_string_and_content_parts_are_accepted():
    text = textgrid.encode(GT, "plain")
    parts = [{"role": "assistant", "content": [{"type": "text", "text": text}]}]
    assert rewards.dice_reward(completions=[text, parts], gt_mask=[GT, GT]) == [1.0, 1.0]


def test_missing_gt_mask_is_a_clear_error():
    with pytest.raises(ValueError, match="gt_mask"):
        rewards.dice_reward(prompts=[None], completions=[conv("field")])
    with pytest.raises(ValueError, match="1 completions but 2"):
        rewards.format_reward(completions=[conv("x")], gt_mask=[GT, GT])


masks = st.integers(2, 6).flatmap(
    lambda n: st.lists(st.lists(st.integers(0, 3), min_size=n, max_size=n), min_size=n, max_size=n)
)
damage = st.sampled_from(["drop_row", "drop_cell", "extra_cell", "unknown_label", "prose", "truncate"])


def _malform(text, how):
    rows = text.split("\n")
    if how == "drop_row":
        return "\n".join(rows[:-1])
    if how == "drop_cell":
        return "\n".join([rows[0].rsplit("|", 1)[0]] + rows[1:])
    if how == "extra_cell":
        return "\n".join([rows[0] + "|field"] + rows[1:])
    if how == "unknown_label":
        return "\n".join(["banana|" + rows[0].split("|", 1)[1]] + rows[1:])
    if how == "prose":
        return "Here is the grid:\n" + text
    return text[: len(text) // 2]


@settings(max_examples=60, deadline=None)
@given(masks, damage, st.floats(0.0, 1.0))
def test_malformed_never_beats_correct(mask, how, w_format):
    gt = np.array(mask)
    good = textgrid.encode(gt, "plain")
    bad = _malform(good, how)
    d, f = both([good, bad], gt=gt)
    assert d[1] <= d[0] and f[1] <= f[0]
    if bad != good:
        # with any positive format weight the combined reward of a malformed answer is strictly lower
        combined = [di + (w_format + 0.01) * fi for di, fi in zip(d, f, strict=True)]
        assert combined[1] < combined[0]
