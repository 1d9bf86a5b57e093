"""What the SeRA phases need from OpenRLHF, behind one object: train a policy, score pairs and samples, generate.

`OpenRLHFBackend` is the only thing the phases hold that knows OpenRLHF's `args` and DeepSpeed strategy; the
phases themselves see typed configs and plain rows.
"""

from __future__ import annotations

import copy
import os
from contextlib import contextmanager

import torch
import torch.distributed as dist

from sera_openrlhf.generation import GenerationConfig
from sera_openrlhf.losses import DAALoss
from sera_openrlhf.openrlhf_adapter.dataset import prompt_too_long
from sera_openrlhf.openrlhf_adapter.generate import format_prompt, generate_samples, load_hf_tokenizer
from sera_openrlhf.openrlhf_adapter.train import (CachedReference, ScoringModel, build_dataset, per_dp_rank,
                                                  score_dataset, scoring_shard, train_policy)
from sera_openrlhf.scoring import add_counts, score_sequences


class OpenRLHFBackend:
    def __init__(self, args, strategy, *, use_prompt_key: bool, cache_dir: str, daa_loss: DAALoss, eval_rows=None):
        self.eval_rows = eval_rows  # --eval.dataset pairs, evaluated after every training phase
        self.args = args
        self.strategy = strategy
        self.use_prompt_key = use_prompt_key
        self.cache_dir = cache_dir
        self.loss = daa_loss
        self.engines = None  # RayVLLMEngines with --sera.vllm_engines, created at the first generation
        self.load = {}  # this phase's work per DP rank: generated_per_rank, scored_per_rank

    def take_load(self) -> dict:
        """The work per DP rank since the last call (the driver adds it to each phase's stats)."""
        load, self.load = self.load, {}
        return load

    def count(self, key: str, per_rank) -> None:
        self.load[key] = add_counts(self.load.get(key), per_rank)

    @property
    def is_writer(self) -> bool:
        return self.strategy.is_rank_0()

    def print(self, msg: str) -> None:
        self.strategy.print(msg)

    def barrier(self) -> None:
        if dist.is_initialized():
            dist.barrier()

    def train(self, name: str, rows, policy: str, reference: str, output_dir: str, epochs: int | None = None) -> dict:
        """One DAA training run on `rows` from `policy` against `reference`; saves to `output_dir`. `epochs`
        overrides --train.max_epochs (the fold twins' --sera.fold_epochs).

        `name` (iter<t>, iter<t>_fold<k>) names the phase's logger run (<run_name>_<name>: one TensorBoard/wandb
        run per training phase, each with its own step counter) and its DeepSpeed checkpoint directory
        (<--ckpt.path>/<name>), so --ckpt.load_enable resumes only the phase that was interrupted."""
        args = copy.deepcopy(self.args)  # the trainer rewrites eval/save steps in place
        args.logger.wandb.run_name = f"{self.args.logger.wandb.run_name}_{name}"
        args.ckpt.path = os.path.join(self.args.ckpt.path, name)
        if epochs:
            args.train.max_epochs = epochs
        stock_args, self.strategy.args = self.strategy.args, args  # DPOTrainer reads its logger from strategy.args
        sync = None
        if self.engines is not None and "_fold" not in name:  # the next generation samples this policy
            sync = lambda model: self.engines.sync_from_model(model, output_dir)  # noqa: E731
        try:
            stats = train_policy(
                args, self.strategy, policy_path=policy, ref_path=reference, rows=rows, output_dir=output_dir,
                daa_loss=self.loss, use_prompt_key=self.use_prompt_key,
                use_ref_cache=self.args.sera.ref_cache != "off", cache_dir=self.cache_dir, eval_rows=self.eval_rows,
                merge_lora=True, on_trained=sync,
            )
        finally:
            self.strategy.args = stock_args
        self.count("scored_per_rank", stats.pop("scored_per_rank"))
        return stats

    def over_long(self, rows, prompts) -> tuple[set, set]:
        """Ids of the offline pairs and of the bootstrapping prompts whose formatted prompt does not fit
        --data.max_len (OpenRLHF's own rule), tokenised by the initial policy's tokenizer."""
        from openrlhf.datasets.reward_dataset import preprocess_data

        tokenizer = load_hf_tokenizer(self.args, self.args.model.model_name_or_path)
        d, max_len = self.args.data, self.args.data.max_len
        apply_tpl = tokenizer.apply_chat_template if d.apply_chat_template else None
        if d.apply_chat_template and d.tokenizer_chat_template:
            tokenizer.chat_template = d.tokenizer_chat_template
        key = "prompt" if self.use_prompt_key else None
        pairs = {r["id"] for r in rows if prompt_too_long(
            tokenizer, preprocess_data(r, d.input_template, key, "chosen", "rejected", apply_tpl, is_dpo=True)[0],
            max_len)}
        long_prompts = {p["id"] for p in prompts
                        if prompt_too_long(tokenizer, format_prompt(self.args, tokenizer, p["prompt"]), max_len)}
        return pairs, long_prompts

    @contextmanager
    def scoring_dtype(self):
        """--sera.score_precision fp32: the scoring models load and run in fp32 (the DeepSpeed eval engine reads the
        strategy's dtype, the Actor the args'); the reference cache keys on the dtype, so these reference log-probs
        are cached apart from training's."""
        if self.args.sera.score_precision != "fp32":
            yield
            return
        saved = self.args.ds.param_dtype, self.strategy.param_dtype
        self.args.ds.param_dtype = self.strategy.param_dtype = "fp32"
        try:
            yield
        finally:
            self.args.ds.param_dtype, self.strategy.param_dtype = saved

    def pair_rewards(self, policy: str, reference: str, rows) -> dict:
        """Implicit rewards of every pair under (policy, its reference): [N] tensors aligned with `ids`, plus the
        ids of pairs skipped for an over-long prompt. In --sera.score_precision."""
        with self.scoring_dtype():
            return self._pair_rewards(policy, reference, rows)

    def _pair_rewards(self, policy: str, reference: str, rows) -> dict:
        scorer = ScoringModel.load(self.args, self.strategy, policy)
        tokenizer = scorer.tokenizer
        dataset = build_dataset(self.args, tokenizer, rows, self.use_prompt_key)  # tokenised once, reused below
        chosen, rejected = score_dataset(self.args, self.strategy, scorer.logprob_fn, dataset,
                                         tokenizer.pad_token_id, desc="self-review: policy log-probs")
        scorer.free()
        self.count("scored_per_rank", per_dp_rank(self.strategy, chosen.per_rank))
        ref_c = ref_r = None
        if self.loss.needs_reference:
            ref = CachedReference(self.args, self.strategy, reference, self.cache_dir, [dataset],
                                  tokenizer.pad_token_id)
            ref_c, ref_r = ref(dataset, torch.arange(len(dataset)))
            self.count("scored_per_rank", ref.scored_per_rank)
        lens_c, lens_r = chosen.num_tokens.double(), rejected.num_tokens.double()
        return {"ids": dataset.ids, "too_long": dataset.too_long_ids,
                "chosen_reward": self.loss.implicit_reward(chosen.logp_sum, ref_c, lens_c).double(),
                "rejected_reward": self.loss.implicit_reward(rejected.logp_sum, ref_r, lens_r).double(),
                "chosen_len": lens_c, "rejected_len": lens_r}

    def sequence_logps(self, models: dict, rows) -> tuple[dict, list]:
        """Summed log-probs of each row's response token ids (`token_ids`, after its `prompt_ids`: the ids that
        were generated, never re-encoded text) under every model; `models` maps a directory to the tags it is
        scored under. Returns ({tag: [logp per row]}, [response tokens per row]). In --sera.score_precision."""
        with self.scoring_dtype():
            return self._sequence_logps(models, rows)

    def _sequence_logps(self, models: dict, rows) -> tuple[dict, list]:
        sequences = [(r["prompt_ids"] + r["token_ids"], len(r["prompt_ids"])) for r in rows]
        logps, n_tokens = {}, []
        rank, world = scoring_shard(self.strategy)
        for path, tags in models.items():
            scorer = ScoringModel.load(self.args, self.strategy, path)
            res = score_sequences(
                scorer.logprob_fn, sequences, scorer.tokenizer.pad_token_id,
                max_tokens_per_batch=self.args.sera.score_tokens_per_batch,
                max_batch_size=self.args.sera.score_batch_size, desc=f"score samples ({', '.join(tags)})",
                rank=rank, world_size=world,
            )
            scorer.free()
            self.count("scored_per_rank", per_dp_rank(self.strategy, res.per_rank))
            for tag in tags:
                logps[tag] = [float(x) for x in res.logp_sum]
            n_tokens = [int(x) for x in res.num_tokens]
        return logps, n_tokens

    def generate(self, policy: str, prompts: list, config: GenerationConfig, keys: list[str]):
        """P lists of S `Sample`s from `policy` for `prompts` (strings or chat-message lists); `keys` are the
        prompts' ids (per-request seeds). Sharded over DP ranks; the prompts each generated go to the phase's
        `generated_per_rank`."""
        if self.args.sera.vllm_engines and self.engines is None:
            from sera_openrlhf.openrlhf_adapter.vllm_engines import RayVLLMEngines

            self.engines = RayVLLMEngines.launch(self.args, self.strategy, policy)
        samples, per_rank = generate_samples(self.args, self.strategy, policy, prompts, config, keys, self.engines)
        self.count("generated_per_rank", per_rank)
        return samples

    def close(self) -> None:
        if self.engines is not None:
            self.engines.close()
            self.engines = None
