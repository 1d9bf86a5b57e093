"""Building blocks on OpenRLHF's DeepSpeed strategy: load models, build datasets, score, train one policy.

`train_policy` is one DAA training run, the same steps as `openrlhf.cli.train_dpo.train` with the
differences listed in `trainer.py`. The SeRA loop calls it once per iteration inside one process, so the
distributed backend is initialised once (`setup_strategy`).
"""

from __future__ import annotations

import gc
import json
import math
import os
from dataclasses import dataclass

import torch.distributed as dist
from openrlhf.models import Actor
from openrlhf.utils import get_strategy, get_tokenizer

from sera_openrlhf import memory
from sera_openrlhf.errors import ConfigError
from sera_openrlhf.fileio import atomic_write_jsonl
from sera_openrlhf.losses import DAALoss
from sera_openrlhf.openrlhf_adapter.dataset import IndexedRewardDataset
from sera_openrlhf.openrlhf_adapter.trainer import SeraDPOTrainer
from sera_openrlhf.refcache import ReferenceCache, content_hash
from sera_openrlhf.scoring import actor_logprob_fn, add_counts, model_fingerprint, score_pairs


def setup_strategy(args):
    strategy = get_strategy(args)
    strategy.setup_distributed()
    return strategy


def load_actor(args, strategy, path: str, *, train: bool) -> Actor:
    """An OpenRLHF Actor configured from the stock flags (LoRA and liger only for the trained policy)."""
    common = dict(
        attn_implementation=args.ds.attn_implementation,
        experts_implementation=args.ds.experts_implementation,
        param_dtype=args.ds.param_dtype,
        load_in_4bit=args.ds.load_in_4bit,
        packing_samples=args.ds.packing_samples,
    )
    if train:
        return Actor(
            path, lora_rank=args.ds.lora.rank, lora_alpha=args.ds.lora.alpha, lora_dropout=args.ds.lora.dropout,
            target_modules=args.ds.lora.target_modules, ds_config=strategy.get_ds_train_config(),
            use_liger_kernel=args.ds.use_liger_kernel, **common,
        )
    return Actor(path, ds_config=strategy.get_ds_eval_config(offload=args.ref.offload), **common)


def load_tokenizer(args, strategy, path: str, actor: Actor):
    return get_tokenizer(path, actor.model, "right", strategy, use_fast=not args.data.disable_fast_tokenizer)


def build_dataset(args, tokenizer, rows, use_prompt_key: bool) -> IndexedRewardDataset:
    return IndexedRewardDataset(rows, tokenizer, args.data.max_len, args, input_template=args.data.input_template,
                                use_prompt_key=use_prompt_key)


def dp_layout(strategy) -> tuple[int, int, list[int]]:
    """(data-parallel rank, data-parallel size, the DP rank of every global rank), from OpenRLHF's device mesh
    (dp x sp x tp): ranks of one ring-attention or tensor-parallel group share a DP rank and must see the same
    data. Computed once per process (a collective the first time)."""
    cached = getattr(strategy, "_sera_dp_layout", None)
    if cached is not None:
        return cached
    if not dist.is_initialized() or dist.get_world_size() == 1:
        layout = (0, 1, [0])
    else:
        mesh = getattr(strategy, "ds_device_mesh", None)
        group = mesh["dp"].get_group() if mesh is not None else None
        rank, size = dist.get_rank(group), dist.get_world_size(group)
        of = [None] * dist.get_world_size()
        dist.all_gather_object(of, rank)
        layout = (rank, size, of)
    strategy._sera_dp_layout = layout
    return layout


def per_dp_rank(strategy, per_global: list | None) -> list | None:
    """Counts gathered per global rank → per DP rank (the first global rank of each DP rank; the others of its
    sp/tp group did the same work)."""
    if per_global is None:
        return None
    _, size, of = dp_layout(strategy)
    if len(per_global) != len(of):  # one process, or already per DP rank
        return list(per_global)
    out = [None] * size
    for g, d in enumerate(of):
        if out[d] is None:
            out[d] = per_global[g]
    return out


