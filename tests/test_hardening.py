"""Failure is boring: each bad input or fault below gets a clear error or a counted skip, and nothing is lost.

Rows of the hardening table that other files already test: malformed/encoding/missing-key/empty data
(test_data.py), every pair filtered (test_selection.py), no bootstrapped pair (test_bootstrap.py), corrupted
reference cache (test_refcache.py), custom model code (test_cli.py), SIGKILL at any phase and same-seed
reproducibility (test_loop.py).
"""

from __future__ import annotations

import errno
import json
import os
import textwrap

import pytest
import torch
from conftest import base_flags, read_jsonl, run_cli

from sera_openrlhf import fileio
from sera_openrlhf.errors import StateError
from sera_openrlhf.state import RunLock, RunState


# -- atomic writes -------------------------------------------------------------------------------------------
def test_write_error_keeps_the_previous_complete_file(tmp_path, monkeypatch):
    path = tmp_path / "kept.jsonl"
    fileio.atomic_write_jsonl(str(path), [{"id": "a"}])

    def disk_full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space left"):
        fileio.atomic_write_jsonl(str(path), [{"id": "b"}, {"id": "c"}])
    assert read_jsonl(path) == [{"id": "a"}]
    assert [p.name for p in tmp_path.iterdir()] == ["kept.jsonl"]  # no temp file left behind


# -- run directory: lock and state ----------------------------------------------------------------------------
def test_second_run_on_the_same_directory_is_refused(tmp_path):
    lock = RunLock(str(tmp_path / ".lock"))
    with pytest.raises(StateError, match="in use by another SeRA run"):
        RunLock(str(tmp_path / ".lock"))
    lock.release()
    RunLock(str(tmp_path / ".lock")).release()  # free again once released


def test_corrupted_state_file_is_detected(tmp_path):
    state = RunState(str(tmp_path / "sera_state.json"), {"sera": {"keep_ratio": 0.7}}, force=False, writer=True)
    state.mark("iter1/train", {"loss_last": 0.3}, 1, seconds=1.0)
    path = tmp_path / "sera_state.json"
    data = json.loads(path.read_text())
    data["done"].append("iter2/review")  # an edit that skips a phase
    path.write_text(json.dumps(data))
    with pytest.raises(StateError, match="fails its checksum"):
        RunState(str(tmp_path / "sera_state.json"), {"sera": {"keep_ratio": 0.7}}, force=False, writer=True)
    path.write_text("{not json")
    with pytest.raises(StateError, match="unreadable"):
        RunState(str(tmp_path / "sera_state.json"), {"sera": {"keep_ratio": 0.7}}, force=False, writer=True)


def test_changed_configuration_names_the_flag(tmp_path):
    RunState(str(tmp_path / "sera_state.json"), {"sera": {"keep_ratio": 0.7}, "local_rank": 0}, force=False, writer=True).save()
    # a launcher-assigned flag may differ
    RunState(str(tmp_path / "sera_state.json"), {"sera": {"keep_ratio": 0.7}, "local_rank": 3}, force=False, writer=True)
    with pytest.raises(StateError, match=r"--sera.keep_ratio 0.7 -> 0.5"):
        RunState(str(tmp_path / "sera_state.json"), {"sera": {"keep_ratio": 0.5}}, force=False, writer=True)
    RunState(str(tmp_path / "sera_state.json"), {"sera": {"keep_ratio": 0.5}}, force=True, writer=True)


def test_a_flag_newer_than_the_run_resumes_at_its_default_only(tmp_path):
    """A run started before a --sera flag existed resumes under a newer plugin while the flag keeps its default;
    set otherwise, it is a changed configuration like any other. Unknown or stock flags get no such pass."""
    path = str(tmp_path / "sera_state.json")
    RunState(path, {"sera": {"keep_ratio": 0.7}}, force=False, writer=True).save()
    RunState(path, {"sera": {"keep_ratio": 0.7, "judge_consistency": False, "crossfit_folds": 0}}, force=False,
             writer=True)
    with pytest.raises(StateError, match=r"--sera.judge_consistency None -> True"):
        RunState(path, {"sera": {"keep_ratio": 0.7, "judge_consistency": True}}, force=False, writer=True)
    with pytest.raises(StateError, match=r"--train.seed None -> 42"):
        RunState(path, {"sera": {"keep_ratio": 0.7}, "train": {"seed": 42}}, force=False, writer=True)


# -- NaN / inf ------------------------------------------------------------------------------------------------
NAN_LOSS = textwrap.dedent('''
    import torch
    from sera_openrlhf.losses import DPOLoss

    class NanAtStep3(DPOLoss):
        """DPO, but the third batch's loss is NaN (a stand-in for an overflow)."""
        calls = 0

        def compute_losses(self, batch):
            losses = super().compute_losses(batch)
            NanAtStep3.calls += 1
            return losses * float("nan") if NanAtStep3.calls == 3 else losses
''')


