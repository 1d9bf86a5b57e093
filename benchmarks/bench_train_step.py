"""Training-step time: stock OpenRLHF `DPOTrainer` (reference forward every step) vs `SeraDPOTrainer` with cached
reference log-probs, the cost of scoring the whole pair set vs one training epoch on it, and fp32 vs bf16 steps
of `SeraDPOTrainer` with their achieved FLOP/s against a matmul peak measured here.

Both trainers run their real `fit()` loops in this one process on the same data, with a minimal single-process
strategy (plain torch AdamW, no DeepSpeed engine, so DeepSpeed's own overheads do not blur the comparison).
Runs alternate (stock, cached, stock, cached, ...) and the median per-step time of each is reported, so both
sides see the same machine load.

    python benchmarks/bench_train_step.py                       # tiny Llama built on the spot
    python benchmarks/bench_train_step.py --model .cache/sera/models/SmolLM2-135M-Instruct --pairs 16
    python benchmarks/bench_train_step.py --threads 2 --json out.json --profile   # + torch.profiler, bf16 step

Targets (issue: reference cache): (a) stock / cached step time >= 1.25x; (c) scoring / epoch <= 0.40x.

Precision (issue: CPU speed): the cached trainer runs in fp32 and in bf16, alternating with the runs above.
bf16 is what `--ds.param_dtype bf16` gives: the model loaded in bf16 by `Actor`, the reference log-probs scored by
a bf16 reference (the cache key includes the dtype), and fp32 master weights for AdamW, as DeepSpeed's bf16
optimizer keeps them (fp32 grads copied from the bf16 ones, the step in fp32, the bf16 weights copied back).
Achieved FLOP/s = 6 * parameters * processed tokens (padded, chosen + rejected) per step; the peak is the best of
a square matmul and a model-shaped linear, measured here on the same threads per dtype, alternating. The JSON
(`--json PATH`) holds bf16_over_fp32 (step speed), matmul_bf16_over_fp32, bf16_share_of_peak, the fp32 figures,
the per-step losses of both and their relative difference. `--profile` prints torch.profiler's top ops of one
bf16 step (and one fp32 step) and the time in casts, the master-weight copies, the optimizer and attention.
"""

from __future__ import annotations

import argparse
import json
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

    def __init__(self, args, masters=None):
        self.args = args
        self.masters = masters  # [(bf16 param, fp32 master)] for the bf16 runs, as DeepSpeed's bf16 optimizer
        self.losses = []
        self.on_step = None  # called after each optimizer step (the profiler's step)

    def is_rank_0(self):
        return True

    def print(self, *a):
        pass

    def backward(self, loss, model, optimizer):
        self.losses.append(float(loss.detach()))
        loss.backward()

    def optimizer_step(self, optimizer, model, scheduler):
        from torch.profiler import record_function

        if self.masters:
            with record_function("bench::grads_to_fp32_masters"):
                for p16, p32 in self.masters:
                    p32.grad = None if p16.grad is None else p16.grad.float()
                    p16.grad = None
        with record_function("bench::optimizer_step"):
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if self.masters:
            with record_function("bench::masters_to_bf16"):
                with torch.no_grad():
                    for p16, p32 in self.masters:
                        p16.copy_(p32)
        scheduler.step()
        if self.on_step is not None:
            self.on_step()

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


def batch_tokens(batches) -> int:
    """Tokens the policy processes per epoch: chosen and rejected, padded to the longer of the two (as
    DPOTrainer.concatenated_inputs pads them)."""
    return sum(2 * b[0].shape[0] * max(b[0].shape[-1], b[2].shape[-1]) for b in batches)


def peak_gflops(dtype: str, hidden: int, inter: int, tokens: int, budget: float) -> float:
    """Best of a square matmul (sera_openrlhf.precision's probe) and a [tokens, hidden] x [hidden, inter] linear,
    in `dtype` on the current threads."""
    import torch.nn.functional as F

    from sera_openrlhf.precision import matmul_gflops

    square = matmul_gflops((dtype,), n=1024, budget_s=budget / 2)[dtype]
    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    x, w = torch.randn(tokens, hidden).to(dt), torch.randn(inter, hidden).to(dt)
    best, start = float("inf"), time.perf_counter()
    while True:
        t = time.perf_counter()
        F.linear(x, w)
        best = min(best, time.perf_counter() - t)
        if time.perf_counter() - start + best > budget / 2:
            break
    return max(square, 2 * tokens * hidden * inter / best / 1e9)