def scoring_shard(strategy) -> tuple[int, int]:
    """(rank, world) for data-parallel scoring: this rank's DP position. Also under ZeRO-3, where parameters are
    gathered collectively inside every forward: the engine gives ranks with fewer batches dummy forwards, so all
    ranks run the same number."""
    rank, size, _ = dp_layout(strategy)
    return rank, size


def score_dataset(args, strategy, logprob_fn, dataset: IndexedRewardDataset, pad_token_id: int, desc: str):
    """Summed response log-probs and lengths of every pair: (chosen ScoreResult, rejected ScoreResult)."""
    rank, world = scoring_shard(strategy)
    pairs = [dataset.pair_tokens(i) for i in range(len(dataset))]
    return score_pairs(
        logprob_fn, pairs, pad_token_id, max_tokens_per_batch=args.sera.score_tokens_per_batch,
        max_batch_size=args.sera.score_batch_size, desc=desc, rank=rank, world_size=world,
    )


@dataclass
class ScoringModel:
    """A no-grad model (DeepSpeed eval engine, so ZeRO-3 works) and its log-prob function."""

    actor: Actor
    tokenizer: object
    logprob_fn: object

    @classmethod
    def load(cls, args, strategy, path: str) -> "ScoringModel":
        actor = load_actor(args, strategy, path, train=False)
        tokenizer = load_tokenizer(args, strategy, path, actor)  # before prepare(): it edits the HF config
        actor = strategy.prepare(actor)
        actor.eval()
        return cls(actor, tokenizer, actor_logprob_fn(actor, ring_attn_group=strategy.ring_attn_group))

    def free(self):
        destroy_engine(self.actor)
        self.actor = self.logprob_fn = None
        memory.release()  # before the next model of the same phase loads


def destroy_engine(actor) -> None:
    """Free a prepared Actor's DeepSpeed engine. Its ZeRO optimizer registers gradient hooks whose closures keep
    the engine, the flat fp32 partitions and the Adam states alive after the last Python reference is gone
    (2.7 GB for a 135M model), so every training phase of the loop would add its own to the process."""
    engine = getattr(actor, "model", None)
    if hasattr(engine, "destroy"):
        engine.destroy()


def reference_fingerprint(args, path: str) -> str:
    """The reference's cache key: log-probs depend on weights, dtype and attention kernel. A Hub id is resolved
    first, as transformers resolves it, and its cached snapshot is hashed like any checkpoint directory."""
    from sera_openrlhf.sources import resolve_model

    snapshot = resolve_model(path, "--ref.model_name_or_path", download=True)
    return model_fingerprint(snapshot, extra={"dtype": args.ds.param_dtype, "attn": args.ds.attn_implementation})


class CachedReference:
    """Reference log-probs of every pair of the given datasets, read from / written to a `ReferenceCache`."""

    def __init__(self, args, strategy, ref_path: str, cache_dir: str, datasets, pad_token_id: int):
        self.cache = ReferenceCache(cache_dir, reference_fingerprint(args, ref_path), writer=strategy.is_rank_0())
        self.tables = {}
        self.scored_per_rank = None  # sequences each DP rank scored for cache misses
        scorer = None
        rank, world = scoring_shard(strategy)
        for ds in datasets:
            pairs = [ds.pair_tokens(i) for i in range(len(ds))]
            hashes = [content_hash(*p) for p in pairs]
            hit, _, _ = self.cache.lookup(ds.ids, hashes)
            if not bool(hit.all()) and scorer is None:
                scorer = ScoringModel.load(args, strategy, ref_path)
            chosen, rejected = self.cache.ensure(
                ds.ids, pairs, scorer.logprob_fn if scorer else None, pad_token_id,
                max_tokens_per_batch=args.sera.score_tokens_per_batch, max_batch_size=args.sera.score_batch_size,
                desc="reference log-probs", rank=rank, world_size=world,
            )
            self.tables[id(ds)] = (chosen, rejected)
            self.scored_per_rank = add_counts(self.scored_per_rank, per_dp_rank(strategy, self.cache.scored_per_rank))
        if scorer is not None:
            scorer.free()  # the reference is not needed again for this training run

    def __call__(self, dataset, indices):
        chosen, rejected = self.tables[id(dataset)]
        return chosen[indices], rejected[indices]


