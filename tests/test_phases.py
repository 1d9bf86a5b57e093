"""Phase units without OpenRLHF: a RunContext with a stand-in backend, run-dir files written by hand."""

from __future__ import annotations

import os

import pytest
from tiny import write_jsonl

from sera_openrlhf.config import SeraConfig, defaults
from sera_openrlhf.fileio import read_jsonl
from sera_openrlhf.losses import build_loss
from sera_openrlhf.phases import RunContext, pair, train
from sera_openrlhf.rundir import RunDir
from sera_openrlhf.state import RunState


class Backend:
    is_writer = True

    def __init__(self):
        self.messages, self.trained, self.epochs = [], [], []

    def print(self, msg):
        self.messages.append(msg)

    def train(self, name, rows, policy, reference, output_dir, epochs=None):
        self.trained.append((name, rows, policy, reference, output_dir))
        self.epochs.append(epochs)
        return {"n_train_pairs": len(rows)}


def context(tmp_path, loss="dpo", **flags) -> RunContext:
    cfg = SeraConfig.from_namespace({**defaults(), "enable": True, **flags})
    layout = RunDir(str(tmp_path), "/init/policy", "/init/ref", False, cfg.loop.reference, None)
    state = RunState(layout.state, {}, force=False, writer=True)
    state.mark("iter1/fluency_floor", {"floor": -3.0}, 1, seconds=0.0)
    daa = build_loss(loss, beta=2.0 if loss == "simpo" else 0.1)
    return RunContext(cfg, layout, state, Backend(), daa, None, [], True, [], seed=0)


def sample(prompt_id, s, text, n_tokens, pi, init, truncated=False):
    return {"prompt_id": prompt_id, "prompt": "p", "sample_index": s, "text": text, "truncated": truncated,
            "n_tokens": n_tokens, "logp": {"pi1": pi, "ref1": init, "init": init}}


def test_simpo_reward_is_divided_by_length_once(tmp_path):
    """SimPO's r = β/|y|·log π (Meng et al. Eq. 4) is per token already; --sera.length_normalized_reward must not
    divide it again. Hand numbers, β = 2: a: 2·(−4)/2 = −4; b: 2·(−9)/3 = −6; c: 2·(−20)/10 = −4.
    Once-normalised, a and c tie at the top and b is the worst; divided twice (−2, −2, −0.4) c would win and
    a/b would tie at the bottom."""
    ctx = context(tmp_path, loss="simpo", num_samples=3, length_normalized_reward=True)
    rows = [sample("q", 0, "a", 2, -4.0, -2.0), sample("q", 1, "b", 3, -9.0, -3.0),
            sample("q", 2, "c", 10, -20.0, -10.0)]
    write_jsonl(ctx.layout.samples(2), rows)
    stats = pair.run(ctx, 2)
    (boot,) = read_jsonl(ctx.layout.bootstrapped(2))
    assert boot["chosen"] in ("a", "c") and boot["rejected"] == "b"
    assert boot["margin"] == pytest.approx(2.0) and stats["guard"]["floor"] == -3.0


def test_no_bootstrapped_pair_warns_with_the_cause_and_training_uses_offline_pairs(tmp_path):
    ctx = context(tmp_path, num_samples=2)
    ctx.rows = [{"id": "o1", "prompt": "p", "chosen": "x", "rejected": "y"}]
    write_jsonl(ctx.layout.samples(2), [sample("q", 0, "a", 4, -4.0, -4.0, truncated=True),
                                        sample("q", 1, "b", 4, -4.0, -4.0, truncated=True)])
    stats = pair.run(ctx, 2)
    assert stats["n_pairs"] == 0 and "--sera.max_new_tokens" in stats["no_pair_cause"]
    assert any("no pair" in m and "--sera.keep_truncated" in m for m in ctx.backend.messages)
    write_jsonl(ctx.layout.review(2), [{"id": "o1", "weight": 1.0}])
    stats = train.run(ctx, 2)
    assert stats["n_offline"] == 1 and stats["n_generated"] == 0
    write_jsonl(ctx.layout.review(2), [{"id": "o1", "weight": 0.0}])
    with pytest.raises(Exception, match="nothing to train on"):
        train.run(ctx, 2)


