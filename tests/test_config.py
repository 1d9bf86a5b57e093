"""`--sera.*` options: one definition per flag (sera_openrlhf/config.py), validated before anything loads."""

from __future__ import annotations

import ast
import os
import time

import pytest
from conftest import REPO, run_cli

from sera_openrlhf.config import GROUPS, SeraConfig, defaults, options
from sera_openrlhf.errors import ConfigError

PACKAGE = os.path.join(REPO, "sera_openrlhf")
FLAGS = [f.name for g in GROUPS for f in options(g)]


def package_definitions() -> dict:
    counts = {}
    for root, _, files in os.walk(PACKAGE):
        for fn in files:
            if fn.endswith(".py"):
                path = os.path.join(root, fn)
                tree = ast.parse(open(path, encoding="utf-8").read())
                for parent in ast.walk(tree):  # give argparse literals their call as parent
                    for child in ast.iter_child_nodes(parent):
                        child.parent = parent
                for name, where in _definitions_from_tree(tree, FLAGS).items():
                    counts.setdefault(name, []).extend(f"{os.path.relpath(path, REPO)}:{w}" for w in where)
    return counts


def _definitions_from_tree(tree, flags) -> dict:
    """Where a module defines a flag: a `--sera.<flag>` add_argument call, or a dataclass field named after a
    flag (or mapped to it by the module's `_FLAGS`) whose default is a literal rather than config.py's."""
    mapped = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "_FLAGS" for t in node.targets):
            mapped = ast.literal_eval(node.value)
    found = {}
    for node in ast.walk(tree):
        if (isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("--sera.")
                and isinstance(getattr(node, "parent", None), ast.Call)
                and getattr(node.parent.func, "attr", None) == "add_argument"):
            name = node.value[len("--sera."):]
            if name in flags:
                found.setdefault(name, []).append("add_argument")
        if isinstance(node, ast.ClassDef):
            for stmt in node.body:
                if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and stmt.value is not None:
                    name = mapped.get(stmt.target.id, stmt.target.id)
                    literal = isinstance(stmt.value, ast.Constant) or (
                        isinstance(stmt.value, ast.Call) and getattr(stmt.value.func, "id", None) in ("option",
                                                                                                    "field"))
                    if name in flags and literal:
                        found.setdefault(name, []).append(f"{node.name}.{stmt.target.id}")
    return found


def test_each_flag_is_defined_exactly_once_in_config_py():
    counts = package_definitions()
    assert sorted(counts) == sorted(FLAGS)
    for name, where in counts.items():
        assert len(where) == 1 and where[0].startswith("sera_openrlhf/config.py:"), (name, where)


def test_the_checker_catches_a_second_definition():
    second = ast.parse('''
class SelectionConfig:
    keep_ratio: float = 0.7
def add(g):
    g.add_argument("--sera.top_p", type=float, default=1.0)
''')
    for parent in ast.walk(second):
        for child in ast.iter_child_nodes(parent):
            child.parent = parent
    assert _definitions_from_tree(second, FLAGS) == {"keep_ratio": ["SelectionConfig.keep_ratio"],
                                                     "top_p": ["add_argument"]}


def test_every_flag_has_help_and_a_valid_default():
    for g in GROUPS:
        for f in options(g):
            assert f.metadata["help"], f.name
    SeraConfig.from_namespace(defaults())  # the defaults pass their own checks


def parse(*flags):
    from sera_openrlhf.cli.train_dpo import parse_args, sera_config

    return sera_config(parse_args(["--model.model_name_or_path", "m", "--data.dataset", "d", *flags]))


@pytest.mark.parametrize("flag,value", [
    ("fluency_quantile", "10"), ("num_samples", "1"), ("ensemble_k", "0"), ("ensemble_decay", "0"),
    ("ensemble_lambda", "1.5"), ("min_margin", "nan"), ("score_batch_size", "0"), ("generation_batch_size", "0"),
    ("top_p", "0"), ("temperature", "-1"), ("crossfit_folds", "1"), ("keep_ratio", "0"), ("iterations", "0"),
    ("generated_share_max", "1"), ("review_min_agreement", "2"), ("fluency_floor", "inf"), ("min_keep", "0"),
    ("vllm_gpu_memory_utilization", "0"), ("bootstrap_nll_coef", "-0.1"), ("pair_top_fraction", "0"),
])
def test_a_bad_value_names_its_flag_before_anything_runs(flag, value):
    with pytest.raises(ConfigError, match=f"--sera.{flag}"):
        parse("--sera.enable", f"--sera.{flag}", value)