def profile_step(label, make_trainer, rows=15):
    """torch.profiler over the second optimizer step (the first warms up); prints the top ops by self CPU time and a
    breakdown."""
    from torch.profiler import ProfilerActivity, profile, schedule

    trainer, n = make_trainer(2)
    with profile(activities=[ProfilerActivity.CPU], schedule=schedule(wait=0, warmup=1, active=1)) as prof:
        trainer.strategy.on_step = prof.step
        trainer.fit(trainer.args, 0, n)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    print(f"\n--- torch.profiler, one {label} step: top {rows} ops by self CPU time (total {total / 1e6:.2f} s)")
    print(events.table(sort_by="self_cpu_time_total", row_limit=rows))

    def share(pred):
        return sum(e.self_cpu_time_total for e in events if pred(e.key)) / max(total, 1)

    groups = {
        "matmul (mm/addmm/bmm/linear)": lambda k: k in ("aten::mm", "aten::addmm", "aten::bmm", "aten::linear",
                                                          "aten::matmul", "aten::_mkldnn_linear"),
        "casts/copies (to/_to_copy/copy_)": lambda k: k in ("aten::to", "aten::_to_copy", "aten::copy_"),
        "attention (sdpa)": lambda k: "scaled_dot_product" in k or "flash_attention" in k,
        "log-softmax/logsumexp (vocab)": lambda k: "softmax" in k or "logsumexp" in k,
    }
    breakdown = {name: round(share(pred), 3) for name, pred in groups.items()}
    for name in ("bench::optimizer_step", "bench::grads_to_fp32_masters", "bench::masters_to_bf16"):
        hit = [e for e in events if e.key == name]
        if hit:
            breakdown[name + " (incl. children)"] = round(hit[0].cpu_time_total / max(total, 1), 3)
    for name, value in breakdown.items():
        print(f"    {name:48s} {value * 100:5.1f} % of self CPU time")
    top = [{"op": e.key, "self_cpu_s": round(e.self_cpu_time_total / 1e6, 3), "calls": e.count}
           for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:rows]]
    return {"total_self_cpu_s": round(total / 1e6, 3), "breakdown": breakdown, "top_ops": top}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="HF checkpoint dir (default: a tiny Llama built here)")
    p.add_argument("--pairs", type=int, default=32)
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument("--max-len", type=int, default=192)
    p.add_argument("--repeats", type=int, default=3, help="runs of each trainer, alternating")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--lr", type=float, default=5e-6, help="AdamW learning rate (the demo's)")
    p.add_argument("--no-stock", action="store_true", help="skip the stock DPOTrainer runs (precision only)")
    p.add_argument("--no-bf16", action="store_true", help="skip the bf16 runs (reference cache only)")
    p.add_argument("--peak-budget", type=float, default=2.0, help="seconds per dtype per round of the peak probe")
    p.add_argument("--profile", action="store_true", help="torch.profiler over one bf16 and one fp32 step")
    p.add_argument("--json", default=None, help="write the figures to this JSON file")
    a = p.parse_args()
    torch.set_num_threads(a.threads)

    from sera_openrlhf.openrlhf_adapter import compat

    compat.apply()
    from openrlhf.models import Actor
    from openrlhf.trainer.dpo_trainer import DPOTrainer
    from transformers import AutoConfig, AutoTokenizer

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

    def actor(dtype="fp32"):
        m = Actor(model_dir, attn_implementation="sdpa", param_dtype="bf16")  # what --ds.param_dtype bf16 loads
        if dtype == "fp32":
            m.model.float()  # fp32 on CPU
        m.packing_samples = False
        return m

    # reference log-probs once per dtype (this is what the cache holds; its key includes the dtype); timed: (c)
    pairs = [dataset.pair_tokens(i) for i in range(len(dataset))]
    cached, score_times = {}, {}
    for dtype in ("fp32",) if a.no_bf16 else ("fp32", "bf16"):
        scorer = actor(dtype).eval()
        t0 = time.perf_counter()
        ref_c, ref_r = score_pairs(actor_logprob_fn(scorer), pairs, tokenizer.pad_token_id, show_progress=False)
        score_times[dtype] = time.perf_counter() - t0
        cached[dtype] = (ref_c.logp_sum, ref_r.logp_sum)
        if dtype == "fp32" and not a.no_stock:
            ref = scorer  # the stock trainer's per-step reference
        del scorer
    score_time = score_times["fp32"]

    def make_trainer(kind, dtype="fp32", limit=None):
        torch.manual_seed(0)
        policy = actor(dtype)
        masters = None
        if dtype == "bf16":  # fp32 master weights, as DeepSpeed's bf16 optimizer
            masters = [(q, q.detach().float().requires_grad_(True)) for q in policy.parameters() if q.requires_grad]
            opt = torch.optim.AdamW([m for _, m in masters], lr=a.lr)
        else:
            opt = torch.optim.AdamW(policy.parameters(), lr=a.lr)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        strategy = Strategy(args, masters)
        common = dict(model=policy, strategy=strategy, tokenizer=tokenizer, optim=opt,
                      train_dataloader=None, eval_dataloader=None, scheduler=sched, beta=0.1, max_epochs=1)
        batches = list(loader())[:limit]
        if kind == "stock":
            # the stock trainer unpacks 5-tuples: drop our index column
            common["train_dataloader"] = Batches(d[:5] for d in batches)
            trainer = DPOTrainer(ref_model=ref, **common)
        else:
            common["train_dataloader"] = Batches(batches)
            ref_lp = cached[dtype]
            trainer = SeraDPOTrainer(daa_loss=build_loss("dpo", beta=0.1), train_dataset=dataset,
                                     ref_logps=lambda ds, idx: (ref_lp[0][idx], ref_lp[1][idx]), ref_model=None,
                                     **common)
        trainer.args = args
        return trainer, len(batches)

    losses = {}

    def run(kind, dtype="fp32"):
        trainer, n = make_trainer(kind, dtype)
        t0 = time.perf_counter()
        trainer.fit(args, 0, n)
        losses[(kind, dtype)] = trainer.strategy.losses
        return (time.perf_counter() - t0) / n

    params = sum(q.numel() for q in actor().parameters())
    tokens = batch_tokens(list(loader()))
    steps = len(list(loader()))
    cfg = AutoConfig.from_pretrained(model_dir)
    hidden, inter = cfg.hidden_size, getattr(cfg, "intermediate_size", 4 * cfg.hidden_size)
    dtypes = ["fp32"] if a.no_bf16 else ["fp32", "bf16"]
    peaks = {d: [] for d in dtypes}
    times = {("stock", "fp32"): [], ("cached", "fp32"): [], ("cached", "bf16"): []}
    for _ in range(a.repeats):
        if not a.no_stock:
            times[("stock", "fp32")].append(run("stock"))
        for d in dtypes:
            times[("cached", d)].append(run("cached", d))
        for d in dtypes:
            peaks[d].append(peak_gflops(d, hidden, inter, tokens // steps, a.peak_budget))
    name = "tiny Llama (built here)" if tiny else model_dir
    c = statistics.median(times[("cached", "fp32")])
    epoch = c * len(dataset) / a.micro_batch
    print(f"model: {name} ({params / 1e6:.2f} M params); {len(dataset)} pairs, micro batch {a.micro_batch}, "
          f"max_len {a.max_len}, {a.threads} thread(s), {a.repeats} alternating runs each")
    result = {"model": name, "params": params, "pairs": len(dataset), "micro_batch": a.micro_batch,
              "max_len": a.max_len, "threads": a.threads, "repeats": a.repeats, "steps_per_run": steps,
              "tokens_per_step": tokens / steps}
    if not a.no_stock:
        s = statistics.median(times[("stock", "fp32")])
        print(f"(a) step time  stock DPOTrainer (reference forward each step): {s * 1000:8.1f} ms")
        print(f"    step time  SeraDPOTrainer, cached reference log-probs:     {c * 1000:8.1f} ms")
        print(f"    speed-up stock/cached: {s / c:.2f}x   (target >= 1.25x)")
        print(f"(c) scoring the whole set (reference, no grad): {score_time:.2f} s; one cached training epoch: "
              f"{epoch:.2f} s; ratio {score_time / epoch:.2f}x   (target <= 0.40x)")
        result.update(stock_step_s=s, cached_over_stock=s / c, scoring_over_epoch=score_time / epoch)
    flops = 6 * params * tokens / steps  # per step, cached (no reference forward)
    print("precision (SeraDPOTrainer, cached reference; fp32 master weights for bf16):")
    for d in dtypes:
        t = statistics.median(times[("cached", d)])
        peak = max(peaks[d])
        achieved = flops / t / 1e9
        print(f"    {d}: step {t * 1000:8.1f} ms  {achieved:7.2f} GFLOP/s achieved, matmul peak {peak:7.2f} GFLOP/s, "
              f"{achieved / peak * 100:5.1f} % of peak; scoring the set {score_times[d]:.2f} s")
        result[f"{d}_step_s"] = t
        result[f"{d}_gflops"] = achieved
        result[f"matmul_{d}_gflops"] = peak
        result[f"{d}_share_of_peak"] = achieved / peak
        result[f"{d}_scoring_s"] = score_times[d]
        result[f"{d}_losses"] = losses[("cached", d)]
    if not a.no_bf16:
        result["bf16_over_fp32"] = result["fp32_step_s"] / result["bf16_step_s"]
        result["matmul_bf16_over_fp32"] = result["matmul_bf16_gflops"] / result["matmul_fp32_gflops"]
        result["scoring_bf16_over_fp32"] = score_times["fp32"] / score_times["bf16"]
        l32, l16 = losses[("cached", "fp32")], losses[("cached", "bf16")]
        rel = [abs(x - y) / abs(x) for x, y in zip(l32, l16) if x]
        mean32, mean16 = statistics.mean(l32), statistics.mean(l16)
        result["loss_mean_rel_diff"] = abs(mean16 - mean32) / abs(mean32)
        result["loss_max_step_rel_diff"] = max(rel) if rel else 0.0
        print(f"    bf16 / fp32 speed: step {result['bf16_over_fp32']:.2f}x, matmul {result['matmul_bf16_over_fp32']:.2f}x, "
              f"scoring {result['scoring_bf16_over_fp32']:.2f}x")
        print(f"    loss over {len(l32)} steps: mean fp32 {mean32:.4f} vs bf16 {mean16:.4f} "
              f"({result['loss_mean_rel_diff'] * 100:.2f} %), largest per-step difference "
              f"{result['loss_max_step_rel_diff'] * 100:.2f} %   (target within 2 %)")
    if a.profile:
        result["profile"] = {d: profile_step(d, lambda n, d=d: make_trainer("cached", d, n)) for d in dtypes[::-1]}
    if a.json:
        with open(a.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