def test_generated_share_does_not_depend_on_the_number_of_iterations(tmp_path):
    three, five = (context(tmp_path, iterations=n).cfg.loop for n in (3, 5))
    assert [train.generated_share(three, t) for t in (1, 2, 3)] == [0.0, 0.25, 0.5]
    assert [train.generated_share(five, t) for t in (1, 2, 3, 4, 5)] == [0.0, 0.25, 0.5, 0.5, 0.5]


@pytest.mark.parametrize("pick", ["random", "margin"])
def test_generated_pick(tmp_path, pick):
    ctx = context(tmp_path, generated_pick=pick, iterations=3)
    ctx.rows = [{"id": f"o{i}", "prompt": "p", "chosen": "x", "rejected": "y"} for i in range(4)]
    write_jsonl(ctx.layout.review(3), [{"id": r["id"], "weight": 1.0} for r in ctx.rows])
    boot = [{"id": f"boot3-q{i}", "prompt": "p", "chosen": "c", "rejected": "r", "margin": 10.0 - i} for i in range(8)]
    write_jsonl(ctx.layout.bootstrapped(3), boot)
    stats = train.run(ctx, 3)  # share 0.5 of the mix → as many generated as offline: 4 of 8
    picked = [r["id"] for r in read_jsonl(ctx.layout.train_set(3)) if r["id"].startswith("boot")]
    assert stats["generated_pick"] == pick and len(picked) == 4
    if pick == "margin":
        assert picked == [f"boot3-q{i}" for i in range(4)]
    else:  # seeded: the same subset when run again, and not simply the top of the margin list
        assert picked != [f"boot3-q{i}" for i in range(4)]
        train.run(ctx, 3)
        assert picked == [r["id"] for r in read_jsonl(ctx.layout.train_set(3)) if r["id"].startswith("boot")]


