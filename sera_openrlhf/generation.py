"""Sampling N responses per prompt for preference bootstrapping, behind one interface.

- `HFGenerator`: transformers `generate`, batched and left-padded; CPU or GPU (wherever the model lives).
- `VLLMGenerator`: vLLM's offline engine (GPU only). `vllm` is imported only when this backend builds its
  engine, so importing this module never pulls in vllm or ray.

Both return `generate(prompts)[p][s]` = `Sample` for prompt p, sample s. Prompts are fully formatted strings
(chat template applied upstream) and are tokenised with add_special_tokens=False by both backends, so the
same prompt gives the same token ids whichever backend runs. Both use plain temperature / top-p sampling
(no top-k), temperature 0 meaning greedy.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from .config import BootstrapConfig, check_group_value
from .errors import ConfigError

BACKENDS = ("hf", "vllm")


# GenerationConfig field -> its flag in config.BootstrapConfig (defaults, help and checks live there)
_FLAGS = {"num_samples": "num_samples", "temperature": "temperature", "top_p": "top_p",
          "max_new_tokens": "max_new_tokens", "batch_size": "generation_batch_size"}


@dataclass
class GenerationConfig:
    """Sampling settings shared by the backends: the `--sera.*` generation flags (defaults and valid values from
    `sera_openrlhf.config.BootstrapConfig`) plus the phase's sampling seed (each request's seed derives from it
    and the prompt's key: same seed, same samples)."""

    num_samples: int = BootstrapConfig.num_samples
    temperature: float = BootstrapConfig.temperature
    top_p: float = BootstrapConfig.top_p
    max_new_tokens: int = BootstrapConfig.max_new_tokens
    seed: int = 42
    batch_size: int = BootstrapConfig.generation_batch_size

    def validate(self) -> None:
        for name, flag in _FLAGS.items():
            check_group_value(BootstrapConfig, flag, getattr(self, name))

    @classmethod
    def from_bootstrap(cls, cfg: BootstrapConfig, seed: int) -> "GenerationConfig":
        return cls(**{name: getattr(cfg, flag) for name, flag in _FLAGS.items()}, seed=seed)


@dataclass
class Sample:
    """One sampled response."""

    prompt_index: int
    sample_index: int
    text: str  # decoded response, special tokens skipped
    token_ids: list[int]  # response tokens without padding, including the EOS if one was produced
    truncated: bool  # no EOS within max_new_tokens
    prompt_ids: list[int] = field(default_factory=list)  # the prompt as the model saw it (no padding)


