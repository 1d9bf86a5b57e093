"""SeRA-PB math: ensembled reward, fluency guard, degenerate-text rules, pairing, DICE length de-biasing."""

import math

import pytest
import torch

from sera_openrlhf.bootstrap import (
    MAX_CHAR_RUN,
    MAX_WORD_RUN,
    degenerate_reason,
    ensemble_rewards,
    ensemble_weights,
    fit_length_alpha,
    fluency_guard,
    is_degenerate_text,
    make_pairs,
    pairing_mask,
)
from sera_openrlhf.errors import ConfigError

# --------------------------------------------------------------------------------------------- ensemble


def test_last_k_two_policies_gives_previous_then_current():
    assert ensemble_weights(2, k=2, lam=0.3) == pytest.approx([0.7, 0.3])
    # More policies than the window: still only the last two get a weight.
    assert ensemble_weights(5, k=2, lam=0.3) == pytest.approx([0.7, 0.3])


def test_last_k_single_policy_and_k1():
    assert ensemble_weights(1, k=2, lam=0.3) == [1.0]
    assert ensemble_weights(4, k=1, lam=0.3) == [1.0]


def test_last_k_general_k_splits_remaining_weight_equally():
    assert ensemble_weights(4, k=3, lam=0.5) == pytest.approx([0.25, 0.25, 0.5])
    assert ensemble_weights(2, k=3, lam=0.5) == pytest.approx([0.5, 0.5])  # window clipped to what exists


def test_exp_decay_over_all_policies():
    w = ensemble_weights(3, mode="exp", decay=0.5)
    assert w == pytest.approx([0.25 / 1.75, 0.5 / 1.75, 1 / 1.75])
    assert ensemble_weights(4, mode="exp", decay=1.0) == pytest.approx([0.25] * 4)
    assert ensemble_weights(1, mode="exp", decay=0.5) == [1.0]


@pytest.mark.parametrize("n", [1, 2, 3, 7])
@pytest.mark.parametrize("kwargs", [dict(mode="last_k", k=3, lam=0.2), dict(mode="exp", decay=0.3)])
def test_weights_sum_to_one(n, kwargs):
    assert sum(ensemble_weights(n, **kwargs)) == pytest.approx(1.0)


@pytest.mark.parametrize(
    "kwargs, flag",
    [
        (dict(k=0), "--sera.ensemble_k"),
        (dict(lam=1.5), "--sera.ensemble_lambda"),
        (dict(mode="exp", decay=0.0), "--sera.ensemble_decay"),
        (dict(mode="mean"), "--sera.ensemble_mode"),
    ],
)
def test_weight_validation_names_flag(kwargs, flag):
    with pytest.raises(ConfigError, match=flag):
        ensemble_weights(3, **kwargs)


def test_ensemble_rewards_weighted_mean():
    r = torch.stack([torch.full((2, 3), 1.0), torch.full((2, 3), 3.0)])  # [K=2, P=2, S=3]
    out = ensemble_rewards(r, [0.25, 0.75])
    assert out.shape == (2, 3)
    assert torch.allclose(out, torch.full((2, 3), 2.5))
    with pytest.raises(ValueError):
        ensemble_rewards(r, [1.0])


# --------------------------------------------------------------------------------------------- degenerate text


@pytest.mark.parametrize(
    "text, reason",
    [
        ("", "empty"),
        ("  \n\t ", "empty"),
        ("great movie \ufffd", "invalid_char"),  # broken byte fragment
        ("ok\x00ok", "invalid_char"),
        ("ok\x1b[0m", "invalid_char"),
        ("wow" + "!" * MAX_CHAR_RUN, "char_run"),
        ("end" + "\n" * MAX_CHAR_RUN, "char_run"),
        ("it was " + "good " * MAX_WORD_RUN, "word_run"),
        ("it was " + "! " * MAX_WORD_RUN, "word_run"),
        ("I like it . " * 15, "low_diversity"),
    ],
)
def test_degenerate_rules(text, reason):
    assert degenerate_reason(text) == reason
    assert is_degenerate_text(text)


