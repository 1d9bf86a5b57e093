"""Extension points (issue: register your own DAA loss and data-selection callback without forking).

In-process: the built-ins sit in the same registries as user code, decorator registration, the two worked
examples in docs/examples loaded by file path, bad returns named by callback, and per-pair weights in the trainer.
Through the entry point (6 subprocess runs): the example loss trains, the example selectors drive a SeRA loop
(hard and soft selection), and bad paths / returns are one-line errors with exit code 2.
"""

from __future__ import annotations

import os
import shutil
import textwrap
from types import SimpleNamespace

import pytest
import torch
from conftest import REPO, base_flags, read_jsonl, run_cli
from safetensors.torch import load_file

from sera_openrlhf.errors import ConfigError, SelectionError
from sera_openrlhf.losses import LOSSES, DAALoss, DPOLoss, FunctionLoss, PreferenceBatch, build_loss
from sera_openrlhf.selection import SELECTORS, SelectionConfig, apply_selector

HINGE = os.path.join(REPO, "docs", "examples", "hinge_loss.py")
HARDEST = os.path.join(REPO, "docs", "examples", "hardest_pairs_selector.py")
HARDEST_REL = "docs/examples/hardest_pairs_selector.py"  # as docs/extending.md writes it; run_cli runs in REPO


def table(irm, ids=None):
    irm = torch.tensor(irm, dtype=torch.float64)
    ids = ids or [f"p{i}" for i in range(len(irm))]
    return {"id": ids, "irm": irm, "chosen_reward": irm, "rejected_reward": torch.zeros_like(irm), "irm_prev": []}


def pref_batch(requires_grad=True):
    pc = torch.tensor([-3.0, -4.0, -5.0], requires_grad=requires_grad)
    pr = torch.tensor([-4.0, -3.0, -5.5])
    return PreferenceBatch(pc, pr, torch.tensor([-3.5, -3.5, -5.0]), torch.tensor([-3.5, -3.5, -5.0]))


@pytest.fixture
def restore_registries():
    """Undo registrations a test makes on the global registries."""
    saved = {reg: dict(reg._entries) for reg in (LOSSES, SELECTORS)}
    yield
    for reg, entries in saved.items():
        reg._entries.clear()
        reg._entries.update(entries)


# ------------------------------------------------------------------------------------------- registries


def test_builtins_go_through_the_same_registries():
    assert {"dpo", "ipo", "slic", "simpo", "rdpo"} <= set(LOSSES.names())
    assert {"irm", "top", "threshold"} <= set(SELECTORS.names())
    for name in ("dpo", "ipo", "slic", "simpo", "rdpo"):
        assert issubclass(LOSSES.get(name), DAALoss), name
        assert isinstance(build_loss(name), LOSSES.get(name))
    t = table([0.3, -1.0, 2.0, 0.0])
    assert apply_selector("top", t, SelectionConfig(keep_ratio=0.5)).kept_ids == ["p0", "p2"]


def test_decorator_registration_by_name(restore_registries):
    @LOSSES.register("test_ext_hinge")
    class Hinge(DAALoss):
        def compute_losses(self, batch):
            return torch.relu(1 - self.beta * (batch.policy_chosen_logps - batch.policy_rejected_logps))

    @SELECTORS.register("test_ext_first_two")
    def first_two(table, config):
        return list(table["id"][:2])

    assert "test_ext_hinge" in LOSSES.names() and "test_ext_first_two" in SELECTORS.names()
    assert isinstance(build_loss("test_ext_hinge", beta=0.5, gamma=3.0), Hinge)  # unknown params are not passed
    assert apply_selector("test_ext_first_two", table([1.0, 2.0, 3.0]), SelectionConfig()).kept_ids == ["p0", "p1"]
    with pytest.raises(ConfigError, match="already registered"):
        SELECTORS.register("test_ext_first_two")(first_two)


# ------------------------------------------------------------------------------------------- the example loss


