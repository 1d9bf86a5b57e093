"""SeRA-SS selection policies, the selector callback protocol, statistics, folds and AUROC on hand-made numbers."""

import json
import random

import pytest
import torch

from sera_openrlhf.errors import ConfigError, NonFiniteError, SelectionError
from sera_openrlhf.selection import (
    SELECTORS,
    SelectionConfig,
    apply_selector,
    assign_folds,
    auroc,
    jaccard,
    selection_stats,
)


def table(irm, ids=None, **cols):
    ids = ids or [f"p{i}" for i in range(len(irm))]
    return {"id": ids, "irm": torch.tensor(irm, dtype=torch.float32), **cols}


def kept(irm, selector="irm", ids=None, **cfg):
    return apply_selector(selector, table(irm, ids), SelectionConfig(**cfg)).kept_ids


IRM10 = [0.9, -0.5, 0.3, 2.0, 0.3, -1.5, 1.1, 0.0, 0.3, 0.7]  # p0..p9


# ---------------------------------------------------------------------------------------------------- top


@pytest.mark.parametrize(
    "ratio, k",
    [(0.75, 8), (0.7, 7), (0.45, 5), (0.25, 3), (0.05, 1), (0.01, 1), (1.0, 10)],  # round half up: 7.5 -> 8
)
def test_top_k_rounding(ratio, k):
    assert len(kept(IRM10, keep_ratio=ratio)) == k


def test_top_high_keeps_largest_in_table_order():
    assert kept(IRM10, keep_ratio=0.3) == ["p0", "p3", "p6"]


def test_top_ties_at_cut_broken_by_id():
    # sorted high: p3 2.0, p6 1.1, p0 0.9, p9 0.7, then the tie p2=p4=p8=0.3
    assert kept(IRM10, keep_ratio=0.5) == ["p0", "p2", "p3", "p6", "p9"]
    assert kept(IRM10, keep_ratio=0.6) == ["p0", "p2", "p3", "p4", "p6", "p9"]


def test_top_ties_do_not_depend_on_row_order():
    ids = [f"p{i}" for i in range(10)]
    perm = list(range(10))
    random.Random(0).shuffle(perm)
    shuffled = kept([IRM10[i] for i in perm], ids=[ids[i] for i in perm], keep_ratio=0.5)
    assert sorted(shuffled) == ["p0", "p2", "p3", "p6", "p9"]


def test_top_direction_low():
    # sorted low: p5 -1.5, p1 -0.5, p7 0.0, tie p2/p4/p8 0.3
    assert kept(IRM10, keep_ratio=0.4, direction="low") == ["p1", "p2", "p5", "p7"]


def test_top_min_keep_raises_k():
    assert kept(IRM10, keep_ratio=0.1, min_keep=3) == ["p0", "p3", "p6"]


def test_top_drop_negative_ratio_of_all_pairs_capped():
    # 8 pairs have IRM >= 0 (0.0 counts as non-negative)
    assert len(kept(IRM10, keep_ratio=0.5, drop_negative=True)) == 5  # 0.5 * 10, not 0.5 * 8
    got = kept(IRM10, keep_ratio=1.0, drop_negative=True)
    assert got == ["p0", "p2", "p3", "p4", "p6", "p7", "p8", "p9"]  # capped at what remains
    assert kept(IRM10, keep_ratio=0.3, drop_negative=True, direction="low") == ["p2", "p4", "p7"]


# ---------------------------------------------------------------------------------------------------- threshold


def test_threshold_high_and_low_inclusive():
    assert kept(IRM10, mode="threshold", threshold=0.7) == ["p0", "p3", "p6", "p9"]
    assert kept(IRM10, mode="threshold", threshold=0.0, direction="low") == ["p1", "p5", "p7"]
    assert kept(IRM10, mode="threshold", threshold=0.0, direction="low", drop_negative=True) == ["p7"]
    assert kept(IRM10, selector="threshold", threshold=1.0) == ["p3", "p6"]  # built-ins usable by name


