"""Generation backends on a tiny random Llama and a tokenizer trained in the test (no downloads)."""

import importlib.util
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from sera_openrlhf.errors import ConfigError
from sera_openrlhf.generation import (
    GenerationConfig,
    HFGenerator,
    Sample,
    VLLMGenerator,
    _RowSampler,
    prompt_blocks,
    request_seed,
    build_generator,
    shard_prompts,
)

CORPUS = [
    "The movie was wonderful and the actors were great.",
    "I did not like the ending, it felt rushed and flat.",
    "What a lovely day for a walk in the park with friends.",
    "User: tell me a story. Assistant: Once upon a time there was a small robot.",
] * 20
PROMPTS = ["User: hi\nAssistant:", "User: tell me a story about a robot in the park\nAssistant:", "The movie"]


def make_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<pad>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def make_model(tok, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    kwargs = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=len(tok), max_position_embeddings=256, initializer_range=0.3,  # peaked logits: stable greedy
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )
    kwargs.update(overrides)
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**kwargs)).eval()


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return make_model(tok)


def gen(model, tok, prompts=PROMPTS, **cfg):
    return HFGenerator(model, tok, GenerationConfig(**cfg), progress=False).generate(prompts)


def ids_of(samples):
    return [[s.token_ids for s in row] for row in samples]


class EosBias:
    """Adds `bias` to the EOS logit (forward hook on lm_head) to make EOS likely, certain or impossible."""

    def __init__(self, model, eos_id, bias):
        self.model, self.eos_id, self.bias = model, eos_id, bias

    def __enter__(self):
        def hook(module, inputs, logits):
            logits = logits.clone()
            logits[..., self.eos_id] += self.bias
            return logits

        self.handle = self.model.lm_head.register_forward_hook(hook)

    def __exit__(self, *exc):
        self.handle.remove()


# --------------------------------------------------------------------------------------------- HF backend


def test_shapes_indices_and_decoding(model, tok):
    out = gen(model, tok, num_samples=2, max_new_tokens=6, batch_size=4)  # batches cross prompt boundaries
    assert len(out) == len(PROMPTS) and all(len(row) == 2 for row in out)
    for p, row in enumerate(out):
        for s, sample in enumerate(row):
            assert isinstance(sample, Sample) and (sample.prompt_index, sample.sample_index) == (p, s)
            assert 1 <= len(sample.token_ids) <= 6 and tok.pad_token_id not in sample.token_ids
            assert sample.text == tok.decode(sample.token_ids, skip_special_tokens=True)


def test_truncation_flag(model, tok):
    eos = tok.eos_token_id
    with EosBias(model, eos, -1e4):  # EOS impossible → every response hits max_new_tokens
        out = gen(model, tok, num_samples=2, max_new_tokens=3)
    assert all(s.truncated and len(s.token_ids) == 3 for row in out for s in row)

    with EosBias(model, eos, 1e4):  # EOS first → empty text, EOS kept in token_ids
        out = gen(model, tok, num_samples=2, max_new_tokens=3)
    assert all(not s.truncated and s.token_ids == [eos] and s.text == "" for row in out for s in row)

    with EosBias(model, eos, 4.0):  # EOS likely but not certain: a mix, padding after EOS stripped
        out = gen(model, tok, num_samples=4, max_new_tokens=8, batch_size=12)
    samples = [s for row in out for s in row]
    assert {s.truncated for s in samples} == {True, False}
    for s in samples:
        if s.truncated:
            assert len(s.token_ids) == 8 and eos not in s.token_ids
        else:
            assert s.token_ids[-1] == eos and eos not in s.token_ids[:-1]


def test_left_padding_matches_unpadded_greedy(model, tok, monkeypatch):
    """With greedy decoding, a prompt padded in a batch must continue exactly like the prompt alone, which only
    holds with left padding (right padding would make the model continue after the pad tokens)."""
    alone = [gen(model, tok, [p], num_samples=1, temperature=0.0, max_new_tokens=8, batch_size=1)[0][0].token_ids
             for p in PROMPTS]

    seen = {}
    real_generate = model.generate

    def spy(**kwargs):
        seen.update(kwargs)
        return real_generate(**kwargs)

    monkeypatch.setattr(model, "generate", spy)
    batched = gen(model, tok, num_samples=1, temperature=0.0, max_new_tokens=8, batch_size=8)
    assert [row[0].token_ids for row in batched] == alone
    mask = seen["attention_mask"]
    assert mask[:, -1].all() and not mask[:, 0].all()  # pads on the left only
    assert seen["do_sample"] is False


