"""The SeRA loop (design.md §1), read top to bottom in `Driver.run`:

    iteration 1: train the DAA on every offline pair (+ its fold twins for a cross-fitted review)
    for t in 2..T: review → [generate → score → pair] → train (+ fold twins), until converged
    (once, before the first pairing: the fluency floor from the initial policy's samples)

Every phase writes its outputs atomically and is then marked done in `sera_state.json`; rerunning the same
command skips finished phases and redoes an interrupted one from its start (`Driver.phase` decides, in one
place). `run_sera(args)` is the boundary with OpenRLHF: it turns the parsed flags into typed configs, the data,
the run directory and the OpenRLHF backend, and nothing below it sees `args`.
"""

from __future__ import annotations

import os
import time

from sera_openrlhf import events, memory
from sera_openrlhf.config import SeraConfig
from sera_openrlhf.errors import ConfigError
from sera_openrlhf.losses import DAALoss
from sera_openrlhf.metrics import LoggerSettings, PhaseMetrics
from sera_openrlhf.phases import RunContext
from sera_openrlhf.phases import fluency, generate, pair, review, score, train
from sera_openrlhf.rundir import RunDir
from sera_openrlhf.sources import DataSpec, content_sha256, drop_over_long, load_offline, load_prompts
from sera_openrlhf.state import RunLock, RunState


class Driver:
    def __init__(self, ctx: RunContext, metrics: PhaseMetrics):
        self.ctx = ctx
        self.metrics = metrics

    def phase(self, t: int, name: str, index: int, fn):
        """Run `fn()` unless (t, name) is done; its stats go to the state file with the phase."""
        key = f"iter{t}/{name}"
        state = self.ctx.state
        if state.done(key):
            return state.stats(t).get(name)
        import transformers

        transformers.set_seed(self.ctx.phase_seed(t, index))
        self.ctx.backend.print(f"[sera] iteration {t}: {name}")
        events.current_phase = key
        events.emit(f"{key}:start")
        memory.reset_peak()
        take_load = getattr(self.ctx.backend, "take_load", None)  # stand-in backends may not count work
        if take_load is not None:
            take_load()
        start = time.time()
        stats = fn()
        if take_load is not None:
            stats = {**stats, **take_load()}  # generated_per_rank / scored_per_rank: the work of each DP rank
        memory.release()  # the phase's models are gone: give their memory back before the next phase loads its own
        self.ctx.backend.barrier()
        events.emit(f"{key}:end")
        state.mark(key, stats, t, time.time() - start, memory.usage())
        self.metrics.log(t, name, stats)
        return stats

    def fold_twins(self, t: int) -> None:
        if train.fold_twins_needed(self.ctx, t):
            for k in range(self.ctx.cfg.review.crossfit_folds):
                self.phase(t, f"crossfit_fold{k}", 6, lambda k=k: train.fold_twin(self.ctx, t, k))

    def run(self) -> str:
        ctx, cfg = self.ctx, self.ctx.cfg
        if not cfg.loop.skip_first_training:
            self.phase(1, "train", 0, lambda: train.first_pass(ctx))
        self.fold_twins(1)
        final = 1
        for t in range(2, cfg.loop.iterations + 1):
            self.phase(t, "review", 1, lambda: review.run(ctx, t))
            if review.converged(ctx, t):
                ctx.backend.print(f"[sera] converged at iteration {t}: kept set stable in two consecutive reviews "
                                  f"and mean kept IRM no longer rising; the final policy is iteration {t - 1}'s")
                ctx.state.data["converged_at"] = t
                break
            if train.target_share(ctx, t) > 0:  # share 0: SeRA-SS only
                if fluency.needed(ctx):  # once, before the first pairing: the floor from π0's own samples
                    self.phase(1, "fluency_floor", 7, lambda: fluency.run(ctx))
                self.phase(t, "generate", 2, lambda: generate.run(ctx, t))
                self.phase(t, "score_samples", 3, lambda: score.run(ctx, t))
                self.phase(t, "pair", 4, lambda: pair.run(ctx, t))
            self.phase(t, "train", 5, lambda: train.run(ctx, t))
            self.fold_twins(t)
            final = t
        ctx.state.data["final_policy"] = ctx.layout.policy(final)
        ctx.state.save()
        return ctx.layout.policy(final)