def test_example_loss_class_by_file_path():
    cls = LOSSES.get(f"{HINGE}:SquaredHingeLoss", flag="--sera.loss")
    assert issubclass(cls, DAALoss)
    loss = build_loss(f"{HINGE}:SquaredHingeLoss", beta=0.5, delta=2.0, gamma=9.0, label_smoothing=0.1)
    assert isinstance(loss, cls) and loss.beta == 0.5 and loss.delta == 2.0  # CLI values reach the constructor
    b = pref_batch()
    out = loss(b)
    h = torch.tensor([1.0, -1.0, 0.5])  # (pc - pr) - (rc - rr)
    assert torch.allclose(out.losses, torch.relu(2.0 - 0.5 * h) ** 2)
    assert torch.allclose(out.chosen_rewards, 0.5 * torch.tensor([0.5, -0.5, 0.0]))  # DPO's implicit reward
    out.losses.mean().backward()
    assert b.policy_chosen_logps.grad is not None and (b.policy_chosen_logps.grad < 0).all()


def test_example_loss_function_form_matches_class_form():
    fn_loss = build_loss(f"{HINGE}:squared_hinge", beta=0.5, delta=2.0, alpha=1.0)
    cls_loss = build_loss(f"{HINGE}:SquaredHingeLoss", beta=0.5, delta=2.0)
    assert isinstance(fn_loss, FunctionLoss)
    a, b = fn_loss(pref_batch()), cls_loss(pref_batch())
    for f in ("losses", "chosen_rewards", "rejected_rewards"):
        assert torch.allclose(getattr(a, f), getattr(b, f)), f


# ------------------------------------------------------------------------------------------- the example selectors


def test_keep_hardest_keeps_lowest_irm():
    t = table([0.5, -1.0, 2.0, 0.1, 0.1, 3.0], ids=["a", "b", "c", "e", "d", "f"])
    res = apply_selector(f"{HARDEST}:keep_hardest", t, SelectionConfig(keep_ratio=0.5))
    assert res.kept_ids == ["b", "e", "d"]  # table order; the 0.1 tie is within k, both kept
    assert res.weights.tolist() == [0.0, 1.0, 0.0, 1.0, 1.0, 0.0]
    res = apply_selector(f"{HARDEST}:keep_hardest", t, SelectionConfig(keep_ratio=1 / 3))
    assert res.kept_ids == ["b", "d"]  # a tie at the cut goes to the smaller id
    # min_keep raises k; the same answer as the built-in with direction 'low'
    cfg = SelectionConfig(keep_ratio=0.1, min_keep=4)
    res = apply_selector(f"{HARDEST}:keep_hardest", t, cfg)
    assert set(res.kept_ids) == {"a", "b", "d", "e"}
    assert res.kept_ids == apply_selector("top", t, SelectionConfig(keep_ratio=0.1, min_keep=4,
                                                                    direction="low")).kept_ids


def test_soft_weights_favour_hard_pairs():
    t = table([0.5, -1.0, 2.0, 0.1])
    res = apply_selector(f"{HARDEST}:soft_weights", t, SelectionConfig())
    w = res.weights
    assert res.kept_ids == ["p0", "p1", "p2", "p3"]  # every weight > 0: nothing dropped
    assert float(w.mean()) == pytest.approx(1.0, abs=1e-6)
    assert w[1] > w[3] > w[0] > w[2] > 0  # lower IRM, higher weight
    # --sera.drop_negative_irm zeroes (drops) IRM < 0; equal margins give equal weights
    res = apply_selector(f"{HARDEST}:soft_weights", t, SelectionConfig(drop_negative=True))
    assert res.kept_ids == ["p0", "p2", "p3"] and res.weights[1] == 0
    res = apply_selector(f"{HARDEST}:soft_weights", table([0.0, 0.0, 0.0]), SelectionConfig())
    assert res.weights.tolist() == [1.0, 1.0, 1.0]