def test_drop_negative_with_negative_threshold():
    assert kept(IRM10, mode="threshold", threshold=-1.0, drop_negative=True) == [
        f"p{i}" for i in (0, 2, 3, 4, 6, 7, 8, 9)
    ]


# ---------------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "cfg, flags",
    [
        (dict(mode="threshold", threshold=5.0), ["--sera.threshold", "--sera.min_keep"]),
        (dict(mode="threshold", threshold=0.5, min_keep=5), ["--sera.threshold", "--sera.min_keep"]),
        (dict(mode="threshold", threshold=-0.1, direction="low", drop_negative=True),
         ["--sera.threshold", "--sera.drop_negative_irm"]),
    ],
)
def test_too_few_kept_names_flags(cfg, flags):
    with pytest.raises(SelectionError) as e:
        kept(IRM10, **cfg)
    for flag in flags:
        assert flag in str(e.value)


def test_top_everything_negative_with_drop_negative():
    with pytest.raises(SelectionError, match=r"kept 0 of 3 .*--sera.keep_ratio, --sera.drop_negative_irm"):
        kept([-1.0, -2.0, -0.1], drop_negative=True)
    with pytest.raises(SelectionError, match="--sera.min_keep=3"):
        kept([1.0, 2.0, -0.1], drop_negative=True, min_keep=3)


@pytest.mark.parametrize(
    "cfg, flag",
    [
        (dict(mode="best"), "--sera.select_mode"),
        (dict(keep_ratio=0.0), "--sera.keep_ratio"),
        (dict(keep_ratio=1.5), "--sera.keep_ratio"),
        (dict(threshold=float("nan")), "--sera.threshold"),
        (dict(direction="up"), "--sera.select_direction"),
        (dict(min_keep=0), "--sera.min_keep"),
    ],
)
def test_config_validation_names_flag(cfg, flag):
    with pytest.raises(ConfigError, match=flag):
        SelectionConfig(**cfg)


def test_config_defaults_are_the_flags_defaults():
    from sera_openrlhf.config import ReviewConfig

    assert SelectionConfig.from_review(ReviewConfig()) == SelectionConfig()
    assert SelectionConfig.from_review(ReviewConfig(keep_ratio=0.25, select_mode="threshold")) == SelectionConfig(
        keep_ratio=0.25, mode="threshold")


def test_nan_irm_is_reported():
    with pytest.raises(NonFiniteError, match="'p1'"):
        kept([1.0, float("nan")])


def test_unknown_selector_lists_builtins():
    with pytest.raises(ConfigError, match="--sera.selector.*irm"):
        kept(IRM10, selector="nope")
    assert {"irm", "top", "threshold"} <= set(SELECTORS.names())


# ---------------------------------------------------------------------------------------------------- callbacks

USER_MODULE = '''
import numpy as np
import torch

def keep_ids(table, config):
    return [i for i, r in zip(table["id"], table["irm"].tolist()) if r > config.threshold]

def weights(table, config):
    return torch.sigmoid(table["irm"]) * (table["score"] > 0)

def numpy_ids(table, config):
    return np.array(table["id"][:2], dtype=object)

def bool_mask(table, config):
    return table["irm"] > 1

def unknown(table, config):
    return ["p0", "ghost"]

def wrong_len(table, config):
    return torch.ones(3)

def negative(table, config):
    return -torch.ones(len(table["id"]))

def nan(table, config):
    return torch.full((len(table["id"]),), float("nan"))

def numbers(table, config):
    return [1, 0, 1]

def nothing(table, config):
    return None

def empty(table, config):
    return []

NOT_A_FUNCTION = 3
'''


@pytest.fixture(scope="module")
def user_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("user") / "my_selectors.py"
    path.write_text(USER_MODULE)
    return str(path)


def test_user_callback_returning_ids(user_file):
    res = apply_selector(f"{user_file}:keep_ids", table(IRM10), SelectionConfig(threshold=1.0))
    assert res.kept_ids == ["p3", "p6"]
    assert res.weights.tolist() == [0, 0, 0, 1, 0, 0, 1, 0, 0, 0]
    assert res.kept_mask.dtype == torch.bool