@pytest.mark.parametrize("n_mix,budget", [(10, 4), (4, 10), (3, 3)])
def test_train_pairs_gives_every_iteration_exactly_the_budget(tmp_path, n_mix, budget):
    """--sera.train_pairs N: a larger mix is subsampled, a smaller one repeated (unique ids, source kept), seeded;
    the fold twins leave out every copy of their fold's pairs."""
    ctx = context(tmp_path, train_pairs=budget, iterations=2)
    ctx.rows = [{"id": f"o{i}", "prompt": "p", "chosen": "x", "rejected": "y"} for i in range(n_mix)]
    write_jsonl(ctx.layout.review(2), [{"id": r["id"], "weight": 1.0} for r in ctx.rows])
    stats = train.run(ctx, 2)
    rows = read_jsonl(ctx.layout.train_set(2))
    assert stats["n_train_pairs"] == len(rows) == budget and stats["n_offline"] == n_mix
    assert len({r["id"] for r in rows}) == budget
    assert {r.get("source_id", r["id"]) for r in rows} <= {r["id"] for r in ctx.rows}
    if n_mix < budget:  # every pair at least once, none more than once more than another
        counts = [sum(r.get("source_id", r["id"]) == o["id"] for r in rows) for o in ctx.rows]
        assert min(counts) >= 1 and max(counts) - min(counts) <= 1
    train.run(ctx, 2)
    assert read_jsonl(ctx.layout.train_set(2)) == rows  # seeded: a resumed run trains on the same rows
    ctx.cfg.review.crossfit_folds = 2
    twin = train.fold_twin(ctx, 2, 0)
    in_fold = {r["id"] for r, k in zip(ctx.rows, train.folds(ctx)) if k == 0}
    trained = ctx.backend.trained[-1][1]
    assert twin["n_rows"] == len(trained) and not {r.get("source_id", r["id"]) for r in trained} & in_fold
    # the twin continues its own chain (pi_1's fold-0 twin), never pi_1, which trained on fold 0
    name, _, start, reference, out = ctx.backend.trained[-1]
    assert start == ctx.layout.fold_policy(1, 0) != ctx.layout.policy(1) and out == ctx.layout.fold_policy(2, 0)
    assert reference == ctx.layout.reference(2)  # the initial model by default
    assert ctx.backend.epochs[-2:] == [None, None]  # --train.max_epochs, as pi_2 (--sera.fold_epochs 0)
    ctx.cfg.review.fold_epochs = 3
    train.fold_twin(ctx, 2, 0)
    train.run(ctx, 2)
    assert ctx.backend.epochs[-2:] == [3, None]  # the twin trains 3 epochs, the policy as before
    soft = context(tmp_path / "soft", select_mode="soft", crossfit_folds=2, review_refit="frozen")
    soft.rows, soft.flip_prior = ctx.rows, 0.3
    train.first_pass(soft)
    assert {r["confidence"] for r in soft.backend.trained[-1][1]} == {0.7}  # pi_1: cDPO at the prior
    train.fold_twin(soft, 1, 1)
    twin_rows = soft.backend.trained[-1][1]
    assert twin_rows and not any("confidence" in r for r in twin_rows)  # its twin: the labels as given
    train.fold_twin(ctx, 1, 0)
    assert ctx.backend.trained[-1][2] == ctx.layout.policy(0)  # the chain starts at pi_0
    ctx.layout.reference_rule = "previous"  # --sera.reference previous: the twin's reference is its own chain's
    train.fold_twin(ctx, 2, 0)
    assert ctx.backend.trained[-1][3] == ctx.layout.fold_policy(1, 0)
    fp = context(tmp_path / "fp", train_pairs=budget)
    fp.rows = ctx.rows
    assert train.first_pass(fp)["n_train_pairs"] == budget


def test_wandb_statistics_resume_one_run_across_the_trainers_own_runs(monkeypatch):
    """The trainer's wandb.init(reinit=True) finishes any open run; each phase's SeRA statistics must still reach
    the single `<run_name>_sera` run (resumed by id) and log in first."""
    import sys
    import types

    from sera_openrlhf.metrics import LoggerSettings, PhaseMetrics

    calls = []

    class Run:
        def __init__(self, kw):
            self.id = kw["id"] or "sera-run-1"
            calls.append(("init", kw["name"], kw["id"], kw["resume"]))

        def log(self, data):
            calls.append(("log", self.id, data["sera/iteration"]))

        def finish(self):
            calls.append(("finish", self.id))

    fake = types.SimpleNamespace(api=types.SimpleNamespace(api_key=None), login=lambda key: calls.append(("login", key)),
                                 init=lambda **kw: Run(kw))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    metrics = PhaseMetrics(LoggerSettings(wandb_key="k", run_name="exp"), writer=True)
    metrics.log(2, "review", {"kept_share": 0.7})
    metrics.log(3, "review", {"kept_share": 0.7})
    assert calls == [("login", "k"), ("init", "exp_sera", None, "allow"), ("log", "sera-run-1", 2),
                     ("finish", "sera-run-1"), ("login", "k"), ("init", "exp_sera", "sera-run-1", "allow"),
                     ("log", "sera-run-1", 3), ("finish", "sera-run-1")]


