"""Test and benchmark scaffolding, not shipped in the wheel: tiny, download-free assets. A byte-level BPE
tokenizer trained on the spot, a random Llama built from a config, and a synthetic preference set with a known
share of flipped labels. Tests and benchmarks import it as `tiny` (tests/ on sys.path).
"""

from __future__ import annotations

import json
import os
import random

WORDS = (
    "good great happy kind warm bright calm gentle lovely nice fine clear safe helpful honest polite "
    "bad awful sad cruel cold dark angry harsh rude ugly poor broken unsafe useless rude mean "
    "the a an is was are be to of and in on for with it this that you i we they cat dog sun rain day night"
).split()
POSITIVE = set(WORDS[:16])
TOPICS = ["cat", "dog", "sun", "rain", "day", "night"]
NEGATIVE = set(WORDS[16:32])

# The generation prompt must be a prefix of the rendered conversation: OpenRLHF slices responses off with
# apply_chat_template(prompt + response)[len(prompt):].
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def corpus(n: int = 400, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))) for _ in range(n)]


def build_tokenizer(path: str, vocab_size: int = 320):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<pad>", "<s>", "</s>", "<|user|>", "<|assistant|>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(path)
    return fast


def tiny_llama(vocab_size: int = 128, hidden: int = 32, layers: int = 2, seed: int = 0, pad_token_id=None,
               max_position_embeddings: int = 256, **config):
    """An in-memory random Llama in eval mode (hidden 32, 2 layers: tens of thousands of parameters)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=max_position_embeddings, pad_token_id=pad_token_id, **config)
    return LlamaForCausalLM(cfg).eval()


def build_tiny_llama(path: str, hidden: int = 64, layers: int = 2, seed: int = 0, tokenizer=None,
                     pretrain_steps: int = 0):
    """A LlamaConfig model (about 120k parameters with the default tokenizer), saved with its tokenizer.

    pretrain_steps > 0 first trains it briefly as a language model on prompt/response texts shaped like
    `preference_pairs`, so that its samples are words ending in EOS rather than random byte fragments.
    """
    tokenizer = tokenizer or build_tokenizer(path)
    model = tiny_llama(len(tokenizer), hidden, layers, seed, pad_token_id=tokenizer.pad_token_id,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       tie_word_embeddings=False)
    if pretrain_steps:
        pretrain(model, tokenizer, pretrain_steps, seed)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def pretrain(model, tokenizer, steps: int, seed: int = 0, batch_size: int = 32, lr: float = 3e-3) -> float:
    """Causal-LM training on prompt + response + EOS texts; returns the last loss."""
    import torch

    rng = random.Random(seed)
    texts = []
    for r in preference_pairs(512, seed=seed + 1):
        texts += [r["prompt"] + r["chosen"] + tokenizer.eos_token, r["prompt"] + r["rejected"] + tokenizer.eos_token]
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        batch = tokenizer(rng.sample(texts, batch_size), return_tensors="pt", padding=True,
                          add_special_tokens=False)
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        loss = model(**batch, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return float(loss.detach())


def sentiment(text: str) -> int:
    """Toy gold reward: positive minus negative words."""
    ws = text.split()
    return sum(w in POSITIVE for w in ws) - sum(w in NEGATIVE for w in ws)


def preference_pairs(n: int = 64, flip_share: float = 0.0, seed: int = 0) -> list[dict]:
    """Pairs whose chosen response is the more positive one; `flipped` marks the pairs whose labels were swapped."""
    rng = random.Random(seed)
    pos, neg = sorted(POSITIVE), sorted(NEGATIVE)
    rows = []
    for i in range(n):
        prompt = f"tell me about {rng.choice(['the', 'a', 'this', 'that'])} {rng.choice(TOPICS)} :"
        good = " ".join(rng.choice(pos) for _ in range(rng.randint(2, 5)))
        bad = " ".join(rng.choice(neg) for _ in range(rng.randint(2, 5)))
        flipped = rng.random() < flip_share
        chosen, rejected = (bad, good) if flipped else (good, bad)
        rows.append({"id": f"p{i}", "prompt": prompt, "chosen": " " + chosen, "rejected": " " + rejected,
                     "flipped": flipped})
    return rows


def write_jsonl(path: str, rows) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return path