def test_user_callback_returning_weights(user_file):
    t = table([0.0, 1.0, -1.0], score=torch.tensor([1.0, 1.0, -1.0]))
    res = apply_selector(f"{user_file}:weights", t, SelectionConfig())
    assert res.kept_ids == ["p0", "p1"]
    assert torch.allclose(res.weights, torch.tensor([0.5, torch.sigmoid(torch.tensor(1.0)).item(), 0.0]))


def test_user_callback_numpy_ids_and_bool_mask(user_file):
    assert apply_selector(f"{user_file}:numpy_ids", table(IRM10), SelectionConfig()).kept_ids == ["p0", "p1"]
    res = apply_selector(f"{user_file}:bool_mask", table(IRM10), SelectionConfig())
    assert res.kept_ids == ["p3", "p6"] and res.weights.dtype == torch.float32


def test_user_callback_via_module_path(user_file, monkeypatch):
    import os

    monkeypatch.syspath_prepend(os.path.dirname(user_file))
    assert apply_selector("my_selectors:keep_ids", table(IRM10), SelectionConfig(threshold=1.5)).kept_ids == ["p3"]


@pytest.mark.parametrize(
    "fn, message",
    [
        ("unknown", r"1 id\(s\) not in the table, e.g. 'ghost'"),
        ("wrong_len", r"weights of shape \(3,\); expected \(10,\)"),
        ("negative", "negative, NaN or infinite"),
        ("nan", "negative, NaN or infinite"),
        ("numbers", "containing int values"),
        ("nothing", "returned NoneType"),
        ("NOT_A_FUNCTION", "not a function"),
    ],
)
def test_bad_callback_returns(user_file, fn, message):
    with pytest.raises(ConfigError, match=message) as e:
        apply_selector(f"{user_file}:{fn}", table(IRM10), SelectionConfig())
    if fn != "NOT_A_FUNCTION":
        assert f"selector '{user_file}:{fn}' returned" in str(e.value)


def test_callback_keeping_nothing_is_selection_error(user_file):
    with pytest.raises(SelectionError, match=f"selector '{user_file}:empty' kept 0 of 10"):
        apply_selector(f"{user_file}:empty", table(IRM10), SelectionConfig())


# ---------------------------------------------------------------------------------------------------- stats


def test_selection_stats_hand_table():
    t = table(
        [2.0, -1.0, 0.5, -3.0, 1.0],
        chosen_reward=torch.tensor([1.0, 0.0, 0.5, -1.0, 0.5]),
        rejected_reward=torch.tensor([-1.0, 1.0, 0.0, 2.0, -0.5]),
        chosen_len=torch.tensor([10, 20, 30, 40, 50]),
        rejected_len=torch.tensor([5, 5, 5, 5, 5]),
    )
    res = apply_selector("irm", t, SelectionConfig(keep_ratio=0.6))  # k = 3: p0, p2, p4
    assert res.kept_ids == ["p0", "p2", "p4"]
    s = selection_stats(t, res, previous_kept_ids=["p0", "p1", "p2"], top_negative=1)
    json.dumps(s)  # serialisable
    assert (s["n_pairs"], s["n_kept"], s["kept_share"]) == (5, 3, 0.6)
    assert s["irm"]["all"] == pytest.approx(
        {"min": -3.0, "p5": -2.6, "p25": -1.0, "p50": 0.5, "p75": 1.0, "p95": 1.8, "max": 2.0}
    )
    assert s["irm"]["kept"]["p50"] == 1.0 and s["irm"]["dropped"]["max"] == -1.0
    assert s["mean_irm_kept"] == pytest.approx(3.5 / 3)
    assert s["mean_len"] == {"kept": {"chosen": 30.0, "rejected": 5.0}, "dropped": {"chosen": 30.0, "rejected": 5.0}}
    assert s["jaccard_previous"] == 0.5  # {p0,p2} / {p0,p1,p2,p4}
    assert s["n_negative_irm"] == 2
    assert s["most_negative"] == [
        {"id": "p3", "irm": -3.0, "kept": False, "chosen_reward": -1.0, "rejected_reward": 2.0}
    ]