@pytest.mark.slow
def test_nan_loss_stops_before_the_step_and_the_run_resumes(tiny_model, tiny_data, tmp_path):
    loss_file = tmp_path / "nan_loss.py"
    loss_file.write_text(NAN_LOSS)
    run_dir = tmp_path / "run"
    flags = base_flags(tiny_model, tiny_data, str(run_dir), "--sera.enable", "--sera.iterations", "2",
                       "--sera.generated_share_max", "0")
    proc = run_cli(flags + ["--sera.loss", f"{loss_file}:NanAtStep3"], check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "non-finite loss" in proc.stderr and "Traceback" not in proc.stderr
    state = json.loads((run_dir / "sera_state.json").read_text())
    assert state["done"] == []  # iteration 1's training did not finish, so nothing is marked
    assert not (run_dir / "iter_1" / "policy" / "model.safetensors").exists()
    # fixing the cause and rerunning the same command (force: the loss flag changed) completes the run
    run_cli(flags + ["--sera.loss", "dpo", "--sera.force_resume"])
    assert "iter2/train" in json.loads((run_dir / "sera_state.json").read_text())["done"]


def test_non_finite_log_probs_are_detected_by_the_scoring_engine():
    from sera_openrlhf.errors import NonFiniteError
    from sera_openrlhf.scoring import score_sequences

    def logprobs(ids, mask):
        out = torch.zeros(ids.shape[0], ids.shape[1] - 1)
        out[0, -1] = float("inf") * -1
        return out

    with pytest.raises(NonFiniteError):
        score_sequences(logprobs, [(torch.tensor([1, 2, 3, 4]), 1)], pad_token_id=0, show_progress=False)


# -- data edge cases that are counted, not fatal --------------------------------------------------------------
@pytest.mark.slow
def test_identical_and_overlong_pairs_are_counted_and_skipped(tiny_model, tiny_data, tmp_path):
    rows = read_jsonl(tiny_data)
    rows[0]["rejected"] = rows[0]["chosen"]  # identical responses
    rows[1]["prompt"] = "tell me about the " + "dog " * 80 + ":"  # longer than --data.max_len 64
    data = tmp_path / "edge.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run_dir = tmp_path / "run"
    run_cli(base_flags(tiny_model, str(data), str(run_dir), "--sera.enable", "--sera.iterations", "2",
                       "--sera.generated_share_max", "0"))
    state = json.loads((run_dir / "sera_state.json").read_text())
    assert state["data"]["skipped"] == {"identical_responses": 1}
    # the over-long pair is skipped once, before anything trains, and counted per source
    assert state["data"]["prompt_too_long"]["pairs"] == {str(data): 1} and state["data"]["n_pairs"] == 62
    assert state["iterations"]["1"]["train"]["n_prompt_too_long"] == 0  # nothing left to drop later
    assert state["iterations"]["2"]["review"]["n_prompt_too_long"] == 0
    assert state["iterations"]["1"]["train"]["n_train_pairs"] == 62


def test_empty_dataset_is_a_clear_error(tiny_model, tmp_path):
    data = tmp_path / "empty.jsonl"
    data.write_text("")
    proc = run_cli(base_flags(tiny_model, str(data), str(tmp_path / "o"), "--sera.loss", "dpo"), check=False)
    assert proc.returncode == 2 and "empty.jsonl" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("value", ["1.5", "-0.1"])
def test_review_min_agreement_out_of_range_is_refused_before_training(tiny_model, tiny_data, tmp_path, value):
    run_dir = tmp_path / "run"
    proc = run_cli(base_flags(tiny_model, tiny_data, str(run_dir), "--sera.enable", "--sera.review_refit", "crossfit",
                              "--sera.crossfit_folds", "2", "--sera.review_min_agreement", value), check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"--sera.review_min_agreement must be in [0, 1], got {float(value)}" in proc.stderr
    assert "Traceback" not in proc.stderr and not (run_dir / "iter_1").exists()


# -- tokenizers -----------------------------------------------------------------------------------------------
def _tokenizer_variant(tiny_model, tmp_path, **changes):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    cfg_path = model / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update(changes)
    cfg_path.write_text(json.dumps(cfg))
    (model / "chat_template.jinja").unlink(missing_ok=True)
    return str(model)


def test_missing_chat_template_is_a_clear_error(tiny_model, tiny_data, tmp_path):
    model = _tokenizer_variant(tiny_model, tmp_path, chat_template=None)
    proc = run_cli(base_flags(model, tiny_data, str(tmp_path / "o"), "--sera.loss", "dpo",
                              "--data.apply_chat_template"), check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "--data.tokenizer_chat_template" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_tokenizer_without_pad_token_falls_back_to_eos(tiny_model, tiny_data, tmp_path):
    """Documented fallback (OpenRLHF's get_tokenizer): pad = eos. Training and the loop still run."""
    model = _tokenizer_variant(tiny_model, tmp_path, pad_token=None)
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(model).pad_token is None
    run_dir = tmp_path / "run"
    run_cli(base_flags(model, tiny_data, str(run_dir), "--sera.enable", "--sera.iterations", "2",
                       "--sera.generated_share_max", "0"))
    assert (run_dir / "iter_2" / "policy" / "model.safetensors").exists()