# ------------------------------------------------------------------------------------------- errors in-process

BAD_CALLBACKS = textwrap.dedent(
    """
    import torch
    from sera_openrlhf.losses import LossOutput

    def wrong_length(table, config):
        return torch.ones(len(table["id"]) - 1)

    def returns_int(table, config):
        return 3

    def unknown_ids(table, config):
        return ["nope"]

    def negative(table, config):
        return -torch.ones(len(table["id"]))

    def keeps_nothing(table, config):
        return []

    def loss_wrong_shape(batch, beta=0.1):
        return LossOutput(batch.policy_chosen_logps[:1], batch.policy_chosen_logps, batch.policy_rejected_logps)

    def loss_wrong_type(batch, beta=0.1):
        return batch.policy_chosen_logps
    """
)


@pytest.fixture
def bad_file(tmp_path):
    path = tmp_path / "bad_callbacks.py"
    path.write_text(BAD_CALLBACKS)
    return str(path)


@pytest.mark.parametrize("fn,match", [
    ("wrong_length", r"weights of shape \(2,\); expected \(3,\)"),
    ("returns_int", "returned int; expected a list of kept ids or a weight Tensor"),
    ("unknown_ids", "id\\(s\\) not in the table, e.g. 'nope'"),
    ("negative", "negative, NaN or infinite"),
])
def test_bad_selector_returns_name_the_callback(bad_file, fn, match):
    spec = f"{bad_file}:{fn}"
    with pytest.raises(ConfigError, match=match) as e:
        apply_selector(spec, table([1.0, 2.0, 3.0]), SelectionConfig())
    assert spec in str(e.value)


def test_selector_keeping_too_few_names_flags(bad_file):
    with pytest.raises(SelectionError, match="kept 0 of 3 pairs.*--sera.min_keep") as e:
        apply_selector(f"{bad_file}:keeps_nothing", table([1.0, 2.0, 3.0]), SelectionConfig())
    assert "keeps_nothing" in str(e.value)


@pytest.mark.parametrize("fn,match", [("loss_wrong_shape", r"losses of shape \(1,\); expected per-example shape"),
                                      ("loss_wrong_type", "returned Tensor; expected LossOutput")])
def test_bad_loss_returns_name_the_callback(bad_file, fn, match):
    loss = build_loss(f"{bad_file}:{fn}")
    with pytest.raises(ConfigError, match=match) as e:
        loss(pref_batch())
    assert str(e.value).startswith(f"--sera.loss: loss callback '{bad_file}:{fn}'")


@pytest.mark.parametrize("registry,flag,spec,match", [
    (LOSSES, "--sera.loss", "nope.mod:fn", "cannot import module 'nope.mod'"),
    (LOSSES, "--sera.loss", f"{HINGE}:NoSuchLoss", "has no attribute 'NoSuchLoss'"),
    (SELECTORS, "--sera.selector", "/nonexistent/missing.py:f", "file '/nonexistent/missing.py' not found"),
    (SELECTORS, "--sera.selector", "keep_hardest", "unknown selector 'keep_hardest'. Registered: irm, "),
])
def test_bad_paths_name_flag_and_callback(registry, flag, spec, match):
    with pytest.raises(ConfigError, match=match) as e:
        registry.get(spec, flag=flag)
    assert str(e.value).startswith(f"{flag}: ")


# ------------------------------------------------------------------------------------------- weights in the trainer


class _StubActor(torch.nn.Module):
    """Stands in for OpenRLHF's Actor: per-token log-probs from one learnable logit per vocabulary entry."""

    def __init__(self, vocab=16):
        super().__init__()
        self.logit = torch.nn.Parameter(torch.linspace(-1.0, 1.0, vocab))

    def forward(self, input_ids, attention_mask=None, return_output=False, return_logprobs=False,
                ring_attn_group=None):
        logp = torch.log_softmax(self.logit, -1)[input_ids[:, 1:]]
        return logp, {}