def test_adaptive_share_grows_while_the_review_estimate_holds_and_shrinks_when_it_falls(tmp_path):
    """--sera.share_min_auroc 0.7: one step up per iteration while review t's estimated flip AUROC >= 0.7, one
    step down below it or without signal; within [0, --sera.generated_share_max]."""
    ctx = context(tmp_path, share_min_auroc=0.7, generated_share_step=0.25, generated_share_max=0.5, iterations=7,
                  review_refit="prequential")
    estimates = {2: (0.8, None), 3: (0.75, None), 4: (0.9, None), 5: (0.6, None), 6: (0.9, "no signal"),
                 7: (0.65, None)}
    shares = [train.target_share(ctx, 1)]
    for t, (est, fallback) in estimates.items():
        ctx.state.mark(f"iter{t}/review", {"calibration": {"est_flip_auroc": est, "fallback": fallback}}, t, 0.0)
        shares.append(train.target_share(ctx, t))
        ctx.state.mark(f"iter{t}/train", {"generated_share_target": shares[-1]}, t, 0.0)
    assert shares == [0.0, 0.25, 0.5, 0.5, 0.25, 0.0, 0.0]
    # a review with signal whose flip rate the IRMs cannot identify (cDPO weights) still counts by its estimate
    ctx = context(tmp_path / "unidentified", share_min_auroc=0.7, generated_share_step=0.25, iterations=3,
                  review_refit="prequential")
    for t, has_signal in ((2, True), (3, False)):
        cal = {"est_flip_auroc": 0.8, "fallback": "flip rate not identified: ...", "has_signal": has_signal}
        ctx.state.mark(f"iter{t}/review", {"calibration": cal}, t, 0.0)
        ctx.state.mark(f"iter{t}/train", {"generated_share_target": train.target_share(ctx, t)}, t, 0.0)
    assert [ctx.state.stats(t)["train"]["generated_share_target"] for t in (2, 3)] == [0.25, 0.0]
    fixed = context(tmp_path / "fixed", generated_share_step=0.25, generated_share_max=0.5)
    assert [train.target_share(fixed, t) for t in (1, 2, 3)] == [0.0, 0.25, 0.5]  # off: the fixed schedule


class ReviewBackend(Backend):
    """pair_rewards returns the chosen rewards it is given per call (rejected 0), in row order."""

    def __init__(self, rewards):
        super().__init__()
        self.rewards = rewards

    def pair_rewards(self, policy, reference, rows):
        import torch

        n = len(rows)
        return {"ids": [r["id"] for r in rows], "too_long": [], "chosen_reward": torch.tensor(self.rewards,
                dtype=torch.float64), "rejected_reward": torch.zeros(n, dtype=torch.float64),
                "chosen_len": torch.ones(n, dtype=torch.float64), "rejected_len": torch.ones(n, dtype=torch.float64)}


def test_review_average_ranks_by_the_mean_irm_of_the_last_k_reviews(tmp_path):
    from sera_openrlhf.phases import review

    from sera_openrlhf.sources import DataSpec

    spec = DataSpec("d", None, 0, "prompt", "chosen", "rejected", None, "train", False, False, None, "--data.dataset")
    ctx = context(tmp_path, review_average=2, keep_ratio=0.5, iterations=3)
    ctx.data = spec
    ctx.rows = [{"id": f"o{i}", "prompt": "p", "chosen": "x", "rejected": "y"} for i in range(4)]
    write_jsonl(ctx.layout.review(2), [{"id": f"o{i}", "irm": v, "kept": True}
                                       for i, v in enumerate([3.0, 2.0, -1.0, -2.0])])
    write_jsonl(str(tmp_path / "review2_without_o3.jsonl"), read_jsonl(ctx.layout.review(2))[:3])
    ctx.backend = ReviewBackend([-1.0, 0.0, 1.5, 1.0])  # alone it would keep o2, o3
    stats = review.run(ctx, 3)
    rows = {r["id"]: r for r in read_jsonl(ctx.layout.review(3))}
    assert [rows[f"o{i}"]["irm"] for i in range(4)] == [-1.0, 0.0, 1.5, 1.0]  # the current review, raw
    assert [rows[f"o{i}"]["irm_averaged"] for i in range(4)] == [1.0, 1.0, 0.25, -0.5]
    assert sorted(i for i, r in rows.items() if r["kept"]) == ["o0", "o1"]
    assert stats["calibration"]["reviews_averaged"] == 2 and "flip_rate" in stats["calibration"]
    # a pair an earlier review lacks is averaged over the reviews that have it
    os.replace(tmp_path / "review2_without_o3.jsonl", ctx.layout.review(2))
    review.run(ctx, 3)
    assert [r["irm_averaged"] for r in read_jsonl(ctx.layout.review(3))] == [1.0, 1.0, 0.25, 1.0]
    write_jsonl(ctx.layout.review(2), [{"id": f"o{i}", "irm": v, "kept": True}
                                       for i, v in enumerate([3.0, 2.0, -1.0, -2.0])])
    single = context(tmp_path / "one", keep_ratio=0.5, iterations=3)
    single.rows, single.data, single.backend = ctx.rows, spec, ReviewBackend([-1.0, 0.0, 1.5, 1.0])
    write_jsonl(single.layout.review(2), read_jsonl(ctx.layout.review(2)))
    review.run(single, 3)
    assert sorted(r["id"] for r in read_jsonl(single.layout.review(3)) if r["kept"]) == ["o2", "o3"]