def _eos_ids(model: Any, tokenizer: Any) -> set[int]:
    """Ids that end a response: the model's generation-config EOS (chat models often list several) plus the
    tokenizer's EOS."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = set(eos) if isinstance(eos, (list, tuple)) else ({int(eos)} if eos is not None else set())
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    if not ids:
        raise ConfigError("the tokenizer has no eos_token and the model's generation_config names none")
    return ids


def _cut_at_eos(ids: list[int], eos: set[int]) -> tuple[list[int], bool]:
    """Response ids up to and including the first EOS (dropping the padding after it); (ids, truncated)."""
    for i, t in enumerate(ids):
        if t in eos:
            return ids[: i + 1], False
    return ids, True


def prompt_blocks(n_prompts: int, num_samples: int, batch_size: int) -> list[list[int]]:
    """Prompt indices cut into blocks of whole prompts, max(1, batch_size // num_samples) each: one HF generate
    call per block (a prompt with more samples than batch_size is cut further, inside its own block). The blocks
    depend only on the prompt list and these two sizes, so data-parallel ranks that each take whole blocks run
    exactly the forwards a single process would run."""
    k = max(1, batch_size // max(1, num_samples))
    return [list(range(i, min(i + k, n_prompts))) for i in range(0, n_prompts, k)]


def shard_prompts(n_prompts: int, num_samples: int, batch_size: int, rank: int, world_size: int) -> list[int]:
    """The prompt indices data-parallel rank `rank` of `world_size` generates: whole `prompt_blocks`, dealt
    round-robin (block j to rank j mod W), in increasing order."""
    blocks = prompt_blocks(n_prompts, num_samples, batch_size)
    return [p for j in range(rank, len(blocks), world_size) for p in blocks[j]]


class _RowSampler:
    """A logits processor that samples each row from its own seeded CPU generator (temperature, then top-p) and
    leaves only the drawn token at 0 (every other logit -inf), so generate's greedy step takes it. Each request
    (prompt, sample) draws one uniform per step from its own stream, seeded by `request_seed`, whatever else
    shares its batch; the token is found by inverse CDF in one batched search, so the per-row cost is one scalar
    draw on the CPU and the draws are the same on any device."""

    def __init__(self, seeds: list[int], temperature: float, top_p: float):
        self.generators = [torch.Generator().manual_seed(s) for s in seeds]
        self.temperature, self.top_p = temperature, top_p

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(scores.float() / self.temperature, dim=-1)
        if self.top_p < 1.0:  # keep the smallest set of most likely tokens whose mass reaches top_p
            sorted_p, order = probs.sort(dim=-1, descending=True)
            drop = sorted_p.cumsum(-1) - sorted_p >= self.top_p
            probs = probs.scatter(-1, order, sorted_p.masked_fill(drop, 0.0))
        u = torch.stack([torch.rand((), generator=g, dtype=torch.float64) for g in self.generators])
        cdf = probs.double().cumsum(-1)
        # right=True: the first token whose CDF exceeds u * mass, never one with probability 0
        tokens = torch.searchsorted(cdf, (u.to(cdf.device) * cdf[:, -1])[:, None], right=True)
        tokens = tokens.clamp_(max=scores.shape[-1] - 1)
        return torch.full_like(scores, float("-inf")).scatter_(-1, tokens, 0.0)


class HFGenerator:
    """Batched sampling with transformers' `generate`.

    Requests (prompt p, sample s) are generated in blocks of whole prompts (`prompt_blocks`), each block one
    left-padded batch (so every sequence's last prompt token sits at the same position). Every request samples
    from its own generator seeded with `request_seed(config.seed, prompt key, s)` (`_RowSampler`), so a sample is
    fixed by who it is, and a data-parallel rank that takes whole blocks (`shard_prompts`) produces the same
    tokens as one process generating everything. The caller's RNG state is untouched.
    """

    def __init__(self, model: Any, tokenizer: Any, config: GenerationConfig, progress: bool = True):
        config.validate()
        self.model, self.tokenizer, self.config, self.progress = model, tokenizer, config, progress

    def generate(self, prompts: list[str], keys: list[str] | None = None) -> list[list[Sample]]:
        """P prompts → P lists of `config.num_samples` Samples. `keys` name the prompts for their seeds (stable
        prompt ids; default: their positions)."""
        cfg, tok, model = self.config, self.tokenizer, self.model
        keys = [str(p) for p in range(len(prompts))] if keys is None else keys
        prompt_ids = tok(list(prompts), add_special_tokens=False)["input_ids"]
        for i, ids in enumerate(prompt_ids):
            if not ids:
                raise ValueError(f"prompt {i} tokenises to zero tokens")
        eos = _eos_ids(model, tok)
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else min(eos)
        device = next(model.parameters()).device
        # greedy decoding over logits that _RowSampler has reduced to the drawn token (temperature 0: plain greedy)
        gen_kwargs = dict(max_new_tokens=cfg.max_new_tokens, pad_token_id=pad_id, eos_token_id=sorted(eos),
                          do_sample=False, temperature=None, top_p=None, top_k=None)

        batches = []
        for block in prompt_blocks(len(prompts), cfg.num_samples, cfg.batch_size):
            requests = [(p, s) for p in block for s in range(cfg.num_samples)]
            batches += [requests[i : i + cfg.batch_size] for i in range(0, len(requests), cfg.batch_size)]
        out: list[list[Sample | None]] = [[None] * cfg.num_samples for _ in prompts]
        was_training = model.training
        model.eval()
        try:
            for batch in tqdm(batches, desc="generate", disable=not self.progress):
                rows = [prompt_ids[p] for p, _ in batch]
                width = max(len(r) for r in rows)
                # Left padding by hand: works for tokenizers without a pad token and leaves the tokenizer as is.
                input_ids = torch.tensor([[pad_id] * (width - len(r)) + r for r in rows], device=device)
                attention_mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
                extra = {}
                if cfg.temperature > 0:
                    from transformers import LogitsProcessorList

                    seeds = [request_seed(cfg.seed, keys[p], s) for p, s in batch]
                    extra["logits_processor"] = LogitsProcessorList([_RowSampler(seeds, cfg.temperature, cfg.top_p)])
                with torch.no_grad():
                    seqs = model.generate(input_ids=input_ids, attention_mask=attention_mask, **gen_kwargs, **extra)
                responses = [_cut_at_eos(row, eos) for row in seqs[:, width:].tolist()]
                texts = tok.batch_decode([ids for ids, _ in responses], skip_special_tokens=True)
                for (p, s), (ids, truncated), text in zip(batch, responses, texts):
                    out[p][s] = Sample(p, s, text, ids, truncated, prompt_ids[p])
        finally:
            model.train(was_training)
        return out  # type: ignore[return-value]


def request_seed(seed: int, prompt_key: str, sample_index: int) -> int:
    """A 31-bit seed per request from (phase seed, prompt key, sample index): the phase seed already derives from
    (run seed, iteration), so each sample's randomness is fixed by who it is, not by batching."""
    digest = hashlib.sha256(f"{seed}:{prompt_key}:{sample_index}".encode()).hexdigest()
    return int(digest[:8], 16) & 0x7FFFFFFF


def vllm_sampling_params(**kwargs: Any) -> Any:
    """`vllm.SamplingParams(**kwargs)`; the default factory of `VLLMGenerator` (tests pass their own)."""
    from vllm import SamplingParams

    return SamplingParams(**kwargs)


class VLLMGenerator:
    """Sampling with vLLM's offline engine `vllm.LLM` (GPU only).

    `engine`: an object with vLLM's `.generate(prompts, sampling_params)` API; when None, `vllm.LLM` is built
    from `model_path` (an HF checkpoint directory, e.g. the iteration's saved policy). Prompts are passed as
    token ids (tokenised like the HF backend), and responses are decoded with `tokenizer`, so both backends
    produce identical text for identical token ids. Each (prompt, sample) is its own request with its own seed,
    `request_seed(config.seed, prompt key, sample index)`, so the samples do not depend on how requests are
    batched or spread over engines.
    """

    def __init__(
        self,
        model_path: str,
        tokenizer: Any,
        config: GenerationConfig,
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.5,
        engine: Any = None,
        sampling_params_factory: Callable[..., Any] | None = None,
        **engine_kwargs: Any,
    ):
        config.validate()
        self.tokenizer, self.config = tokenizer, config
        self.sampling_params_factory = sampling_params_factory or vllm_sampling_params
        if engine is None:
            try:
                import vllm
            except ImportError as e:
                raise ImportError(
                    "the vLLM generation backend needs the vllm package: install vllm (GPU only) or use "
                    "--sera.generation_backend hf"
                ) from e
            engine = vllm.LLM(
                model=model_path,
                tensor_parallel_size=tensor_parallel_size,
                gpu_memory_utilization=gpu_memory_utilization,
                seed=config.seed,
                **engine_kwargs,
            )
        self.engine = engine

    def generate(self, prompts: list[str], keys: list[str] | None = None) -> list[list[Sample]]:
        """P prompts → P lists of `config.num_samples` Samples. `keys` name the prompts for their seeds (stable
        prompt ids; default: their positions)."""
        cfg = self.config
        keys = [str(p) for p in range(len(prompts))] if keys is None else keys
        prompt_ids = self.tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
        requests = [(p, s) for p in range(len(prompts)) for s in range(cfg.num_samples)]
        params = [self.sampling_params_factory(n=1, temperature=cfg.temperature, top_p=cfg.top_p,
                                               max_tokens=cfg.max_new_tokens,
                                               seed=request_seed(cfg.seed, keys[p], s)) for p, s in requests]
        outputs = self.engine.generate([{"prompt_token_ids": prompt_ids[p]} for p, _ in requests], params)
        if len(outputs) != len(requests):
            raise RuntimeError(f"vLLM returned {len(outputs)} outputs for {len(requests)} requests")
        token_ids = [list(o.outputs[0].token_ids) for o in outputs]
        texts = self.tokenizer.batch_decode(token_ids, skip_special_tokens=True)
        result = [[None] * cfg.num_samples for _ in prompts]
        for (p, s), o, ids, text in zip(requests, outputs, token_ids, texts):
            result[p][s] = Sample(p, s, text, ids, o.outputs[0].finish_reason == "length", prompt_ids[p])
        return result


def build_generator(
    backend: str,
    tokenizer: Any,
    config: GenerationConfig,
    model: Any = None,
    model_path: str | None = None,
    **kwargs: Any,
) -> HFGenerator | VLLMGenerator:
    """"hf" → HFGenerator(model, …); "vllm" → VLLMGenerator(model_path, …, **kwargs)."""
    if backend == "hf":
        if model is None:
            raise ValueError("the hf generation backend needs a loaded model")
        return HFGenerator(model, tokenizer, config, **kwargs)
    if backend == "vllm":
        if model_path is None and kwargs.get("engine") is None:
            raise ValueError("the vllm generation backend needs model_path (an HF checkpoint directory)")
        return VLLMGenerator(model_path, tokenizer, config, **kwargs)
    raise ConfigError(f"--sera.generation_backend must be one of {BACKENDS}, got {backend!r}")