def test_loop_flags_need_enable_and_stock_path_flags_do_not():
    with pytest.raises(ConfigError, match="--sera.keep_ratio only acts in the SeRA loop"):
        parse("--sera.keep_ratio", "0.5")
    cfg = parse("--sera.loss", "ipo", "--sera.ref_cache", "off", "--sera.score_batch_size", "8")
    assert not cfg.loop.enable and cfg.loss.loss == "ipo" and cfg.scoring.score_batch_size == 8


def test_cli_rejects_a_later_iteration_value_within_seconds(tmp_path):
    # the model path does not exist: reaching the flag error proves nothing was loaded before it
    start = time.time()
    proc = run_cli(["--model.model_name_or_path", str(tmp_path / "no_model"), "--data.dataset", "x.jsonl",
                    "--sera.enable", "--sera.fluency_quantile", "10"], check=False)
    assert proc.returncode == 2 and "--sera.fluency_quantile must be in (0, 1)" in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and time.time() - start < 60


@pytest.mark.parametrize("flags,needle", [
    (["--model.ipo_enable", "--sera.loss", "simpo"], "--model.ipo_enable selects the IPO loss"),
    (["--model.label_smoothing", "0.1", "--sera.loss", "slic"], "--model.label_smoothing (the label-flip rate of cDPO / robust DPO) applies to the dpo"),
    (["--model.label_smoothing", "0.1", "--model.ipo_enable"], "--model.label_smoothing (the label-flip rate of cDPO / robust DPO) applies to the dpo"),
])
def test_stock_loss_flags_that_a_sera_loss_would_ignore_are_refused(flags, needle):
    from sera_openrlhf.cli.train_dpo import build_daa_loss, parse_args, sera_config

    args = parse_args(["--model.model_name_or_path", "m", "--data.dataset", "d", *flags])
    with pytest.raises(ConfigError) as e:
        build_daa_loss(args, sera_config(args))
    assert needle in str(e.value)
    ok = parse_args(["--model.model_name_or_path", "m", "--data.dataset", "d", "--model.ipo_enable"])
    assert type(build_daa_loss(ok, sera_config(ok))).__name__ == "IPOLoss"


def test_soft_review_takes_label_smoothing_as_its_prior_and_refuses_what_it_cannot_combine():
    from sera_openrlhf.cli.train_dpo import build_daa_loss, parse_args, sera_config

    def loss(*flags):
        args = parse_args(["--model.model_name_or_path", "m", "--data.dataset", "d", "--sera.enable", *flags])
        return build_daa_loss(args, sera_config(args))

    # the prior flip rate reaches the loss as per-pair confidences, so the loss itself is unsmoothed
    assert loss("--sera.select_mode", "soft", "--model.label_smoothing", "0.2").label_smoothing == 0.0
    assert loss("--model.label_smoothing", "0.2").label_smoothing == 0.2
    assert type(loss("--sera.select_mode", "soft", "--model.label_smoothing", "0.2", "--sera.loss", "simpo")
                ).__name__ == "SimPOLoss"
    with pytest.raises(ConfigError, match="cannot be combined with --sera.loss robust"):
        loss("--sera.select_mode", "soft", "--sera.loss", "robust")
    with pytest.raises(ConfigError, match="cannot be combined with --sera.selector my.mod:fn"):
        parse("--sera.enable", "--sera.select_mode", "soft", "--sera.selector", "my.mod:fn")


def test_adaptive_share_needs_an_out_of_sample_review():
    """--sera.share_min_auroc trusts the review's estimate of itself: refused in sample (where it reads ~0.9 on
    labels with no signal), accepted with fold twins or the prequential review."""
    for flags in ([], ["--sera.review_refit", "frozen"]):
        with pytest.raises(ConfigError, match="--sera.share_min_auroc 0.6 .* in sample"):
            parse("--sera.enable", "--sera.share_min_auroc", "0.6", *flags)
    for flags in (["--sera.review_refit", "crossfit", "--sera.crossfit_folds", "2"],
                  ["--sera.review_refit", "frozen", "--sera.crossfit_folds", "2"], ["--sera.review_refit", "prequential"]):
        assert parse("--sera.enable", "--sera.share_min_auroc", "0.6", *flags).loop.share_min_auroc == 0.6


def test_fold_epochs_needs_fold_twins():
    with pytest.raises(ConfigError, match="--sera.fold_epochs 3 .* needs --sera.crossfit_folds"):
        parse("--sera.enable", "--sera.fold_epochs", "3")
    with pytest.raises(ConfigError, match="--sera.fold_epochs"):
        parse("--sera.enable", "--sera.fold_epochs", "-1", "--sera.review_refit", "frozen", "--sera.crossfit_folds", "2")
    cfg = parse("--sera.enable", "--sera.fold_epochs", "3", "--sera.review_refit", "frozen", "--sera.crossfit_folds", "2")
    assert cfg.review.fold_epochs == 3
