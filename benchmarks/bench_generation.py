"""Sampling throughput: batched `HFGenerator` vs per-prompt generation, fp32 vs bf16, side by side in one run.

The per-prompt baseline is the obvious loop: one `model.generate(prompt, num_return_sequences=S)` call per
prompt. Both sample with the same settings (temperature 1, no top-k, same max_new_tokens); the report gives
samples/s, generated tokens/s and the batched/per-prompt ratio.

    python benchmarks/bench_generation.py                       # tiny random Llama (built here, no download)
    python benchmarks/bench_generation.py --model .cache/sera/models/SmolLM2-135M-Instruct --prompts 8

    python benchmarks/bench_generation.py --dtypes fp32,bf16 --static --compile --json out.json

Every (dtype, mode) runs `--repeats` times, alternating, and its median time counts. Modes: `per-prompt` (the loop
below), `batched` (`HFGenerator`, a DynamicCache), and on request `static` (the same with
`generation_config.cache_implementation = "static"`) and `compile` (static cache plus transformers' auto-compile
of the forward, which on CPU needs `compile_config._compile_all_devices`; its first call, compilation included,
is reported apart). The JSON (`--json PATH`) has per (dtype, mode) samples/s and tokens/s, bf16_over_fp32 (batched
samples/s), batched_over_per_prompt per dtype and, when run, static_over_batched / compile_over_batched.

tokens/s counts response tokens up to EOS on both sides. Batched generation runs until the longest sequence of
its batch stops, so with a real model (early EOS) it also computes wasted post-EOS steps; samples/s is the
number that matters for bootstrapping.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from sera_openrlhf.generation import GenerationConfig, HFGenerator, _cut_at_eos, _eos_ids  # noqa: E402

TEXT = (
    "The movie was wonderful and the actors were great. I did not like the ending, it felt rushed. "
    "What a lovely day for a walk in the park with friends. Tell me a story about a small robot. "
)


def tiny_model_and_tokenizer():
    """A 2-layer Llama (hidden 32) and a byte-level BPE tokenizer (vocab 300) trained on a few sentences."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<pad>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator([TEXT] * 20, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    config = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=len(tok), max_position_embeddings=512,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval(), tok


def make_prompts(n: int, tok) -> list[str]:
    words = TEXT.split()
    prompts = [" ".join(words[i % 7 : i % 7 + 4 + (i * 5) % 17]) for i in range(n)]  # 4–20 words, varied lengths
    if tok.chat_template:
        prompts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                           add_generation_prompt=True) for p in prompts]
    return prompts


def per_prompt(model, tok, prompts, cfg: GenerationConfig) -> tuple[int, int]:
    """The baseline loop; returns (samples, generated tokens up to and including EOS)."""
    eos = _eos_ids(model, tok)
    pad = tok.pad_token_id if tok.pad_token_id is not None else min(eos)
    samples = tokens = 0
    with torch.no_grad():
        for i, prompt in enumerate(prompts):
            ids = tok(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
            torch.manual_seed(cfg.seed + i)
            out = model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=cfg.temperature,
                top_p=cfg.top_p, top_k=0, max_new_tokens=cfg.max_new_tokens, num_return_sequences=cfg.num_samples,
                pad_token_id=pad, eos_token_id=sorted(eos),
            )
            samples += out.shape[0]
            tokens += sum(len(_cut_at_eos(row, eos)[0]) for row in out[:, ids.shape[1]:].tolist())
    return samples, tokens


def batched(model, tok, prompts, cfg: GenerationConfig) -> tuple[int, int]:
    out = HFGenerator(model, tok, cfg, progress=False).generate(prompts)
    return sum(len(row) for row in out), sum(len(s.token_ids) for row in out for s in row)


def timed(fn, *args):
    start = time.perf_counter()
    result = fn(*args)
    return time.perf_counter() - start, result


