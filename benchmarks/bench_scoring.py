"""Benchmark the scoring engine (sera_openrlhf.scoring) against a plain per-micro-batch loop, and bf16 vs fp32.

Data: real HH-RLHF harmless-base pairs (sera_openrlhf/resources/hh_rlhf_harmless_base/pairs_chat.jsonl),
tokenised as training sees them (IndexedRewardDataset: the model's tokenizer and chat template), in dataset order.

plain loop  what OpenRLHF's DPOTrainer does for the reference: micro batches of `--micro-batch` pairs in dataset
            order, chosen + rejected right-padded to the batch's longest, one full forward (all positions,
            logits upcast to float32), log_softmax over the vocabulary, gather, masked sum over the response.
engine      `score_pairs(hf_logprob_fn(model), ...)`: shared prompts, packed rows, LM head on scored positions.

Runs alternate (plain, engine, plain, engine, ...) so both see the same machine load; the ratio reported is the
median of the per-round ratios. bf16: the engine on a bf16 copy of the model vs fp32, alternating, and the
Spearman correlation of the per-pair implicit-reward margin log pi(y_c|x) - log pi(y_r|x) (the DPO margin / beta
with the reference held fixed) between the two.

    python benchmarks/bench_scoring.py --threads 1 --json /tmp/bs_tiny.json                     # tiny Llama
    python benchmarks/bench_scoring.py --model .cache/sera/models/SmolLM2-135M-Instruct --threads 1 --json out.json
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

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))  # tiny

from sera_openrlhf.scoring import hf_logprob_fn, score_pairs  # noqa: E402


def load(spec: str):
    """(model dir, fp32 model in eval mode, tokenizer); 'tiny' builds a tiny Llama + tokenizer on the spot."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = spec
    if spec == "tiny":
        from tiny import build_tiny_llama

        path = tempfile.mkdtemp(prefix="bench_scoring_tiny_")
        build_tiny_llama(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return path, model, tok


def hh_pairs(tok, n: int, max_len: int):
    """(chosen_ids, rejected_ids, prompt_len) of the first n HH pairs, as training tokenises them."""
    from sera_openrlhf.openrlhf_adapter import compat

    compat.apply()
    from sera_openrlhf.assets import default_dataset_path
    from sera_openrlhf.fileio import read_jsonl
    from sera_openrlhf.openrlhf_adapter.dataset import IndexedRewardDataset

    args = SimpleNamespace(data=SimpleNamespace(apply_chat_template=True, tokenizer_chat_template=None))
    rows = read_jsonl(default_dataset_path(chat=True))[:n]
    ds = IndexedRewardDataset(rows, tok, max_len, args)
    return [ds.pair_tokens(i) for i in range(len(ds))]


@torch.no_grad()
def plain_loop(model, pairs, pad: int, micro_batch: int) -> torch.Tensor:
    """float64[N, 2] (chosen, rejected) summed response log-probs, DPOTrainer-style micro batches."""
    out = []
    for b0 in range(0, len(pairs), micro_batch):
        mb = pairs[b0 : b0 + micro_batch]
        seqs = [c for c, _, _ in mb] + [r for _, r, _ in mb]
        plens = [p for _, _, p in mb] * 2
        L = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), L), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for k, s in enumerate(seqs):
            ids[k, : len(s)], mask[k, : len(s)] = s, 1
        pos = mask.cumsum(-1) - 1
        pos.masked_fill_(mask == 0, 1)
        logits = model(ids, attention_mask=mask, position_ids=pos, use_cache=False).logits.float()
        logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        loss_mask = mask.bool()
        for k, p in enumerate(plens):
            loss_mask[k, :p] = False
        sums = (logp * loss_mask[:, 1:]).sum(-1).double()
        n = len(mb)
        out.append(torch.stack([sums[:n], sums[n:]], -1))
    return torch.cat(out)


def engine(model, pairs, pad: int, kw) -> torch.Tensor:
    c, r = score_pairs(hf_logprob_fn(model), pairs, pad, show_progress=False, **kw)
    return torch.stack([c.logp_sum, r.logp_sum], -1)