@pytest.mark.parametrize(
    "text",
    [
        "The film was a delight from start to finish.",
        "Line one.\n\tIndented line two.\r\n",
        "wow" + "!" * (MAX_CHAR_RUN - 1),
        "it was " + "good " * (MAX_WORD_RUN - 1),
        "def f():\n" + " " * 24 + "return 1",  # deep indentation is not a character run
        "Zoë's café — naïve 😀 résumé",
        (
            "The director builds the story slowly, letting each scene breathe before the next one arrives. "
            "Its actors carry quiet moments with real warmth, and the score never pushes too hard. By the end "
            "I cared about these people more than I expected, which is rare for a film of this kind."
        ),
    ],
)
def test_normal_text_passes(text):
    assert degenerate_reason(text) is None


# --------------------------------------------------------------------------------------------- fluency guard


def _texts(p, s):
    return [[f"prompt {i} answer {j}" for j in range(s)] for i in range(p)]


def test_fluency_guard_absolute_floor():
    lp = torch.tensor([[-1.0, -5.0, -2.0], [-6.0, -0.5, float("nan")]])
    valid, counts = fluency_guard(lp, _texts(2, 3), floor=-4.0)
    assert valid.tolist() == [[True, False, True], [False, True, False]]
    assert counts == {"low_fluency": 3, "degenerate_text": 0, "kept": 3}


def test_fluency_guard_quantile_and_max_of_both():
    lp = torch.arange(10, dtype=torch.float).view(2, 5) * -1.0  # 0 … -9
    valid, _ = fluency_guard(lp, _texts(2, 5), floor_quantile=0.2)  # 20 % quantile = -7.2
    assert valid.sum() == 8 and not valid[1, 3] and not valid[1, 4]
    valid, _ = fluency_guard(lp, _texts(2, 5), floor=-3.5, floor_quantile=0.2)  # stricter floor wins
    assert valid.sum() == 4
    valid, _ = fluency_guard(lp, _texts(2, 5), floor=-8.5, floor_quantile=0.2)
    assert valid.sum() == 8


def test_fluency_guard_degenerate_text_and_counts_add_up():
    lp = torch.tensor([[-1.0, -9.0, -9.0, -1.0]])
    texts = [["fine answer", "bad \ufffd", "gibberish words", "   "]]
    valid, counts = fluency_guard(lp, texts, floor=-4.0)
    assert valid.tolist() == [[True, False, False, False]]
    assert counts == {"low_fluency": 1, "degenerate_text": 2, "kept": 1}
    # Without a floor only the text rules apply.
    valid, counts = fluency_guard(lp, texts, floor=None, floor_quantile=None)
    assert valid.tolist() == [[True, False, True, False]] and counts["low_fluency"] == 0


@pytest.mark.parametrize("kwargs, flag", [(dict(floor_quantile=1.0), "--sera.fluency_quantile"),
                                          (dict(floor=float("nan")), "--sera.fluency_floor")])
def test_fluency_guard_validation(kwargs, flag):
    with pytest.raises(ConfigError, match=flag):
        fluency_guard(torch.zeros(1, 2), _texts(1, 2), **kwargs)


# --------------------------------------------------------------------------------------------- pairing


def _grid(rewards, lengths=None, texts=None, truncated=None, valid=None):
    r = torch.tensor(rewards, dtype=torch.float)
    p, s = r.shape
    return dict(
        rewards=r,
        lengths=torch.tensor(lengths, dtype=torch.float) if lengths is not None else torch.full((p, s), 10.0),
        valid=torch.tensor(valid) if valid is not None else torch.ones(p, s, dtype=torch.bool),
        texts=texts if texts is not None else _texts(p, s),
        truncated=torch.tensor(truncated) if truncated is not None else torch.zeros(p, s, dtype=torch.bool),
    )


def test_pairs_are_argmax_and_argmin():
    pairs, stats = make_pairs(**_grid([[0.1, 0.9, -0.4, 0.3], [2.0, 1.0, 3.0, 0.0]]))
    assert [(q.prompt_index, q.chosen_index, q.rejected_index) for q in pairs] == [(0, 1, 2), (1, 2, 3)]
    assert pairs[0].margin == pytest.approx(1.3) and pairs[0].debiased_margin == pytest.approx(1.3)
    assert stats["pairs"] == 2 and stats["mean_chosen_length"] == 10.0