def test_trainer_multiplies_each_pair_loss_by_its_weight():
    from sera_openrlhf.openrlhf_adapter import compat

    compat.apply()  # before anything imports openrlhf.models (no flash_attn on CPU)
    from sera_openrlhf.openrlhf_adapter.trainer import SeraDPOTrainer

    trainer = SeraDPOTrainer.__new__(SeraDPOTrainer)  # only what batch_loss touches
    trainer.model, trainer.daa_loss = _StubActor(), DPOLoss(beta=0.5)
    trainer.tokenizer, trainer.strategy = SimpleNamespace(pad_token_id=0), SimpleNamespace(ring_attn_group=None)
    trainer.ref_logps = lambda dataset, idx: (torch.full((len(idx),), -6.0), torch.full((len(idx),), -6.0))
    trainer.nll_loss = trainer.aux_loss = False
    trainer.packed = None  # the stock forward (--sera.packed_train off)
    B, L = 3, 6
    gen = torch.Generator().manual_seed(0)
    chosen, rejected = (torch.randint(1, 16, (B, 1, L), generator=gen) for _ in range(2))
    mask = torch.ones(B, 1, L, dtype=torch.long)
    data = (chosen, mask, rejected, mask.clone(), [2] * B, torch.tensor([2, 0, 1]))

    def loss_with(weights):
        dataset = SimpleNamespace(weights=torch.tensor(weights), nll_coefs=torch.zeros(3), confidences=torch.ones(3))
        _, preference_loss, out, _, _ = trainer.batch_loss(data, dataset)
        return preference_loss, out.losses

    unweighted, per_pair = loss_with([1.0, 1.0, 1.0])
    assert torch.allclose(unweighted, per_pair.mean())
    weighted, _ = loss_with([0.5, 0.0, 2.0])  # rows 2, 0, 1 of the dataset are in the batch
    assert torch.allclose(weighted, (per_pair * torch.tensor([2.0, 0.5, 0.0])).mean())
    zero, _ = loss_with([0.0, 0.0, 0.0])
    zero.backward()
    assert zero.item() == 0.0 and torch.count_nonzero(trainer.model.logit.grad) == 0


# ------------------------------------------------------------------------------------------- through the entry point