def timed(f):
    t = time.perf_counter()
    out = f()
    return time.perf_counter() - t, out


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra = a.argsort().argsort().double()
    rb = b.argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def cpu_flags() -> list:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next(line for line in f if line.startswith("flags")).split()
        return sorted(x for x in flags if x.startswith(("amx", "avx512_bf16", "avx512f")))
    except (OSError, StopIteration):
        return []


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny", help="'tiny' (built here) or an HF checkpoint directory")
    ap.add_argument("--pairs", type=int, default=32)
    ap.add_argument("--max-len", type=int, default=512, help="RewardDataset max_length (tiny: at most 256)")
    ap.add_argument("--micro-batch", type=int, default=2, help="pairs per plain-loop micro batch")
    ap.add_argument("--max-tokens", type=int, default=8192, help="engine max_tokens_per_batch")
    ap.add_argument("--max-batch", type=int, default=64, help="engine max_batch_size")
    ap.add_argument("--repeats", type=int, default=3, help="alternating rounds; medians are reported")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--no-bf16", action="store_true", help="skip the bf16 vs fp32 comparison")
    ap.add_argument("--json", help="write the results here")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)

    path, model, tok = load(a.model)
    max_len = min(a.max_len, 256) if a.model == "tiny" else a.max_len
    pairs = hh_pairs(tok, a.pairs, max_len)
    pad = tok.pad_token_id
    kw = dict(max_tokens_per_batch=a.max_tokens, max_batch_size=a.max_batch)
    ntok = sum(len(c) + len(r) for c, r, _ in pairs)
    ptok = sum(2 * p for _, _, p in pairs)
    print(f"model {path}; {len(pairs)} HH pairs, {ntok} tokens ({ptok / ntok:.0%} prompt); threads {a.threads}; "
          f"torch {torch.__version__}; cpu flags {cpu_flags()}")

    engine(model, pairs[:2], pad, kw)  # warm-up (and the engine's one-time self-check)
    plain_loop(model, pairs[:2], pad, a.micro_batch)
    t_plain, t_eng, ratios = [], [], []
    for _ in range(a.repeats):
        tp, ref = timed(lambda: plain_loop(model, pairs, pad, a.micro_batch))
        te, got = timed(lambda: engine(model, pairs, pad, kw))
        t_plain.append(tp)
        t_eng.append(te)
        ratios.append(tp / te)
    err = float((got - ref).abs().max())
    rel = float(((got - ref).abs() / ref.abs().clamp(min=1)).max())
    res = dict(model=path, pairs=len(pairs), tokens=ntok, prompt_share=ptok / ntok, threads=a.threads,
               micro_batch=a.micro_batch, max_tokens_per_batch=a.max_tokens, repeats=a.repeats,
               plain_loop_s=statistics.median(t_plain), engine_s=statistics.median(t_eng),
               engine_over_plain_loop=statistics.median(ratios), engine_over_plain_loop_rounds=ratios,
               max_abs_diff=err, max_rel_diff=rel, cpu_flags=cpu_flags())
    print(f"plain loop {res['plain_loop_s']:.2f} s ({2 * len(pairs) / res['plain_loop_s']:.1f} seq/s)   engine "
          f"{res['engine_s']:.2f} s ({2 * len(pairs) / res['engine_s']:.1f} seq/s)   engine/plain speed-up "
          f"{res['engine_over_plain_loop']:.2f}x (rounds {', '.join(f'{r:.2f}' for r in ratios)})   "
          f"max |diff| {err:.1e} (relative {rel:.1e})")

    if not a.no_bf16:
        m16 = type(model).from_pretrained(path, dtype=torch.bfloat16).eval()
        engine(m16, pairs[:2], pad, kw)
        t32, t16, r16 = [], [], []
        for _ in range(a.repeats):
            ta, s32 = timed(lambda: engine(model, pairs, pad, kw))
            tb, s16 = timed(lambda: engine(m16, pairs, pad, kw))
            t32.append(ta)
            t16.append(tb)
            r16.append(ta / tb)
        rho = spearman(s16[:, 0] - s16[:, 1], s32[:, 0] - s32[:, 1])
        rho_seq = spearman(s16.flatten(), s32.flatten())
        res.update(engine_fp32_s=statistics.median(t32), engine_bf16_s=statistics.median(t16),
                   bf16_over_fp32=statistics.median(r16), bf16_over_fp32_rounds=r16, irm_spearman_bf16_fp32=rho,
                   logp_spearman_bf16_fp32=rho_seq,
                   bf16_max_abs_diff=float((s16 - s32).abs().max()))
        print(f"engine fp32 {res['engine_fp32_s']:.2f} s   bf16 {res['engine_bf16_s']:.2f} s   bf16 speed-up "
              f"{res['bf16_over_fp32']:.2f}x   per-pair IRM Spearman bf16 vs fp32 {rho:.4f} (target >= 0.99); "
              f"per-sequence log-prob Spearman {rho_seq:.4f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=2)
        print("wrote", a.json)


if __name__ == "__main__":
    main()