def test_invalid_samples_are_ignored_and_too_few_valid_counted():
    g = _grid([[5.0, 1.0, 0.0], [1.0, 2.0, 3.0]], valid=[[False, True, True], [True, False, False]])
    pairs, stats = make_pairs(**g)
    assert [(q.prompt_index, q.chosen_index, q.rejected_index) for q in pairs] == [(0, 1, 2)]
    assert stats["too_few_valid"] == 1


def test_min_margin_drops_close_pairs():
    g = _grid([[1.0, 0.9], [3.0, 0.0]])
    pairs, stats = make_pairs(**g, min_margin=0.5)
    assert [q.prompt_index for q in pairs] == [1] and stats["below_min_margin"] == 1


def test_all_ties_give_no_pair():
    pairs, stats = make_pairs(**_grid([[1.0, 1.0, 1.0], [2.0, 0.0, 1.0]]))
    assert [q.prompt_index for q in pairs] == [1] and stats["below_min_margin"] == 1


def test_truncated_samples_dropped_unless_disabled():
    g = _grid([[9.0, 1.0, 0.0]], truncated=[[True, False, False]])
    pairs, stats = make_pairs(**g)
    assert (pairs[0].chosen_index, pairs[0].rejected_index) == (1, 2) and stats["truncated_dropped"] == 1
    pairs, _ = make_pairs(**g, drop_truncated=False)
    assert pairs[0].chosen_index == 0


def test_duplicate_texts_count_once():
    texts = [["same", "same", "same"], ["a", "a", "b"]]
    pairs, stats = make_pairs(**_grid([[3.0, 2.0, 1.0], [1.0, 5.0, 0.0]], texts=texts))
    # Prompt 0: one distinct text → no pair. Prompt 1: the second "a" is a duplicate, so it is not a candidate.
    assert stats["duplicate_texts"] == 1
    assert [(q.prompt_index, q.chosen_index, q.rejected_index) for q in pairs] == [(1, 0, 2)]
    mask = pairing_mask(torch.ones(2, 3, dtype=torch.bool), texts, torch.zeros(2, 3, dtype=torch.bool))
    assert mask.tolist() == [[True, False, False], [True, False, True]]


def test_top_fraction_keeps_largest_margins():
    g = _grid([[1.0, 0.0], [4.0, 0.0], [2.0, 0.0], [3.0, 0.0]])
    pairs, stats = make_pairs(**g, top_fraction=0.5)
    assert [q.prompt_index for q in pairs] == [1, 3] and stats["top_fraction_cut"] == 2
    pairs, _ = make_pairs(**g, top_fraction=0.01)  # at least one pair survives
    assert [q.prompt_index for q in pairs] == [1]
    with pytest.raises(ConfigError, match="--sera.pair_top_fraction"):
        make_pairs(**g, top_fraction=0.0)


def test_no_pair_names_the_cause_and_the_flag():
    pairs, stats = make_pairs(**_grid([[1.0, 0.9], [1.0, 1.0]]), min_margin=5.0)
    assert pairs == [] and stats["pairs"] == 0 and "--sera.min_margin" in stats["no_pair_cause"]
    pairs, stats = make_pairs(**_grid([[1.0, 0.9], [2.0, 1.0]], truncated=[[True, True], [True, True]]))
    assert pairs == [] and "--sera.max_new_tokens" in stats["no_pair_cause"]
    assert "--sera.keep_truncated" in stats["no_pair_cause"]
    pairs, stats = make_pairs(**_grid([[1.0, 0.9], [2.0, 1.0]], texts=[["x", "x"], ["y", "y"]]))
    assert pairs == [] and "--sera.temperature" in stats["no_pair_cause"]
    pairs, stats = make_pairs(**_grid([[1.0, 0.9], [2.0, 1.0]], valid=[[True, False], [False, True]]))
    assert pairs == [] and "--sera.fluency_floor" in stats["no_pair_cause"]


def test_alpha_changes_ranking():
    g = _grid([[1.0, 0.8, 0.0]], lengths=[[100, 10, 50]])
    pairs, _ = make_pairs(**g, alpha=0.0)
    assert (pairs[0].chosen_index, pairs[0].rejected_index) == (0, 2)
    pairs, _ = make_pairs(**g, alpha=0.01)  # scores 0.0, 0.7, -0.5
    q = pairs[0]
    assert (q.chosen_index, q.rejected_index) == (1, 2)
    assert q.margin == pytest.approx(0.8) and q.debiased_margin == pytest.approx(1.2)