def _error_of(args) -> str:
    proc = run_cli(args, check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return proc.stderr


def test_cli_bad_loss_path_is_a_clear_error(tiny_model, tiny_data, tmp_path):
    err = _error_of(base_flags(tiny_model, tiny_data, str(tmp_path / "o"), "--sera.loss", "nope.mod:fn"))
    assert "--sera.loss" in err and "nope.mod:fn" in err and "cannot import module 'nope.mod'" in err


@pytest.mark.slow
def test_cli_trains_with_example_loss_from_a_file(tiny_model, tiny_data, tmp_path):
    user = tmp_path / "user_code" / "my_hinge.py"  # a copy: nothing of docs/ or the package is special
    user.parent.mkdir()
    shutil.copy(HINGE, user)
    out = tmp_path / "out"
    proc = run_cli(base_flags(tiny_model, tiny_data, str(out), "--sera.loss", f"{user}:SquaredHingeLoss",
                              "--train.max_epochs", "2"))
    assert "model saved to" in proc.stdout
    log = read_jsonl(out / "train_log.jsonl")
    assert len(log) == 16  # 64 pairs / batch 8 * 2 epochs
    first, last = sum(r["loss"] for r in log[:4]) / 4, sum(r["loss"] for r in log[-4:]) / 4
    assert last < first - 0.05, (first, last)
    assert log[0]["loss"] == pytest.approx(1.0, abs=0.05)  # (delta - beta * 0)^2 at the start: policy == reference
    before, after = load_file(f"{tiny_model}/model.safetensors"), load_file(out / "model.safetensors")
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert len(changed) >= len(before) // 2


SS_ONLY = ["--sera.enable", "--sera.iterations", "2", "--sera.generated_share_max", "0"]


@pytest.fixture(scope="module")
def hardest_run(tiny_model, tiny_data, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("ext_hardest") / "run"
    run_cli(base_flags(tiny_model, tiny_data, str(run_dir), *SS_ONLY, "--sera.keep_ratio", "0.25",
                       "--sera.selector", f"{HARDEST_REL}:keep_hardest"))
    return run_dir


@pytest.mark.slow
def test_cli_loop_with_keep_hardest_selector(hardest_run):
    d = hardest_run / "iter_2"
    review = read_jsonl(d / "review.jsonl")
    assert len(review) == 64 and len({r["irm"] for r in review}) > 32  # a trained policy: margins differ
    hardest = sorted(review, key=lambda r: (r["irm"], r["id"]))[:16]  # round(0.25 * 64)
    assert {r["id"] for r in review if r["kept"]} == {r["id"] for r in hardest}
    assert all(r["weight"] == (1.0 if r["kept"] else 0.0) for r in review)
    assert {r["id"] for r in read_jsonl(d / "kept.jsonl")} == {r["id"] for r in hardest}
    train = read_jsonl(d / "train_set.jsonl")
    assert {r["id"] for r in train} == {r["id"] for r in hardest} and all(r["weight"] == 1.0 for r in train)
    assert (d / "policy" / "model.safetensors").exists()
    assert not (d / "samples.jsonl").exists()  # self-review only: no generation


@pytest.mark.slow
def test_cli_loop_with_soft_weights_selector(hardest_run, tiny_model, tiny_data, tmp_path):
    """Starts from the keep_hardest run's iteration-1 policy (no retraining): the same review, soft weights."""
    run_dir = tmp_path / "run"
    run_cli(base_flags(str(hardest_run / "iter_1" / "policy"), tiny_data, str(run_dir), *SS_ONLY,
                       "--ref.model_name_or_path", tiny_model, "--sera.skip_first_training",
                       "--sera.selector", f"{HARDEST_REL}:soft_weights"))
    soft_weights = SELECTORS.get(f"{HARDEST}:soft_weights")
    review = read_jsonl(run_dir / "iter_2" / "review.jsonl")
    same_policy = {r["id"]: r["irm"] for r in read_jsonl(hardest_run / "iter_2" / "review.jsonl")}
    assert [r["irm"] for r in review] == pytest.approx([same_policy[r["id"]] for r in review], rel=1e-4, abs=1e-5)
    expected = soft_weights(table([r["irm"] for r in review], [r["id"] for r in review]), SelectionConfig())
    weights = [r["weight"] for r in review]
    assert weights == pytest.approx(expected.tolist(), rel=1e-6)
    assert all(r["kept"] for r in review) and sum(weights) / len(weights) == pytest.approx(1.0, abs=1e-5)
    assert max(weights) > 1.2 and min(weights) < 0.8  # really soft, not all ones
    train = read_jsonl(run_dir / "iter_2" / "train_set.jsonl")
    assert {r["id"]: r["weight"] for r in train} == {r["id"]: r["weight"] for r in review}


@pytest.mark.slow
@pytest.mark.parametrize("which", ["missing_file", "wrong_length"])
def test_cli_bad_selector_is_a_clear_error(tiny_model, tiny_data, tmp_path, which):
    if which == "missing_file":
        spec = f"{tmp_path / 'missing.py'}:f"
        expect = "not found"
    else:
        (tmp_path / "bad_sel.py").write_text(BAD_CALLBACKS)
        spec = f"{tmp_path / 'bad_sel.py'}:wrong_length"
        expect = "weights of shape (63,); expected (64,)"
    # --sera.skip_first_training: the review (and so the selector) runs first, with no training before it
    err = _error_of(base_flags(tiny_model, tiny_data, str(tmp_path / "run"), *SS_ONLY, "--sera.skip_first_training",
                               "--sera.selector", spec))
    assert spec in err and expect in err, err[-2000:]