def test_seed_reproducibility_and_rng_untouched(model, tok):
    state = torch.get_rng_state()
    a = gen(model, tok, num_samples=3, max_new_tokens=8, seed=7)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's RNG is not consumed
    b = gen(model, tok, num_samples=3, max_new_tokens=8, seed=7)
    c = gen(model, tok, num_samples=3, max_new_tokens=8, seed=8)
    assert ids_of(a) == ids_of(b)
    assert ids_of(a) != ids_of(c)


def test_row_sampler_draws_per_request():
    """Each row samples from its own seeded stream: the same request draws the same tokens whatever other rows
    share the batch, in whatever order, and top-p never picks a token outside the nucleus."""
    torch.manual_seed(0)
    scores = torch.randn(4, 50)
    seeds = [11, 12, 13, 14]

    def draws(rows, steps=20, top_p=1.0):
        sampler = _RowSampler([seeds[r] for r in rows], temperature=0.8, top_p=top_p)
        out = []
        for _ in range(steps):
            picked = sampler(None, scores[rows])
            assert torch.isinf(picked).sum(-1).eq(49).all() and picked.max(-1).values.eq(0).all()
            out.append(picked.argmax(-1))
        return torch.stack(out, 1)

    full = draws([0, 1, 2, 3])
    assert torch.equal(draws([2]), full[2:3])
    assert torch.equal(draws([3, 1]), full[[3, 1]])
    assert len(set(full[0].tolist())) > 1  # it samples, not argmax
    nucleus = draws([0], steps=40, top_p=0.3)
    probs = torch.softmax(scores[0] / 0.8, -1)
    order = probs.argsort(descending=True)
    allowed = order[: int((probs[order].cumsum(0) < 0.3).sum()) + 1]
    assert set(nucleus[0].tolist()) <= set(allowed.tolist())


def test_blocks_and_shards_cover_every_prompt_once():
    assert prompt_blocks(7, 4, 8) == [[0, 1], [2, 3], [4, 5], [6]]
    assert prompt_blocks(3, 8, 4) == [[0], [1], [2]]  # more samples than a batch: one prompt per block
    for n, world in ((7, 3), (16, 4), (2, 4)):
        shards = [shard_prompts(n, 4, 8, r, world) for r in range(world)]
        assert sorted(p for s in shards for p in s) == list(range(n))
    assert shard_prompts(7, 4, 8, 1, 2) == [2, 3, 6]


def test_sharded_generation_equals_one_process(model, tok, batch_size=8):
    """Ranks generating their shards (whole blocks) produce exactly the samples of one process generating all:
    the same requests, seeds and batches."""
    prompts = PROMPTS * 3
    keys = [f"p{i}" for i in range(len(prompts))]
    cfg = dict(num_samples=3, max_new_tokens=10, batch_size=batch_size, seed=4)
    one = ids_of(HFGenerator(model, tok, GenerationConfig(**cfg), progress=False).generate(prompts, keys))
    for world in (2, 4):
        merged = [None] * len(prompts)
        for rank in range(world):
            mine = shard_prompts(len(prompts), 3, batch_size, rank, world)
            out = HFGenerator(model, tok, GenerationConfig(**cfg), progress=False).generate(
                [prompts[i] for i in mine], [keys[i] for i in mine])
            for i, row in zip(mine, ids_of(out)):
                merged[i] = row
        assert merged == one


def test_tokenizer_and_model_state_restored(model, tok):
    tok.padding_side = "right"
    model.train()
    gen(model, tok, num_samples=1, max_new_tokens=2)
    assert tok.padding_side == "right" and model.training
    model.eval()


@pytest.mark.parametrize(
    "kwargs, flag",
    [(dict(num_samples=0), "--sera.num_samples"), (dict(top_p=0.0), "--sera.top_p"),
     (dict(temperature=-1.0), "--sera.temperature"), (dict(batch_size=0), "--sera.generation_batch_size")],
)
def test_config_validation_names_flag(model, tok, kwargs, flag):
    with pytest.raises(ConfigError, match=flag):
        HFGenerator(model, tok, GenerationConfig(**kwargs))


def test_build_generator(model, tok):
    assert isinstance(build_generator("hf", tok, GenerationConfig(), model=model), HFGenerator)
    fake = build_generator("vllm", tok, GenerationConfig(), engine=object())
    assert isinstance(fake, VLLMGenerator)
    with pytest.raises(ConfigError, match="--sera.generation_backend"):
        build_generator("sglang", tok, GenerationConfig(), model=model)


# --------------------------------------------------------------------------------------------- vLLM backend


