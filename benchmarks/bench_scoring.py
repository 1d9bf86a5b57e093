"""Benchmark the batched scoring engine (sera_openrlhf.scoring).

(b) throughput: engine (bucketed, packed batches) vs a naive per-pair loop (one forward per pair, chosen and
    rejected right-padded together, as DPOTrainer.concatenated_forward at micro batch 1) and a per-sequence loop.
(d) peak memory: engine scoring vs policy-only inference (a plain forward returning logits) on the same batches.
    CPU: peak-RSS (VmHWM) growth during the run (peak mark reset first via /proc/self/clear_refs), each in a
    fresh subprocess (tracemalloc does not see torch tensors); CUDA: torch.cuda.max_memory_allocated growth.

    python benchmarks/bench_scoring.py                      # tiny random Llama (fp32)
    python benchmarks/bench_scoring.py --model PATH         # + a real HF checkpoint, e.g. SmolLM2-135M
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))  # tiny

from sera_openrlhf.scoring import (  # noqa: E402
    SequenceItem,
    _position_ids,
    hf_logprob_fn,
    plan_batches,
    score_pairs,
    score_sequences,
)


def load_model(spec: str, device: str):
    if spec == "tiny":
        from tiny import tiny_llama

        model = tiny_llama(128, max_position_embeddings=512)
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(spec, dtype=torch.float32)
    return model.to(device).eval()


def make_pairs(n: int, vocab: int, seq_len: int, seed: int = 0):
    """n pairs, shared prompt of ~seq_len/4 tokens, each sequence ~seq_len (+-25 %) tokens in all."""
    g = torch.Generator().manual_seed(seed)
    pairs = []
    for _ in range(n):
        p = int(torch.randint(seq_len // 5, seq_len // 3, (1,), generator=g))
        lo, hi = int(seq_len * 0.75) - p, int(seq_len * 1.25) - p
        prompt = torch.randint(1, vocab, (p,), generator=g)
        c = torch.cat([prompt, torch.randint(1, vocab, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g)])
        r = torch.cat([prompt, torch.randint(1, vocab, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g)])
        pairs.append((c, r, p))
    return pairs


def naive_per_pair(fn, pairs, pad):
    out = []
    for c, r, p in pairs:
        ch, rj = score_sequences(fn, [SequenceItem(c, p), SequenceItem(r, p)], pad, max_tokens_per_batch=1 << 30,
                                 show_progress=False).logp_sum
        out.append((ch, rj))
    return out


def naive_per_sequence(model, pairs):
    with torch.no_grad():
        for c, r, p in pairs:
            for ids in (c, r):
                ids = ids.to(next(model.parameters()).device)
                logp = torch.log_softmax(model(ids[None]).logits[0, :-1].float(), -1)
                logp.gather(-1, ids[1:, None])[p - 1 :].sum()


def timed(f, device, repeats=3):
    best = float("inf")
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        f()
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return best


def throughput(args, spec):
    model = load_model(spec, args.device)
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    pairs = make_pairs(args.pairs, model.config.vocab_size, args.seq_len)
    fn = hf_logprob_fn(model)
    kw = dict(max_tokens_per_batch=args.max_tokens, max_batch_size=args.max_batch, show_progress=False)
    score_pairs(fn, pairs[:4], pad, **kw)  # warm-up
    t_engine = timed(lambda: score_pairs(fn, pairs, pad, **kw), args.device, args.repeats)
    t_pair = timed(lambda: naive_per_pair(fn, pairs, pad), args.device, args.repeats)
    t_seq = timed(lambda: naive_per_sequence(model, pairs), args.device, args.repeats)
    # sanity: same numbers
    ch, rj = score_pairs(fn, pairs, pad, **kw)
    ref = torch.tensor(naive_per_pair(fn, pairs, pad), dtype=torch.float64)
    err = max((ch.logp_sum - ref[:, 0]).abs().max().item(), (rj.logp_sum - ref[:, 1]).abs().max().item())
    return dict(t_engine=t_engine, t_pair=t_pair, t_seq=t_seq, max_abs_err=err)


def _peak_rss_kib() -> int:
    """This process's peak RSS in KiB: VmHWM from /proc (ru_maxrss would also count the parent's RSS at exec,
    which the kernel folds into it), else ru_maxrss."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _reset_peak_rss_kib() -> int:
    """Reset the peak-RSS mark to the current RSS (Linux: clear_refs 5), so the peak afterwards measures only
    what follows, not the import/model-load peak. Returns the baseline in KiB (the old peak where unsupported)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    return _peak_rss_kib()


def memory_worker(args, spec, mode):
    """Runs in a fresh process: peak memory growth of one scoring pass ('engine') or plain forwards ('policy')."""
    model = load_model(spec, args.device)
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    pairs = make_pairs(args.pairs, model.config.vocab_size, args.seq_len)
    items = [SequenceItem(c, p) for c, _, p in pairs] + [SequenceItem(r, p) for _, r, p in pairs]
    batches = plan_batches([len(it.input_ids) for it in items], args.max_tokens, args.max_batch, True)
    if args.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _reset_peak_rss_kib()
    if mode == "engine":
        score_sequences(hf_logprob_fn(model), items, pad, max_tokens_per_batch=args.max_tokens,
                        max_batch_size=args.max_batch, show_progress=False)
    else:  # the same batches, forward only, logits discarded
        with torch.no_grad():
            for b in batches:
                L = max(len(items[i].input_ids) for i in b)
                ids = torch.full((len(b), L), pad, dtype=torch.long)
                mask = torch.zeros_like(ids)
                for row, i in enumerate(b):
                    n = len(items[i].input_ids)
                    ids[row, :n], mask[row, :n] = items[i].input_ids, 1
                ids, mask = ids.to(args.device), mask.to(args.device)
                model(ids, attention_mask=mask, position_ids=_position_ids(mask), use_cache=False).logits
    if args.device == "cuda":
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        peak = (_peak_rss_kib() - base) / 1024
    print(json.dumps({"peak_growth_mib": peak}))


def memory(args, spec, mode):
    cmd = [sys.executable, os.path.abspath(__file__), "--_mem-worker", mode, "--_spec", spec]
    for k in ("pairs", "seq_len", "max_tokens", "max_batch", "device", "threads"):
        cmd += [f"--{k.replace('_', '-')}", str(getattr(args, k))]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_growth_mib"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="HF checkpoint directory to benchmark besides the tiny model")
    ap.add_argument("--pairs", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--max-tokens", type=int, default=4096, help="max_tokens_per_batch")
    ap.add_argument("--max-batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs; the best is reported")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--_mem-worker", dest="mem_worker", help=argparse.SUPPRESS)
    ap.add_argument("--_spec", dest="spec", help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.mem_worker:
        return memory_worker(args, args.spec, args.mem_worker)

    specs = ["tiny"] + ([args.model] if args.model else [])
    print(f"device={args.device} threads={args.threads} pairs={args.pairs} seq_len~{args.seq_len} "
          f"max_tokens_per_batch={args.max_tokens} max_batch_size={args.max_batch} torch={torch.__version__}")
    print("\n(b) throughput: sequences/s (2 per pair), best of", args.repeats)
    print(f"{'model':<28}{'per-seq loop':>14}{'per-pair loop':>15}{'engine':>10}{'vs pair':>9}{'vs seq':>8}"
          f"{'max|diff|':>11}")
    for spec in specs:
        r = throughput(args, spec)
        n = 2 * args.pairs
        print(f"{os.path.basename(spec.rstrip('/')):<28}{n / r['t_seq']:>14.1f}{n / r['t_pair']:>15.1f}"
              f"{n / r['t_engine']:>10.1f}{r['t_pair'] / r['t_engine']:>8.1f}x{r['t_seq'] / r['t_engine']:>7.1f}x"
              f"{r['max_abs_err']:>11.1e}")
    unit = "CUDA max_memory_allocated" if args.device == "cuda" else "peak RSS, VmHWM"
    print(f"\n(d) peak memory growth during one pass, MiB ({unit}, fresh process each)")
    print(f"{'model':<28}{'engine':>10}{'policy fwd':>12}{'ratio':>8}")
    for spec in specs:
        e, p = memory(args, spec, "engine"), memory(args, spec, "policy")
        ratio = f"{e / p:.2f}" if p > 0.05 else "n/a"
        print(f"{os.path.basename(spec.rstrip('/')):<28}{e:>10.1f}{p:>12.1f}{ratio:>8}")


if __name__ == "__main__":
    main()