def test_selection_stats_minimal_table_all_kept():
    t = table([1.0, 2.0])
    s = selection_stats(t, apply_selector("irm", t, SelectionConfig(keep_ratio=1.0)))
    assert s["irm"]["dropped"] is None and s["mean_len"] is None
    assert s["jaccard_previous"] is None and s["most_negative"] == []


# ---------------------------------------------------------------------------------------------------- helpers


def test_folds_balanced_deterministic_order_independent():
    ids = [f"pair-{i}" for i in range(103)]
    folds = assign_folds(ids, 4, seed=7)
    assert sorted(folds.count(f) for f in range(4)) == [25, 26, 26, 26]
    assert assign_folds(ids, 4, seed=7) == folds
    rev = assign_folds(ids[::-1], 4, seed=7)
    assert dict(zip(ids[::-1], rev)) == dict(zip(ids, folds))
    assert assign_folds(ids, 4, seed=8) != folds
    assert assign_folds(ids, 1, seed=0) == [0] * 103
    with pytest.raises(ConfigError, match="--sera.crossfit_folds"):
        assign_folds(ids, 0, seed=0)


def test_jaccard():
    assert jaccard({1, 2, 3}, {2, 3, 4}) == 0.5
    assert jaccard(set(), set()) == 1.0
    assert jaccard({1}, set()) == 0.0


def test_auroc_hand_values():
    assert auroc([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1]) == 1.0
    assert auroc([0.9, 0.8, 0.2, 0.1], [0, 0, 1, 1]) == 0.0
    assert auroc([1.0, 1.0, 1.0, 1.0], [0, 1, 0, 1]) == 0.5
    # (pos, neg) pairs: 0.4>0.1 win, 0.4=0.4 tie (half), 0.8 wins twice -> 3.5 / 4
    assert auroc(torch.tensor([0.1, 0.4, 0.4, 0.8]), torch.tensor([False, False, True, True])) == 0.875
    # 0.3<0.5 loss, 0.3>0.1 win, 0.5=0.5 tie, 0.5>0.1 win -> 2.5 / 4
    assert auroc([0.3, 0.5, 0.5, 0.1], [1, 0, 1, 0]) == 0.625
    with pytest.raises(ValueError, match="both positive and negative"):
        auroc([0.1, 0.2], [1, 1])


def test_review_signal_hand_values():
    from sera_openrlhf.selection import review_signal

    sig = review_signal(torch.tensor([1.0, -1.0, 0.0, 2.0]), out_of_fold=True)
    # 2 agree, 1 tie (half), 1 disagrees: 2.5 / 4
    assert sig["label_agreement"] == 0.625 and sig["n"] == 4 and sig["out_of_fold"]
    # one-sided 95 % Wilson bound, by hand: (p + z^2/2n - z*sqrt(p(1-p)/n + z^2/4n^2)) / (1 + z^2/n)
    z, p, n = 1.645, 0.625, 4
    hand = (p + z * z / (2 * n) - z * ((p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5)) / (1 + z * z / n)
    assert sig["lower_bound"] == pytest.approx(hand) and 0 < sig["lower_bound"] < 0.625
    # the bound tightens with N: 56 % of 512 is not clearly above 55 %, 70 % of 512 is
    assert review_signal([1.0] * 287 + [-1.0] * 225, out_of_fold=True)["lower_bound"] < 0.55
    assert review_signal([1.0] * 358 + [-1.0] * 154, out_of_fold=True)["lower_bound"] > 0.65
    assert review_signal([3.0] * 100, out_of_fold=True)["lower_bound"] == pytest.approx(1 / (1 + z * z / 100))
    # in-sample margins agree by memorisation: no bound
    assert review_signal([1.0, 1.0], out_of_fold=False) == {"out_of_fold": False, "n": 2, "label_agreement": 1.0,
                                                             "lower_bound": None}
    assert review_signal([], out_of_fold=True)["label_agreement"] is None