def logger_settings(args) -> LoggerSettings:
    lg = args.logger
    return LoggerSettings(wandb_key=lg.wandb.key, wandb_org=lg.wandb.org, wandb_project=lg.wandb.project,
                          wandb_group=lg.wandb.group, run_name=lg.wandb.run_name,
                          tensorboard_dir=lg.tensorboard_dir)


def eval_rows(args, spec: DataSpec):
    """--eval.dataset (split --eval.split), read like the training data; None without it."""
    if not args.eval.dataset:
        return None
    return load_offline(spec.for_eval(args.eval.dataset, args.eval.split)).rows


def check_shared_run_dir(root: str, writer: bool) -> None:
    """Global rank 0 writes the run directory and every rank reads it (checkpoints, samples, selections), so
    every node must see it: rank 0 writes a token file there and each rank looks for it. Raises one ConfigError,
    on every rank, naming the hosts that cannot see it."""
    import socket

    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    token = [os.urandom(8).hex() if writer else None]
    path = os.path.join(root, ".shared_fs_check")
    if writer:
        os.makedirs(root, exist_ok=True)
        with open(path, "w", encoding="ascii") as f:
            f.write(token[0])
    dist.broadcast_object_list(token, src=0)
    try:
        with open(path, encoding="ascii") as f:
            seen = f.read() == token[0]
    except OSError:
        seen = False
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, (seen, socket.gethostname(), dist.get_rank()))
    if writer:
        os.remove(path)
    blind = sorted({f"{host} (rank {rank})" for ok, host, rank in everyone if not ok})
    if blind:
        raise ConfigError(f"the run directory {root} (--sera.run_dir, default --ckpt.output_dir) is not visible from "
                          f"{', '.join(blind)}: every node reads the checkpoints and sets that global rank 0 "
                          "writes there, so it must be on a file system all nodes share (NFS, Lustre, ...)")


def run_sera(args, cfg: SeraConfig, daa_loss: DAALoss) -> str:
    """Entry point of `--sera.enable` (cfg already validated). Returns the final policy's directory."""
    from sera_openrlhf.openrlhf_adapter.backend import OpenRLHFBackend
    from sera_openrlhf.openrlhf_adapter.train import dump_args, setup_strategy

    layout = RunDir(os.path.abspath(cfg.loop.run_dir or args.ckpt.output_dir), args.model.model_name_or_path,
                    args.ref.model_name_or_path, cfg.loop.skip_first_training, cfg.loop.reference,
                    cfg.scoring.cache_dir)
    spec = DataSpec.from_args(args)
    offline = load_offline(spec)
    bootstraps = cfg.loop.iterations > 1 and cfg.loop.generated_share_max > 0
    prompts = load_prompts(spec, offline) if bootstraps else []
    strategy = setup_strategy(args)
    check_shared_run_dir(layout.root, strategy.is_rank_0())
    lock = RunLock(layout.lock) if strategy.is_rank_0() else None
    try:
        state = RunState(layout.state, dump_args(args), cfg.loop.force_resume, strategy.is_rank_0(),
                         inputs=content_sha256(spec))
        backend = OpenRLHFBackend(args, strategy, use_prompt_key=offline.use_prompt_key, cache_dir=layout.cache,
                                  daa_loss=daa_loss, eval_rows=eval_rows(args, spec))
        offline, prompts = drop_over_long(spec, offline, prompts, *backend.over_long(offline.rows, prompts),
                                          args.data.max_len)
        skipped = offline.info["prompt_too_long"]
        if sum(skipped["pairs"].values()) or sum(skipped["prompts"].values()):
            backend.print(f"[sera] skipped for a prompt longer than --data.max_len {args.data.max_len}: "
                          f"{skipped['pairs']} offline pairs, {skipped['prompts']} bootstrapping prompts")
        state.data["data"] = offline.info
        state.data["precision"] = getattr(args, "_sera_precision", None)  # --sera.precision's choice and probe
        state.save()
        ctx = RunContext(cfg, layout, state, backend, daa_loss, spec, offline.rows, offline.use_prompt_key,
                         prompts, args.train.seed, args.model.label_smoothing)
        try:
            final = Driver(ctx, PhaseMetrics(logger_settings(args), strategy.is_rank_0())).run()
        finally:
            backend.close()
        if strategy.is_rank_0():
            from sera_openrlhf.report import write_report

            report = write_report(layout.root)
            print(f"[sera] final policy: {final}", flush=True)
            print(f"[sera] report: {report}", flush=True)
        return final
    finally:
        if lock is not None:
            lock.release()