class FakeEngine:
    """Stands in for vllm.LLM: one completion per request (n = 1), whose tokens encode the request's seed; requests
    of sample index 2 are cut by the length limit."""

    def __init__(self, eos_id):
        self.eos_id, self.calls = eos_id, []

    def generate(self, prompts, sampling_params):
        self.calls.append((prompts, sampling_params))
        assert len(prompts) == len(sampling_params)  # vLLM accepts one SamplingParams per request
        results = []
        for prompt, params in zip(prompts, sampling_params):
            assert params["n"] == 1
            seed_token = 40 + params["seed"] % 50
            if len(results) % 3 == 2:  # requests are prompt-major with 3 samples each
                ids, reason = [seed_token] * params["max_tokens"], "length"
            else:
                ids, reason = [seed_token, 50, self.eos_id], "stop"
            completion = SimpleNamespace(index=0, token_ids=ids, finish_reason=reason, text="ignored")
            results.append(SimpleNamespace(prompt_token_ids=prompt["prompt_token_ids"], outputs=[completion]))
        return results


def test_vllm_backend_one_request_per_sample_with_its_own_seed(tok):
    engine = FakeEngine(tok.eos_token_id)
    cfg = GenerationConfig(num_samples=3, temperature=0.7, top_p=0.9, max_new_tokens=5, seed=11)
    generator = VLLMGenerator("unused", tok, cfg, engine=engine, sampling_params_factory=lambda **kw: kw)
    keys = [f"prompt-{i}" for i in range(len(PROMPTS))]
    out = generator.generate(PROMPTS, keys)

    prompts, params = engine.calls[0]
    assert len(params) == 3 * len(PROMPTS)
    assert params[0] == dict(n=1, temperature=0.7, top_p=0.9, max_tokens=5, seed=request_seed(11, "prompt-0", 0))
    assert [p["seed"] for p in params] == [request_seed(11, k, s) for k in keys for s in range(3)]
    assert len({p["seed"] for p in params}) == len(params)  # every request draws its own numbers
    ids = tok(PROMPTS, add_special_tokens=False)["input_ids"]
    assert [p["prompt_token_ids"] for p in prompts] == [i for i in ids for _ in range(3)]
    assert len(out) == len(PROMPTS) and all(len(row) == 3 for row in out)
    for p, row in enumerate(out):
        for s, sample in enumerate(row):
            assert (sample.prompt_index, sample.sample_index) == (p, s) and sample.prompt_ids == ids[p]
            assert sample.truncated == (s == 2)
            assert sample.text == tok.decode(sample.token_ids, skip_special_tokens=True)
            assert sample.token_ids[0] == 40 + request_seed(11, keys[p], s) % 50

    # the same prompt key gets the same seeds whatever else is in the batch, or in which order
    alone = VLLMGenerator("unused", tok, cfg, engine=FakeEngine(tok.eos_token_id),
                          sampling_params_factory=lambda **kw: kw).generate(PROMPTS[1:2], keys[1:2])
    assert [smp.token_ids for smp in alone[0]] == [smp.token_ids for smp in out[1]]


def test_request_seed_depends_on_seed_prompt_and_sample_only():
    assert request_seed(1, "a", 0) == request_seed(1, "a", 0)
    assert len({request_seed(1, "a", 0), request_seed(2, "a", 0), request_seed(1, "b", 0), request_seed(1, "a", 1)}) == 4
    assert all(0 <= request_seed(s, "x", 3) < 2**31 for s in range(50))


def test_vllm_missing_gives_clear_error(tok, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # makes `import vllm` raise ImportError
    with pytest.raises(ImportError, match="--sera.generation_backend hf"):
        VLLMGenerator("some/model", tok, GenerationConfig())


def test_imports_stay_lazy():
    code = (
        "import sys, sera_openrlhf.bootstrap as b\n"
        "heavy = {'transformers', 'openrlhf', 'deepspeed', 'vllm', 'ray'} & set(sys.modules)\n"
        "assert not heavy, heavy\n"
        "import sera_openrlhf.generation\n"
        "assert 'vllm' not in sys.modules and 'ray' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available() or importlib.util.find_spec("vllm") is None, reason="needs CUDA and vllm"
)
def test_vllm_backend_real_engine(tok, tmp_path):
    # head_dim 64: vLLM's attention kernels do not support the tiny head_dim of the CPU test model.
    model = make_model(tok, hidden_size=128, intermediate_size=256, num_attention_heads=2, num_key_value_heads=2)
    model.to(torch.bfloat16).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    cfg = GenerationConfig(num_samples=3, max_new_tokens=6, seed=1)
    generator = VLLMGenerator(str(tmp_path), tok, cfg, gpu_memory_utilization=0.3, enforce_eager=True,
                              max_model_len=256, dtype="bfloat16")
    out = generator.generate(PROMPTS)
    assert [len(row) for row in out] == [3] * len(PROMPTS)
    for row in out:
        for s in row:
            assert 1 <= len(s.token_ids) <= 6
            assert s.truncated == (tok.eos_token_id not in s.token_ids)