def test_soft_review_on_in_sample_margins_warns_that_its_estimate_overstates(tmp_path):
    """The default review scores pairs the policy trained on: a soft review fitted to those margins says so (on
    labels with no signal such margins were measured to fit as an AUROC-0.9 review)."""
    from sera_openrlhf.phases import review
    from sera_openrlhf.sources import DataSpec

    ctx = context(tmp_path, select_mode="soft", iterations=2)
    ctx.data = DataSpec("d", None, 0, "prompt", "chosen", "rejected", None, "train", False, False, None,
                        "--data.dataset")
    ctx.rows = [{"id": f"o{i}", "prompt": "p", "chosen": "x", "rejected": "y"} for i in range(40)]
    ctx.backend = ReviewBackend([-1.0 - 0.05 * i if i % 5 == 0 else 1.0 + 0.05 * i for i in range(40)])
    stats = review.run(ctx, 2)
    assert stats["calibration"]["fallback"] is None and stats["calibration"]["out_of_fold"] is False
    assert sum("soft review calibrated on in-sample margins" in m for m in ctx.backend.messages) == 1


def test_review_per_token_divides_each_reward_by_its_length(tmp_path):
    from sera_openrlhf.phases import review
    from sera_openrlhf.sources import DataSpec

    import torch

    class LengthBackend(ReviewBackend):
        def pair_rewards(self, policy, reference, rows):
            out = super().pair_rewards(policy, reference, rows)
            out["rejected_reward"] = torch.tensor([1.0, 1.0], dtype=torch.float64)
            out["chosen_len"] = torch.tensor([10.0, 2.0], dtype=torch.float64)
            out["rejected_len"] = torch.tensor([1.0, 4.0], dtype=torch.float64)
            return out

    spec = DataSpec("d", None, 0, "prompt", "chosen", "rejected", None, "train", False, False, None, "--data.dataset")
    for flags, expected in (({}, [4.0, 0.0]), ({"review_per_token": True}, [-0.5, 0.25])):
        ctx = context(tmp_path / str(len(flags)), keep_ratio=0.5, iterations=2, **flags)
        ctx.rows, ctx.data = [{"id": f"o{i}", "prompt": "p", "chosen": "x", "rejected": "y"} for i in range(2)], spec
        ctx.backend = LengthBackend([5.0, 1.0])
        review.run(ctx, 2)
        assert [r["irm"] for r in read_jsonl(ctx.layout.review(2))] == expected


