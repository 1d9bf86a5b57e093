"""Sampling throughput: batched `HFGenerator` vs per-prompt generation, side by side in one run.

The per-prompt baseline is the obvious loop: one `model.generate(prompt, num_return_sequences=S)` call per
prompt. Both sample with the same settings (temperature 1, no top-k, same max_new_tokens); the report gives
samples/s, generated tokens/s and the batched/per-prompt ratio.

    python benchmarks/bench_generation.py                       # tiny random Llama (built here, no download)
    python benchmarks/bench_generation.py --model .cache/sera/models/SmolLM2-135M-Instruct --prompts 8

tokens/s counts response tokens up to EOS on both sides. Batched generation runs until the longest sequence of
its batch stops, so with a real model (early EOS) it also computes wasted post-EOS steps; samples/s is the
number that matters for bootstrapping.
"""

from __future__ import annotations

import argparse
import os
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="HF checkpoint directory (e.g. SmolLM2-135M); default: a tiny random Llama")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=64, help="sequences per generate call (batched side)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    if args.model:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(args.model)
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
        name = os.path.basename(os.path.normpath(args.model))
    else:
        model, tok = tiny_model_and_tokenizer()
        name = "tiny-llama (2 layers, hidden 32, vocab 300)"
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    prompts = make_prompts(args.prompts, tok)
    cfg = GenerationConfig(num_samples=args.samples, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)

    # Warm-up both paths (first calls pay for lazy initialisation).
    warm = GenerationConfig(num_samples=2, max_new_tokens=2, batch_size=4)
    per_prompt(model, tok, prompts[:2], warm)
    batched(model, tok, prompts[:2], warm)

    t_loop, (n_loop, tok_loop) = timed(per_prompt, model, tok, prompts, cfg)
    t_batch, (n_batch, tok_batch) = timed(batched, model, tok, prompts, cfg)
    print(f"model: {name} on {device}, {torch.get_num_threads()} thread(s)")
    print(f"workload: {args.prompts} prompts x {args.samples} samples, max_new_tokens {args.max_new_tokens}, "
          f"batch_size {args.batch_size}")
    print(f"per-prompt loop : {n_loop / t_loop:8.1f} samples/s  {tok_loop / t_loop:9.1f} tokens/s  ({t_loop:.2f} s)")
    print(f"batched HFGen   : {n_batch / t_batch:8.1f} samples/s  {tok_batch / t_batch:9.1f} tokens/s  "
          f"({t_batch:.2f} s)")
    print(f"speed-up (samples/s): {t_loop / t_batch * n_batch / n_loop:.1f}x")


if __name__ == "__main__":
    main()
