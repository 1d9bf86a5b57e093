"""End to end, cache build included: stock OpenRLHF `DPOTrainer` (reference forward every step) vs `SeraDPOTrainer`
with the reference log-prob cache, over 1 and 3 epochs.

stock   load the reference and the policy, `DPOTrainer.fit` for E epochs.
cached  load the reference, fingerprint it, build the cache (`ReferenceCache.ensure` with `actor_logprob_fn`, i.e.
        the scoring engine, written to disk, as `CachedReference` does in training), free the reference, load the
        policy, `SeraDPOTrainer.fit` for E epochs reading the cached log-probs.

Each side runs its real `fit()` for 3 epochs in this process (the minimal single-process strategy of
bench_train_step.py: plain torch AdamW, no DeepSpeed engine); the 1-epoch figure is the same run's time up to the
start of epoch 2 (everything a 1-epoch run does: loads, cache build, one epoch). Runs alternate (stock, cached,
stock, cached, ...) so both see the same machine load; ratios are medians of the per-round ratios.

    python benchmarks/bench_refcache.py --threads 1 --json /tmp/brc_tiny.json                     # tiny Llama
    python benchmarks/bench_refcache.py --model .cache/sera/models/SmolLM2-135M-Instruct --pairs 8 --repeats 1 \\
        --threads 1 --json /tmp/brc_smol.json

Target (issue 20): cached >= 1.25x stock end to end over 3 epochs.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from types import SimpleNamespace

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))  # tiny


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
    """Pre-collated batches, iterated like a DataLoader; records when each epoch starts iterating."""

    sampler = None

    def __init__(self, items):
        super().__init__(items)
        self.epoch_starts = []

    def __iter__(self):
        self.epoch_starts.append(time.perf_counter())
        return super().__iter__()


def make_args(max_len, micro_batch, chat):
    ns = SimpleNamespace
    return ns(
        model=ns(label_smoothing=0.0, ipo_enable=False, aux_loss_coef=0.0, nll_loss_coef=0.0, beta=0.1),
        ds=ns(packing_samples=False),
        logger=ns(wandb=ns(key=None), tensorboard_dir=None, logging_steps=1),
        eval=ns(steps=-1), ckpt=ns(save_steps=-1, path="", max_num=1, max_mem=1),
        train=ns(batch_size=micro_batch),
        data=ns(prompt_key="prompt", chosen_key="chosen", rejected_key="rejected", apply_chat_template=chat,
                tokenizer_chat_template=None, max_len=max_len),
    )


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="HF checkpoint dir (default: a tiny Llama built here)")
    p.add_argument("--pairs", type=int, default=32)
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument("--max-len", type=int, default=512)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--repeats", type=int, default=2, help="rounds of (stock, cached)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--max-tokens", type=int, default=8192, help="scoring max_tokens_per_batch (--sera default)")
    p.add_argument("--json", help="write the results here")
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
    from sera_openrlhf.refcache import ReferenceCache
    from sera_openrlhf.scoring import actor_logprob_fn, model_fingerprint

    tiny = a.model is None
    model_dir = a.model or tempfile.mkdtemp(prefix="bench_refcache_tiny_")
    if tiny:
        from tiny import build_tiny_llama, preference_pairs

        build_tiny_llama(model_dir)
        rows = [{k: r[k] for k in ("id", "prompt", "chosen", "rejected")} for r in preference_pairs(a.pairs)]
    else:
        from sera_openrlhf.assets import default_dataset_path
        from sera_openrlhf.fileio import read_jsonl

        rows = read_jsonl(default_dataset_path(chat=True))[: a.pairs]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    args = make_args(a.max_len, a.micro_batch, chat=not tiny)
    dataset = IndexedRewardDataset(rows, tokenizer, a.max_len, args)
    collated = list(torch.utils.data.DataLoader(dataset, batch_size=a.micro_batch, shuffle=False,
                                                collate_fn=dataset.collate_fn))
    steps = len(collated)

    def actor():
        m = Actor(model_dir, attn_implementation="sdpa", param_dtype="bf16")
        m.model.float()  # fp32 on CPU
        m.packing_samples = False
        return m

    def common(policy, loader):
        opt = torch.optim.AdamW(policy.parameters(), lr=1e-6)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        return dict(model=policy, strategy=Strategy(args), tokenizer=tokenizer, optim=opt, train_dataloader=loader,
                    eval_dataloader=None, scheduler=sched, beta=0.1, max_epochs=a.epochs)

    def run(kind):
        gc.collect()
        t0 = time.perf_counter()
        build = 0.0
        if kind == "stock":
            ref = actor().eval()
            loader = Batches(d[:5] for d in collated)  # the stock trainer unpacks 5-tuples
            trainer = DPOTrainer(ref_model=ref, **common(actor(), loader))
        else:
            cache_dir = tempfile.mkdtemp(prefix="bench_refcache_")
            ref = actor().eval()
            fp = model_fingerprint(model_dir, extra={"dtype": "fp32", "attn": "sdpa"})
            cache = ReferenceCache(cache_dir, fp)
            pairs = [dataset.pair_tokens(i) for i in range(len(dataset))]
            chosen, rejected = cache.ensure(dataset.ids, pairs, actor_logprob_fn(ref), tokenizer.pad_token_id,
                                            max_tokens_per_batch=a.max_tokens, max_batch_size=64,
                                            show_progress=False)
            del ref
            gc.collect()
            build = time.perf_counter() - t0
            shutil.rmtree(cache_dir, ignore_errors=True)
            loader = Batches(collated)
            trainer = SeraDPOTrainer(daa_loss=build_loss("dpo", beta=0.1), train_dataset=dataset,
                                     ref_logps=lambda ds, idx: (chosen[idx], rejected[idx]), ref_model=None,
                                     **common(actor(), loader))
        trainer.fit(args, 0, steps)
        end = time.perf_counter()
        marks = loader.epoch_starts[1:] + [end]  # end of epoch e = start of epoch e+1
        return dict(total=end - t0, one_epoch=marks[0] - t0, build=build)

    rounds = []
    for _ in range(a.repeats):
        s = run("stock")
        c = run("cached")
        rounds.append((s, c))
        print(f"round: stock 1 ep {s['one_epoch']:.1f} s, {a.epochs} ep {s['total']:.1f} s | cached 1 ep "
              f"{c['one_epoch']:.1f} s, {a.epochs} ep {c['total']:.1f} s (cache build {c['build']:.1f} s)",
              flush=True)
    med = lambda xs: statistics.median(xs)  # noqa: E731
    res = dict(
        model=model_dir if not tiny else "tiny Llama (built here)", pairs=len(dataset), steps_per_epoch=steps,
        micro_batch=a.micro_batch, max_len=a.max_len, threads=a.threads, repeats=a.repeats, epochs=a.epochs,
        stock_1_epoch_s=med([s["one_epoch"] for s, _ in rounds]),
        cached_1_epoch_s=med([c["one_epoch"] for _, c in rounds]),
        stock_n_epochs_s=med([s["total"] for s, _ in rounds]),
        cached_n_epochs_s=med([c["total"] for _, c in rounds]),
        cache_build_s=med([c["build"] for _, c in rounds]),
        cached_over_stock_1_epoch=med([s["one_epoch"] / c["one_epoch"] for s, c in rounds]),
        cached_over_stock_n_epochs=med([s["total"] / c["total"] for s, c in rounds]),
    )
    res[f"cached_over_stock_{a.epochs}_epochs"] = res["cached_over_stock_n_epochs"]
    print(f"model {res['model']}; {len(dataset)} pairs, {steps} steps/epoch, micro batch {a.micro_batch}, fp32, "
          f"{a.threads} thread(s), {a.repeats} alternating round(s)")
    print(f"1 epoch:  stock {res['stock_1_epoch_s']:.1f} s  cached {res['cached_1_epoch_s']:.1f} s  "
          f"speed-up {res['cached_over_stock_1_epoch']:.2f}x")
    print(f"{a.epochs} epochs: stock {res['stock_n_epochs_s']:.1f} s  cached {res['cached_n_epochs_s']:.1f} s  "
          f"speed-up {res['cached_over_stock_n_epochs']:.2f}x   (target >= 1.25x over 3 epochs)")
    print(f"cache build (reference load + fingerprint + scoring + save): {res['cache_build_s']:.1f} s")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=2)
        print("wrote", a.json)


if __name__ == "__main__":
    main()
