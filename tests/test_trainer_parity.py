"""`SeraDPOTrainer.fit`/`evaluate` are copies of OpenRLHF's `DPOTrainer.fit`/`evaluate` (0.11.2 has no narrower
hook for the loss). This pins the copy: with the `dpo` loss, a real reference model (no cache), every weight 1 and
every NLL coefficient 0, our trainer must train exactly as the stock one does.

Both trainers run one after the other in one subprocess (a world of one, CPU, fp32, ZeRO-2), built the way
`openrlhf_adapter.train.train_policy` builds ours, from the same tiny model, on the same pairs in the same order
(the datasets' items are checked equal), with the same seed, for 2 epochs of 3 optimizer steps of 2 micro-batches
each, with an evaluation pass every 3 steps. Compared: the loss of every micro-batch as handed to
`strategy.backward`, the logged metrics of every optimizer step, the evaluation metrics, and every parameter at
the end.

Run `python tests/test_trainer_parity.py OUT.pt MODEL_DIR` to produce the numbers by hand.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import ENV, REPO

N_TRAIN, N_EVAL, EPOCHS = 24, 8, 2
BATCH, MICRO = 8, 4  # 3 optimizer steps per epoch, 2 micro-batches each
BETA = 0.1
COMPARED_LOGS = ("loss", "acc", "chosen_reward", "reject_reward", "lr", "grad_norm", "loss_mean", "acc_mean")


# --- the worker (runs in the subprocess) ------------------------------------------------------------------------


def run_both(out_path: str, model_path: str) -> None:
    from sera_openrlhf.openrlhf_adapter import compat

    compat.set_launch_env_defaults()  # RANK=0, WORLD_SIZE=1, DS_ACCELERATOR=cpu, ...
    compat.apply()  # before anything imports openrlhf.models

    import torch
    from datasets import Dataset
    from openrlhf.datasets import RewardDataset
    from openrlhf.trainer.dpo_trainer import DPOTrainer

    import tiny  # tests/tiny.py: this script's directory is on sys.path
    from sera_openrlhf.losses import build_loss
    from sera_openrlhf.openrlhf_adapter.args import build_stock_parser, postprocess_stock_args
    from sera_openrlhf.openrlhf_adapter.train import build_dataset, load_actor, load_tokenizer, setup_strategy
    from sera_openrlhf.openrlhf_adapter.trainer import SeraDPOTrainer

    out_dir = os.path.dirname(os.path.abspath(out_path))
    flags = [
        "--model.model_name_or_path", model_path, "--data.dataset", "unused", "--data.prompt_key", "prompt",
        "--data.max_len", "64", "--train.batch_size", str(BATCH), "--train.micro_batch_size", str(MICRO),
        "--train.max_epochs", str(EPOCHS), "--ds.zero_stage", "2", "--ds.param_dtype", "fp32",
        "--ds.attn_implementation", "sdpa", "--adam.lr", "1e-3", "--model.beta", str(BETA), "--eval.steps", "3",
        "--lr_warmup_ratio", "0",  # so that the first step already moves the weights
        "--ckpt.output_dir", out_dir, "--ckpt.path", os.path.join(out_dir, "ckpt"),
    ]
    args = postprocess_stock_args(build_stock_parser().parse_args(flags))
    strategy = setup_strategy(args)
    train_rows = tiny.preference_pairs(N_TRAIN, seed=1)
    eval_rows = tiny.preference_pairs(N_EVAL, seed=2)

    def stock_datasets(tokenizer):
        def make(rows):
            return RewardDataset(Dataset.from_list(rows), tokenizer, args.data.max_len, strategy,
                                 input_template=args.data.input_template, is_dpo=True, num_processors=1)

        return make(train_rows), make(eval_rows)

    def our_datasets(tokenizer):
        return (build_dataset(args, tokenizer, train_rows, use_prompt_key=True),
                build_dataset(args, tokenizer, eval_rows, use_prompt_key=True))

    def train(name):
        torch.manual_seed(args.train.seed)
        model = load_actor(args, strategy, model_path, train=True)
        tokenizer = load_tokenizer(args, strategy, model_path, model)
        ref_model = load_actor(args, strategy, model_path, train=False)
        load_tokenizer(args, strategy, model_path, ref_model)  # as stock train() does for its reference
        train_ds, eval_ds = (stock_datasets if name == "stock" else our_datasets)(tokenizer)
        train_dl = strategy.setup_dataloader(train_ds, MICRO, True, True, train_ds.collate_fn)
        eval_dl = strategy.setup_dataloader(eval_ds, MICRO, True, False, eval_ds.collate_fn, drop_last=False)
        steps_per_epoch = len(train_ds) // args.train.batch_size
        cfg = dict(optim=args.optim, muon=vars(args.muon), adam=vars(args.adam), lr_scheduler=args.lr_scheduler,
                   lr_warmup_ratio=args.lr_warmup_ratio, min_lr_ratio=args.min_lr_ratio, max_norm=args.max_norm,
                   scheduler_steps=EPOCHS * steps_per_epoch)
        (model, optim, scheduler), ref_model = strategy.prepare((model, cfg), ref_model)
        common = dict(model=model, ref_model=ref_model, tokenizer=tokenizer, strategy=strategy, optim=optim,
                      train_dataloader=train_dl, eval_dataloader=eval_dl, scheduler=scheduler,
                      max_norm=args.max_norm, beta=args.model.beta, max_epochs=args.train.max_epochs,
                      save_hf_ckpt=args.ckpt.save_hf, disable_ds_ckpt=args.ckpt.disable_ds)
        if name == "stock":
            trainer = DPOTrainer(**common)
        else:
            assert all(float(w) == 1.0 for w in train_ds.weights) and not bool(train_ds.nll_coefs.any())
            trainer = SeraDPOTrainer(daa_loss=build_loss("dpo", beta=BETA), train_dataset=train_ds,
                                     ref_logps=None, packed=name == "packed", **common)
            assert (trainer.packed is not None) is (name == "packed")

        rec = {"micro_losses": [], "step_logs": [], "eval_logs": []}
        backward, all_reduce = strategy.backward, strategy.all_reduce
        save_logs = trainer.save_logs_and_checkpoints

        def record_backward(loss, *a, **k):
            rec["micro_losses"].append(loss.detach().clone())
            return backward(loss, *a, **k)

        def record_all_reduce(data, *a, **k):
            result = all_reduce(data, *a, **k)
            if isinstance(data, dict) and "eval_loss" in data:  # the end of evaluate()
                rec["eval_logs"].append(dict(result))
            return result

        def record_save_logs(a, global_step, step_bar, logs_dict=None, client_states=None):
            rec["step_logs"].append({"global_step": global_step, **(logs_dict or {})})
            return save_logs(a, global_step, step_bar, logs_dict, client_states)

        strategy.backward, strategy.all_reduce = record_backward, record_all_reduce
        trainer.save_logs_and_checkpoints = record_save_logs
        try:
            trainer.fit(args, 0, steps_per_epoch)
        finally:
            del strategy.backward, strategy.all_reduce  # back to the class's methods
        rec["params"] = {k: v.detach().clone() for k, v in model.model.module.named_parameters()}
        rec["packed_used"] = getattr(trainer, "packed", None) is not None and not trainer.packed.disabled
        rec["items"] = [tuple(train_ds[i][:5]) for i in range(len(train_ds))]
        rec["items"] += [tuple(eval_ds[i][:5]) for i in range(len(eval_ds))]
        return rec

    torch.save({name: train(name) for name in ("stock", "ours", "packed")}, out_path)


if __name__ == "__main__":
    run_both(*sys.argv[1:3])
    sys.exit(0)


# --- the test ---------------------------------------------------------------------------------------------------


def assert_items_equal(stock_items, our_items):
    import torch

    assert len(stock_items) == len(our_items) == N_TRAIN + N_EVAL  # no pair dropped on either side
    for i, (s, o) in enumerate(zip(stock_items, our_items)):
        for a, b in zip(s, o):
            same = torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b
            assert same, f"dataset item {i} differs: stock {s} vs ours {o}"


@pytest.fixture(scope="module")
def parity_run(tiny_model, tmp_path_factory):
    import torch

    out = tmp_path_factory.mktemp("parity") / "parity.pt"
    # run as a script, so the repository is not on sys.path by itself
    pythonpath = os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p)
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), str(out), tiny_model], check=False,
                          cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, **ENV, "PYTHONPATH": pythonpath})
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return torch.load(out, weights_only=False)


@pytest.mark.slow
def test_sera_trainer_trains_exactly_like_stock_dpo_trainer(parity_run, tiny_model):
    import torch
    from safetensors.torch import load_file

    stock, ours = parity_run["stock"], parity_run["ours"]

    assert_items_equal(stock["items"], ours["items"])

    # every micro-batch's loss (what each trainer backpropagates)
    n_micro = EPOCHS * N_TRAIN // MICRO
    assert len(stock["micro_losses"]) == len(ours["micro_losses"]) == n_micro
    torch.testing.assert_close(torch.stack(ours["micro_losses"]), torch.stack(stock["micro_losses"]),
                               rtol=1e-6, atol=1e-7, msg=lambda m: f"per-micro-batch losses differ:\n{m}")

    # what every optimizer step logs (and hands to save_logs_and_checkpoints)
    n_steps = EPOCHS * N_TRAIN // BATCH
    assert [r["global_step"] for r in stock["step_logs"]] == list(range(1, n_steps + 1))
    assert [r["global_step"] for r in ours["step_logs"]] == list(range(1, n_steps + 1))
    for s, o in zip(stock["step_logs"], ours["step_logs"]):
        for key in COMPARED_LOGS:
            torch.testing.assert_close(o[key], s[key], rtol=1e-6, atol=1e-7,
                                       msg=lambda m, k=key, g=s["global_step"]: f"step {g} {k}: {m}")

    # evaluation passes (after steps 3 and 6)
    assert len(stock["eval_logs"]) == len(ours["eval_logs"]) == n_steps // 3
    for s, o in zip(stock["eval_logs"], ours["eval_logs"]):
        assert set(s) == {"eval_loss", "acc_mean"} and set(o) == set(s) | {"margin"}  # ours adds the mean margin
        for key in s:
            torch.testing.assert_close(o[key], s[key], rtol=1e-6, atol=1e-7, msg=lambda m, k=key: f"eval {k}: {m}")

    # the trained weights
    assert list(ours["params"]) == list(stock["params"])
    initial = load_file(os.path.join(tiny_model, "model.safetensors"))
    assert all(not torch.equal(p, initial[n]) for n, p in stock["params"].items())  # training moved every tensor
    for name, p in stock["params"].items():
        torch.testing.assert_close(ours["params"][name], p, rtol=1e-6, atol=1e-7,
                                   msg=lambda m, n=name: f"parameter {n} differs after training:\n{m}")


@pytest.mark.slow
def test_packed_training_forward_trains_like_stock_up_to_float_rounding(parity_run):
    """--sera.packed_train (a pair's prompt once, LM head on response positions only): the same losses, logs and
    weights as the stock trainer, up to float rounding (the forwards sum in a different order)."""
    import torch

    stock, packed = parity_run["stock"], parity_run["packed"]
    assert packed["packed_used"]
    torch.testing.assert_close(torch.stack(packed["micro_losses"]), torch.stack(stock["micro_losses"]),
                               rtol=1e-5, atol=1e-6)
    for s, o in zip(stock["step_logs"], packed["step_logs"]):
        # not acc: at step 1 policy == reference, so every margin is 0 in the stock forward and rounding noise here
        for key in ("loss", "chosen_reward", "reject_reward", "loss_mean", "grad_norm"):
            torch.testing.assert_close(o[key], s[key], rtol=1e-4, atol=1e-6)
    for name, p in stock["params"].items():
        torch.testing.assert_close(packed["params"][name], p, rtol=1e-4, atol=1e-5,
                                   msg=lambda m, n=name: f"parameter {n} differs after packed training:\n{m}")