def train_policy(args, strategy, *, policy_path: str, ref_path: str, rows, output_dir: str, daa_loss: DAALoss,
                 use_prompt_key: bool, use_ref_cache: bool, cache_dir: str | None = None, eval_rows=None,
                 merge_lora: bool = False, on_trained=None) -> dict:
    """One DAA training run on `rows` (evaluated on `eval_rows` after the last step, if any); saves the HF model
    to `output_dir` and returns its statistics. With LoRA, OpenRLHF saves the adapter only; `merge_lora` (the
    SeRA loop) saves it to `<output_dir>/../adapter` instead and base + adapter merged to `output_dir`, so later
    phases load a plain model. `on_trained(model)` is called on every rank with the trained Actor (its DeepSpeed
    engine still alive) before it is freed: the vLLM engines' weight sync."""
    model = load_actor(args, strategy, policy_path, train=True)
    tokenizer = load_tokenizer(args, strategy, policy_path, model)
    if args.model.gradient_checkpointing_enable:
        model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": args.model.gradient_checkpointing_reentrant}
        )
    train_dataset = build_dataset(args, tokenizer, rows, use_prompt_key)
    eval_dataset = build_dataset(args, tokenizer, eval_rows, use_prompt_key) if eval_rows else None
    if len(train_dataset) < args.train.batch_size:
        raise ConfigError(
            f"{len(train_dataset)} training pairs (after dropping {len(train_dataset.too_long_ids)} with prompts "
            f"longer than --data.max_len {args.data.max_len}) is fewer than --train.batch_size "
            f"{args.train.batch_size}: lower --train.batch_size or keep more pairs"
        )

    ref_model = ref_logps = None
    if daa_loss.needs_reference:
        if use_ref_cache:
            ref_logps = CachedReference(args, strategy, ref_path, cache_dir or os.path.join(output_dir, "cache"),
                                        [d for d in (train_dataset, eval_dataset) if d is not None],
                                        tokenizer.pad_token_id)
        else:
            ref_model = load_actor(args, strategy, ref_path, train=False)
            if args.ref.offload:
                ref_model._offload = True

    train_dataloader = strategy.setup_dataloader(
        train_dataset, args.train.micro_batch_size, True, True, train_dataset.collate_fn,
        num_workers=args.data.dataloader_num_workers,
    )
    eval_dataloader = None
    if eval_dataset is not None and len(eval_dataset):
        eval_dataloader = strategy.setup_dataloader(
            eval_dataset, args.train.micro_batch_size, True, False, eval_dataset.collate_fn, drop_last=False,
            num_workers=args.data.dataloader_num_workers,
        )
    num_update_steps_per_epoch = len(train_dataset) // args.train.batch_size
    max_steps = math.ceil(args.train.max_epochs * num_update_steps_per_epoch)
    cfg = dict(
        optim=args.optim, muon=vars(args.muon), adam=vars(args.adam), lr_scheduler=args.lr_scheduler,
        lr_warmup_ratio=args.lr_warmup_ratio, min_lr_ratio=args.min_lr_ratio, max_norm=args.max_norm,
        scheduler_steps=max_steps,
    )
    if ref_model is not None:
        (model, optim, scheduler), ref_model = strategy.prepare((model, cfg), ref_model)
    else:
        model, optim, scheduler = strategy.prepare((model, cfg))

    consumed_samples = 0
    if args.ckpt.load_enable and os.path.exists(args.ckpt.path):
        load_path, states = strategy.load_ckpt(model.model, args.ckpt.path)
        if load_path is not None:
            consumed_samples = states["consumed_samples"]
            strategy.print(f"Loaded the checkpoint: {args.ckpt.path}, consumed_samples: {consumed_samples}")

    os.makedirs(output_dir, exist_ok=True)
    trainer = SeraDPOTrainer(
        daa_loss=daa_loss, train_dataset=train_dataset, ref_logps=ref_logps,
        model=model, ref_model=ref_model, tokenizer=tokenizer, strategy=strategy, optim=optim,
        train_dataloader=train_dataloader, eval_dataloader=eval_dataloader, scheduler=scheduler,
        max_norm=args.max_norm, beta=args.model.beta, max_epochs=args.train.max_epochs,
        save_hf_ckpt=args.ckpt.save_hf, disable_ds_ckpt=args.ckpt.disable_ds, packed=args.sera.packed_train,
    )
    trainer.fit(args, consumed_samples, num_update_steps_per_epoch)
    final_eval = None
    if eval_dataloader is not None:
        trainer._wandb = trainer._tensorboard = None  # fit() closed them; this result goes to the SeRA stats
        final_eval = trainer.evaluate(eval_dataloader, len(trainer.step_logs))
        if isinstance(final_eval, dict):  # how many pairs the figures cover: over-long prompts are skipped
            final_eval = {**final_eval, "n": len(eval_dataset), "n_prompt_too_long": len(eval_dataset.too_long_ids)}
    lora = None
    if args.ds.lora.rank > 0 and merge_lora:
        lora = os.path.join(os.path.dirname(os.path.abspath(output_dir)), "adapter")
        strategy.save_model(model, tokenizer, lora)  # OpenRLHF saves LoRA runs as adapter-only
        if strategy.is_rank_0():
            merge_adapter(policy_path, lora, output_dir, args.sera.trust_remote_code)
        if dist.is_initialized():
            dist.barrier()
    else:
        strategy.save_model(model, tokenizer, output_dir)
    margins = trainer.pair_margins
    if dist.is_initialized() and dist.get_world_size() > 1:
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, margins)
        # ranks of one sp/tp group trained the same pairs in the same step: one record each
        margins = list({(m["id"], m["epoch"], m["micro_step"]): m for part in parts for m in part}.values())
    if strategy.is_rank_0():
        atomic_write_jsonl(os.path.join(output_dir, "train_log.jsonl"), trainer.step_logs)
        atomic_write_jsonl(os.path.join(output_dir, "train_margins.jsonl"),
                           sorted(margins, key=lambda m: (m["epoch"], m["micro_step"])))
    if on_trained is not None and lora is None:  # a LoRA model's weights are not the merged policy's
        on_trained(model)
    stats = {
        "resumed_from_samples": consumed_samples,
        "eval": final_eval,
        "lora": {"adapter": lora, "merged_into": output_dir} if lora else None,
        "n_train_pairs": len(train_dataset),
        "n_prompt_too_long": len(train_dataset.too_long_ids),
        "steps": len(trainer.step_logs),
        "loss_first": trainer.step_logs[0]["loss"] if trainer.step_logs else None,
        "loss_last": trainer.step_logs[-1]["loss"] if trainer.step_logs else None,
        "acc_last": trainer.step_logs[-1]["acc"] if trainer.step_logs else None,
        "reference_loaded": ref_model is not None or (ref_logps is not None),
        "packed_train": trainer.packed is not None and not trainer.packed.disabled,
        "scored_per_rank": getattr(ref_logps, "scored_per_rank", None),  # reference-cache misses
    }
    for actor in (model, ref_model):
        destroy_engine(actor)
    del trainer, model, optim, scheduler, ref_model, ref_logps
    gc.collect()
    return stats


def merge_adapter(base_path: str, adapter_dir: str, output_dir: str, trust_remote_code: bool) -> None:
    """base + LoRA adapter → one plain HF checkpoint, so scoring, generation and the next iteration load a full
    model (the reference stays the base)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(base_path, trust_remote_code=trust_remote_code)
    merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    merged.save_pretrained(output_dir)
    AutoTokenizer.from_pretrained(adapter_dir, trust_remote_code=trust_remote_code).save_pretrained(output_dir)


def dump_args(args) -> dict:
    """The parsed configuration as plain JSON (for state files and reports)."""

    def plain(x):
        if hasattr(x, "__dict__"):
            return {k: plain(v) for k, v in vars(x).items() if not k.startswith("_")}
        if isinstance(x, (list, tuple)):
            return [plain(v) for v in x]
        return x if isinstance(x, (str, int, float, bool, type(None))) else str(x)

    return json.loads(json.dumps(plain(args)))