# --------------------------------------------------------------------------------------------- DICE α


def _length_biased(slope, p=300, s=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(10, 120, (p, s), generator=g).double()
    rewards = slope * lengths + torch.randn(p, s, generator=g, dtype=torch.double)
    return rewards, lengths


def _gap(stats):
    return stats["mean_chosen_length"] - stats["mean_rejected_length"]


@pytest.mark.parametrize("slope", [0.05, -0.05])
def test_fit_length_alpha_removes_length_gap(slope):
    rewards, lengths = _length_biased(slope)
    kw = dict(valid=torch.ones_like(rewards, dtype=torch.bool), texts=_texts(*rewards.shape),
              truncated=torch.zeros_like(rewards, dtype=torch.bool))
    _, before = make_pairs(rewards, lengths, **kw)
    assert math.copysign(1, _gap(before)) == math.copysign(1, slope) and abs(_gap(before)) > 40

    alpha = fit_length_alpha(rewards, lengths, kw["valid"])
    assert math.copysign(1, alpha) == math.copysign(1, slope)  # α's sign follows the bias
    _, after = make_pairs(rewards, lengths, **kw, alpha=alpha)
    assert abs(_gap(after)) < 0.05 * abs(_gap(before))
    assert fit_length_alpha(rewards, lengths, kw["valid"]) == alpha  # deterministic


def test_fit_length_alpha_no_bias_cases():
    r = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    same_len = torch.full((2, 2), 7.0)
    assert fit_length_alpha(r, same_len, torch.ones(2, 2, dtype=torch.bool)) == 0.0
    # Gap already 0 at α = 0 (one prompt prefers the long answer, the other the short one).
    lengths = torch.tensor([[10.0, 20.0], [10.0, 20.0]])
    assert fit_length_alpha(r, lengths, torch.ones(2, 2, dtype=torch.bool)) == 0.0
    # Fewer than two valid samples anywhere.
    assert fit_length_alpha(r, lengths, torch.tensor([[True, False], [False, True]])) == 0.0


# --------------------------------------------------------------------------------------------- degenerate policy


def test_fluency_guard_stops_degenerate_policy_from_winning():
    """Design §1b: the policy learned to like text the reference finds implausible, so degenerate samples carry
    the HIGHEST implicit reward. Without the guard they become the chosen responses; with it, none does."""
    num_prompts = 12
    texts, rewards, ref_lp = [], [], []
    for p in range(num_prompts):
        texts.append([
            f"The plot of film {p} is gentle and warm.",  # fluent
            f"Film {p} felt slow, but the ending works.",  # fluent
            f"film {p} " + "great " * 10,  # repetition loop
            f"film {p} great \ufffd\ufffd",  # broken byte fragments
            f"flm{p} grt xq zzv kpw",  # valid characters, but implausible under the reference
        ])
        rewards.append([0.5, -0.5, 3.0 + p, 4.0 + p, 5.0 + p])
        ref_lp.append([-2.0, -2.4, -6.5, -7.0, -9.0])
    rewards, ref_lp = torch.tensor(rewards), torch.tensor(ref_lp)
    lengths = torch.full_like(rewards, 12.0)
    truncated = torch.zeros_like(rewards, dtype=torch.bool)
    fluent = {0, 1}

    unguarded, _ = make_pairs(rewards, lengths, torch.ones_like(truncated), texts, truncated)
    assert all(q.chosen_index not in fluent for q in unguarded)

    valid, counts = fluency_guard(ref_lp, texts, floor=-5.0)
    assert counts == {"low_fluency": num_prompts, "degenerate_text": 2 * num_prompts, "kept": 2 * num_prompts}
    guarded, _ = make_pairs(rewards, lengths, valid, texts, truncated)
    assert len(guarded) == num_prompts
    assert all(q.chosen_index == 0 and q.rejected_index == 1 for q in guarded)

    # A relative floor works too: the least fluent 20 % of the batch is exactly the implausible sample.
    valid, _ = fluency_guard(ref_lp, texts, floor_quantile=0.2)
    guarded, _ = make_pairs(rewards, lengths, valid, texts, truncated)
    assert all(q.chosen_index in fluent for q in guarded)


# --------------------------------------------------------------------------------------------- conservative judge


def test_ensemble_spread_is_the_weighted_std_over_policies():
    from sera_openrlhf.bootstrap import ensemble_spread

    r = torch.tensor([[[1.0, 2.0]], [[3.0, 2.0]]])  # [K=2, P=1, S=2]
    assert ensemble_spread(r, [0.5, 0.5]).tolist() == [[1.0, 0.0]]
    assert ensemble_spread(r, [0.25, 0.75]).tolist()[0][0] == pytest.approx((0.25 * 1.5**2 + 0.75 * 0.5**2) ** 0.5)
    assert ensemble_spread(r[:1], [1.0]).abs().sum() == 0  # one policy: no spread


def test_the_pessimistic_judge_avoids_samples_the_policies_disagree_on():
    """Sample 0 has the best mean but the policies disagree about it; with lambda 1 the judge prefers sample 1,
    which every policy rates well, and judges --sera.min_margin on the pessimistic gap."""
    from sera_openrlhf.bootstrap import ensemble_rewards, ensemble_spread

    members = torch.tensor([[[4.0, 1.5, 0.0]], [[-1.0, 1.3, 0.1]]], dtype=torch.float64)  # [K=2, P=1, S=3]
    mean, spread = ensemble_rewards(members, [0.5, 0.5]), ensemble_spread(members, [0.5, 0.5])
    g = _grid(mean.tolist())
    plain, _ = make_pairs(**g)
    assert (plain[0].chosen_index, plain[0].rejected_index) == (0, 2)
    careful, _ = make_pairs(**g, spread=spread, judge_lambda=1.0)
    assert (careful[0].chosen_index, careful[0].rejected_index) == (1, 2)
    c, j = 1, 2
    pessimistic = (mean[0, c] - spread[0, c]) - (mean[0, j] + spread[0, j])
    assert careful[0].debiased_margin == pytest.approx(float(pessimistic))
    assert careful[0].margin == pytest.approx(float(mean[0, c] - mean[0, j]))
    none, stats = make_pairs(**g, spread=spread, judge_lambda=1.0, min_margin=float(pessimistic) + 0.01)
    assert not none and stats["below_min_margin"] == 1


def test_unanimity_drops_pairs_some_policy_orders_the_other_way():
    members = torch.tensor([[[2.0, 0.0], [2.0, 0.0]], [[1.0, 0.0], [-1.0, 0.5]]])  # prompt 1: policies disagree
    g = _grid((members.mean(0)).tolist())
    pairs, stats = make_pairs(**g, members=members)
    assert [q.prompt_index for q in pairs] == [0] and stats["not_unanimous"] == 1
    none, stats = make_pairs(**_grid([[0.0, 1.0]]), members=torch.tensor([[[0.0, 1.0]], [[1.0, 0.0]]]))
    assert not none and "--sera.judge_unanimous" in stats["no_pair_cause"]


def test_judge_agreement_is_the_weighted_share_of_policies_preferring_the_chosen_sample():
    from sera_openrlhf.bootstrap import BootstrapPair, judge_agreement

    members = torch.tensor([[[2.0, 0.0, 1.0]], [[-1.0, 0.5, -1.0]], [[3.0, 3.0, 0.0]]])  # [K=3, P=1, S=3]
    pairs = [BootstrapPair(0, 0, 1, 1.0, 1.0), BootstrapPair(0, 0, 2, 1.0, 1.0)]
    # pair (0, 1): member 0 agrees, member 1 disagrees, member 2 ties (half)
    assert judge_agreement(members, [0.5, 0.25, 0.25], pairs)[0] == pytest.approx(0.5 + 0.125)
    # pair (0, 2): members 0 and 2 agree, member 1 ties
    assert judge_agreement(members, [1.0, 1.0, 2.0], pairs)[1] == pytest.approx((1 + 0.5 + 2) / 4)
    assert judge_agreement(members[:1], [1.0], pairs) == [1.0, 1.0]  # one policy: full confidence
    with pytest.raises(ValueError, match="weights"):
        judge_agreement(members, [1.0, 1.0], pairs)
