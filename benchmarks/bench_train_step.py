"""Training-step time: stock OpenRLHF `DPOTrainer` (reference forward every step) vs `SeraDPOTrainer` with cached
reference log-probs, and the cost of scoring the whole pair set vs one training epoch on it.

Both trainers run their real `fit()` loops in this one process on the same data, with a minimal single-process
strategy (plain torch AdamW, no DeepSpeed engine, so DeepSpeed's own overheads do not blur the comparison).
Runs alternate (stock, cached, stock, cached, ...) and the median per-step time of each is reported, so both
sides see the same machine load.

    python benchmarks/bench_train_step.py                       # tiny Llama built on the spot
    python benchmarks/bench_train_step.py --model .cache/sera/models/SmolLM2-135M-Instruct --pairs 16

Targets (issue: reference cache): (a) stock / cached step time >= 1.25x; (c) scoring / epoch <= 0.40x.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from types import SimpleNamespace

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))  # tiny


class Strategy:
    """What DPOTrainer.fit needs from a strategy, for one process without DeepSpeed."""

    accumulated_gradient = 1
    ring_attn_group = None
    world_size = 1

    def __init__(self, args):
        self.args = args

    def is_rank_0(self):
        return True

    def print(self, *a):
        pass

    def backward(self, loss, model, optimizer):
        loss.backward()

    def optimizer_step(self, optimizer, model, scheduler):
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()

    def get_grad_norm(self, model):
        return 0.0

    def all_reduce(self, data, op="mean"):
        return data

    def save_ckpt(self, *a, **k):
        pass


class Batches(list):
    """Pre-collated batches, iterated like a DataLoader (fit() checks `.sampler`)."""

    sampler = None


def make_args(max_len):
    ns = SimpleNamespace
    return ns(
        model=ns(label_smoothing=0.0, ipo_enable=False, aux_loss_coef=0.0, nll_loss_coef=0.0, beta=0.1),
        ds=ns(packing_samples=False),
        logger=ns(wandb=ns(key=None), tensorboard_dir=None, logging_steps=1),
        eval=ns(steps=-1), ckpt=ns(save_steps=-1, path="", max_num=1, max_mem=1),
        train=ns(batch_size=2),
        data=ns(prompt_key="prompt", chosen_key="chosen", rejected_key="rejected", apply_chat_template=False,
                tokenizer_chat_template=None, max_len=max_len),
    )


def load_rows(model_dir, n, tiny):
    if tiny:
        from tiny import preference_pairs

        return [{k: r[k] for k in ("id", "prompt", "chosen", "rejected")} for r in preference_pairs(n)]
    from sera_openrlhf.assets import default_dataset_path
    from sera_openrlhf.fileio import read_jsonl

    return read_jsonl(default_dataset_path())[:n]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="HF checkpoint dir (default: a tiny Llama built here)")
    p.add_argument("--pairs", type=int, default=32)
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument("--max-len", type=int, default=192)
    p.add_argument("--repeats", type=int, default=3, help="runs of each trainer, alternating")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)

    from sera_openrlhf.openrlhf_adapter import compat

    compat.apply()
    from openrlhf.models import Actor
    from openrlhf.trainer.dpo_trainer import DPOTrainer
    from transformers import AutoTokenizer

    from sera_openrlhf.losses import build_loss
    from sera_openrlhf.openrlhf_adapter.dataset import IndexedRewardDataset
    from sera_openrlhf.openrlhf_adapter.trainer import SeraDPOTrainer
    from sera_openrlhf.scoring import actor_logprob_fn, score_pairs

    tiny = a.model is None
    model_dir = a.model or tempfile.mkdtemp(prefix="bench_tiny_")
    if tiny:
        from tiny import build_tiny_llama

        build_tiny_llama(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    args = make_args(a.max_len)
    args.train.batch_size = a.micro_batch
    rows = load_rows(model_dir, a.pairs, tiny)
    dataset = IndexedRewardDataset(rows, tokenizer, a.max_len, args)
    loader = lambda: torch.utils.data.DataLoader(  # noqa: E731
        dataset, batch_size=a.micro_batch, shuffle=False, collate_fn=dataset.collate_fn)

    def actor():
        m = Actor(model_dir, attn_implementation="sdpa", param_dtype="bf16")
        m.model.float()  # fp32 on CPU
        m.packing_samples = False
        return m

    # reference log-probs once (this is what the cache holds); timed: it is part of (c)
    ref = actor().eval()
    pairs = [dataset.pair_tokens(i) for i in range(len(dataset))]
    t0 = time.perf_counter()
    ref_c, ref_r = score_pairs(actor_logprob_fn(ref), pairs, tokenizer.pad_token_id, show_progress=False)
    score_time = time.perf_counter() - t0
    cached = (ref_c.logp_sum, ref_r.logp_sum)

    def run(kind):
        policy = actor()
        opt = torch.optim.AdamW(policy.parameters(), lr=1e-6)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        common = dict(model=policy, strategy=Strategy(args), tokenizer=tokenizer, optim=opt,
                      train_dataloader=None, eval_dataloader=None, scheduler=sched, beta=0.1, max_epochs=1)
        if kind == "stock":
            base = loader()
            # the stock trainer unpacks 5-tuples: drop our index column
            common["train_dataloader"] = Batches(d[:5] for d in base)
            trainer = DPOTrainer(ref_model=ref, **common)
        else:
            common["train_dataloader"] = Batches(loader())
            trainer = SeraDPOTrainer(daa_loss=build_loss("dpo", beta=0.1), train_dataset=dataset,
                                     ref_logps=lambda ds, idx: (cached[0][idx], cached[1][idx]), ref_model=None,
                                     **common)
        n = len(common["train_dataloader"])
        t0 = time.perf_counter()
        trainer.fit(args, 0, n)
        return (time.perf_counter() - t0) / n

    stock, ours = [], []
    for _ in range(a.repeats):
        stock.append(run("stock"))
        ours.append(run("cached"))
    s, c = statistics.median(stock), statistics.median(ours)
    epoch = c * len(dataset) / a.micro_batch
    name = "tiny Llama (built here)" if tiny else model_dir
    print(f"model: {name}; {len(dataset)} pairs, micro batch {a.micro_batch}, max_len {a.max_len}, "
          f"fp32, {a.threads} thread(s), {a.repeats} alternating runs each")
    print(f"(a) step time  stock DPOTrainer (reference forward each step): {s * 1000:8.1f} ms")
    print(f"    step time  SeraDPOTrainer, cached reference log-probs:     {c * 1000:8.1f} ms")
    print(f"    speed-up stock/cached: {s / c:.2f}x   (target >= 1.25x)")
    print(f"(c) scoring the whole set (reference, no grad): {score_time:.2f} s; one cached training epoch: "
          f"{epoch:.2f} s; ratio {score_time / epoch:.2f}x   (target <= 0.40x)")


if __name__ == "__main__":
    main()