def set_mode(model, mode: str) -> None:
    """Cache and compile settings of `generate`, through the model's generation_config (HFGenerator as is)."""
    gc = model.generation_config
    gc.cache_implementation = "static" if mode in ("static", "compile") else None
    if mode == "compile":
        from transformers.generation.configuration_utils import CompileConfig

        gc.compile_config = CompileConfig(fullgraph=False, dynamic=False)
        gc.compile_config._compile_all_devices = True  # transformers auto-compiles on GPUs only otherwise
        gc.disable_compile = False
    else:
        gc.disable_compile = True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="HF checkpoint directory (e.g. SmolLM2-135M); default: a tiny random Llama")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=64, help="sequences per generate call (batched side)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--dtypes", default="fp32,bf16", help="comma-separated: fp32, bf16")
    parser.add_argument("--repeats", type=int, default=1, help="alternating runs of each (dtype, mode)")
    parser.add_argument("--no-per-prompt", action="store_true", help="skip the per-prompt loop")
    parser.add_argument("--static", action="store_true", help="also: batched with a static KV cache")
    parser.add_argument("--compile", action="store_true", help="also: static cache + torch.compile (auto-compile)")
    parser.add_argument("--json", default=None, help="write the figures to this JSON file")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    if args.model:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(args.model)
        base = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
        name = os.path.basename(os.path.normpath(args.model))
    else:
        base, tok = tiny_model_and_tokenizer()
        name = "tiny-llama (2 layers, hidden 32, vocab 300)"
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    models = {}
    for d in dtypes:
        models[d] = (base if d == "fp32" else copy.deepcopy(base)).to(
            device=device, dtype={"fp32": torch.float32, "bf16": torch.bfloat16}[d])
    prompts = make_prompts(args.prompts, tok)
    cfg = GenerationConfig(num_samples=args.samples, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    modes = ([] if args.no_per_prompt else ["per-prompt"]) + ["batched"] + (["static"] if args.static else []) \
        + (["compile"] if args.compile else [])

    # Warm-up every (dtype, mode) (first calls pay for lazy initialisation; compile pays for compilation).
    warm = GenerationConfig(num_samples=2, max_new_tokens=2, batch_size=4)
    first_call = {}
    for d, model in models.items():
        for mode in modes:
            set_mode(model, mode)
            fn = per_prompt if mode == "per-prompt" else batched
            first_call[f"{d}/{mode}"] = timed(fn, model, tok, prompts[:2], warm)[0]
            if mode == "compile":  # the real shapes compile too (static cache: one graph per batch shape)
                first_call[f"{d}/{mode}"] += timed(fn, model, tok, prompts, cfg)[0]

    times = {(d, m): [] for d in dtypes for m in modes}
    counts = {}
    for _ in range(args.repeats):
        for d, model in models.items():
            for mode in modes:
                set_mode(model, mode)
                fn = per_prompt if mode == "per-prompt" else batched
                t, counts[(d, mode)] = timed(fn, model, tok, prompts, cfg)
                times[(d, mode)].append(t)
    print(f"model: {name} on {device}, {torch.get_num_threads()} thread(s)")
    print(f"workload: {args.prompts} prompts x {args.samples} samples, max_new_tokens {args.max_new_tokens}, "
          f"batch_size {args.batch_size}; {args.repeats} alternating run(s) each, median")
    result = {"model": name, "device": device, "threads": torch.get_num_threads(), "prompts": args.prompts,
              "samples": args.samples, "max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size,
              "repeats": args.repeats, "runs": {}, "first_call_s": first_call}
    for (d, mode), ts in times.items():
        t = statistics.median(ts)
        n, toks = counts[(d, mode)]
        result["runs"][f"{d}/{mode}"] = {"s": t, "samples_per_s": n / t, "tokens_per_s": toks / t}
        print(f"{d} {mode:10s}: {n / t:8.2f} samples/s  {toks / t:9.1f} tokens/s  ({t:.2f} s; first call "
              f"{first_call[f'{d}/{mode}']:.2f} s)")
    runs = result["runs"]

    def ratio(a, b):
        return runs[a]["samples_per_s"] / runs[b]["samples_per_s"] if a in runs and b in runs else None

    for d in dtypes:
        result[f"batched_over_per_prompt_{d}"] = ratio(f"{d}/batched", f"{d}/per-prompt")
        result[f"static_over_batched_{d}"] = ratio(f"{d}/static", f"{d}/batched")
        result[f"compile_over_batched_{d}"] = ratio(f"{d}/compile", f"{d}/batched")
    result["bf16_over_fp32"] = ratio("bf16/batched", "fp32/batched")
    result["bf16_over_fp32_per_prompt"] = ratio("bf16/per-prompt", "fp32/per-prompt")
    for k, v in result.items():
        if ("_over_" in k) and v is not None:
            print(f"{k}: {v:.2f}x")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