def test_prequential_review_reads_each_pairs_first_training_forward_and_scores_nothing(tmp_path):
    """--sera.review_refit prequential: the IRM of a pair is its margin in the first iteration-1 forward that
    trained on it (a copy o1#2 trained before o1 counts for o1; later epochs do not), no policy scores the pairs
    that trained, the review counts as out of sample and never converges; pairs iteration 1 never trained on are
    scored by π_1; a missing file or a mid-phase resume is an error naming the file."""
    from sera_openrlhf.errors import ConfigError
    from sera_openrlhf.phases import review
    from sera_openrlhf.sources import DataSpec

    class NoScoring(ReviewBackend):
        def pair_rewards(self, policy, reference, rows):
            assert policy == ctx.layout.policy(1) and reference == ctx.layout.reference(1)
            self.scored = [r["id"] for r in rows]
            return super().pair_rewards(policy, reference, rows)

    spec = DataSpec("d", None, 0, "prompt", "chosen", "rejected", None, "train", False, False, None, "--data.dataset")
    ctx = context(tmp_path, review_refit="prequential", keep_ratio=0.5, iterations=3)
    ctx.rows, ctx.data, ctx.backend = [{"id": f"o{i}", "prompt": "p", "chosen": "x", "rejected": "y"}
                                       for i in range(4)], spec, NoScoring([])

    def forward(i, epoch, step, rc, rr=0.0):
        return {"id": i, "epoch": epoch, "micro_step": step, "chosen_reward": rc, "rejected_reward": rr,
                "chosen_len": 2, "rejected_len": 3}

    write_jsonl(ctx.layout.train_margins(1), [
        forward("o0", 0, 1, 0.0), forward("o1#2", 0, 1, -0.5), forward("o2", 0, 2, 0.3, 0.1), forward("o1", 0, 2, 9.0),
        forward("o3", 0, 3, 0.4), forward("o0", 1, 4, 5.0), forward("o2", 1, 4, -7.0)])
    stats = review.run(ctx, 2)
    rows = {r["id"]: r for r in read_jsonl(ctx.layout.review(2))}
    assert {i: round(r["irm"], 9) for i, r in rows.items()} == {"o0": 0.0, "o1": -0.5, "o2": 0.2, "o3": 0.4}
    assert sorted(i for i, r in rows.items() if r["kept"]) == ["o2", "o3"]
    assert rows["o2"]["chosen_len"] == 2 and rows["o2"]["rejected_len"] == 3
    assert stats["calibration"]["out_of_fold"] is True and stats["signal"]["out_of_fold"] is True
    assert not hasattr(ctx.backend, "scored") and stats["n_prequential_unseen"] == 0
    review.run(ctx, 3)  # the same review every iteration
    assert [r["irm"] for r in read_jsonl(ctx.layout.review(3))] == [r["irm"] for r in rows.values()]
    ctx.state.mark("iter2/review", {"mean_irm_kept": 0.3, "jaccard_previous": 1.0}, 2, seconds=0.0)
    assert not review.converged(ctx, 4)
    write_jsonl(ctx.layout.train_margins(1), [forward("o0", 0, 1, 0.0), forward("o1", 0, 1, -0.1)])
    ctx.backend = NoScoring([7.0, -3.0])  # o2, o3: dropped with the last incomplete micro-batch
    stats = review.run(ctx, 2)
    assert ctx.backend.scored == ["o2", "o3"] and stats["n_prequential_unseen"] == 2
    assert [r["irm"] for r in read_jsonl(ctx.layout.review(2))] == pytest.approx([0.0, -0.1, 7.0, -3.0])
    ctx.state.mark("iter1/train", {"resumed_from_samples": 16}, 1, seconds=0.0)
    with pytest.raises(ConfigError, match="resumed from a DeepSpeed checkpoint.*train_margins.jsonl"):
        review.run(ctx, 2)
    os.remove(ctx.layout.train_margins(1))
    with pytest.raises(ConfigError, match="train_margins.jsonl is missing"):
        review.run(ctx, 2)
    with pytest.raises(ConfigError, match="skip_first_training"):
        SeraConfig.from_namespace({**defaults(), "enable": True, "review_refit": "prequential",
                                   "skip_first_training": True})
