"""The SeRA loop (design.md §1): iteration 1 trains the DAA on all offline pairs; each later iteration
self-reviews the offline pairs (SeRA-SS), bootstraps pairs from the current policy's samples (SeRA-PB), mixes
them by a growing generated share and trains again, until converged or `--sera.iterations`.

Every phase writes its outputs atomically and then marks itself done in `sera_state.json`; rerunning the same
command skips finished phases and redoes an interrupted one from its start. Each phase seeds its RNGs from
(seed, iteration, phase), so a resumed run makes the same choices as an uninterrupted one.

Run directory (`--sera.run_dir`, default `--ckpt.output_dir`):

    sera_state.json            config, finished phases, per-iteration statistics
    cache/                     reference log-probs (sera_openrlhf.refcache)
    iter_<t>/policy/           HF checkpoint of the policy trained in iteration t (+ train_log.jsonl)
    iter_<t>/fold_<k>/policy/  cross-fitted review policies (iteration 1, with --sera.crossfit_folds)
    iter_<t>/review.jsonl      per offline pair: id, IRM, implicit rewards, lengths, fold, kept, weight
    iter_<t>/kept.jsonl        the kept offline pairs in the input's keys (stock OpenRLHF can train on it)
    iter_<t>/samples.jsonl     every generated sample with its log-probs under each scoring model
    iter_<t>/bootstrapped.jsonl the bootstrapped pairs (prompt/chosen/rejected keys, margin)
    iter_<t>/train_set.jsonl   what iteration t trained on (offline kept + generated), with weights
    report/                    report.md, report.json, PNG plots (sera_openrlhf.report)
"""

from __future__ import annotations

import copy
import fcntl
import hashlib
import json
import os
import random
import time
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist

from sera_openrlhf import faults
from sera_openrlhf.bootstrap import (
    ensemble_rewards,
    ensemble_weights,
    fit_length_alpha,
    fluency_guard,
    make_pairs,
    pairing_mask,
)
from sera_openrlhf.data import PairRecord, load_pairs, write_pairs
from sera_openrlhf.errors import ConfigError, StateError
from sera_openrlhf.fileio import atomic_write_json, atomic_write_jsonl, read_jsonl
from sera_openrlhf.selection import (SelectionConfig, apply_selector, assign_folds, jaccard, review_signal,
                                     selection_stats)

STATE_FILE = "sera_state.json"
# flags that may change between a run and its resumption without changing what it computes
_RESUME_NEUTRAL = {"local_rank", "ckpt.load_enable", "sera.force_resume", "logger", "eval.steps", "use_ms"}


# ---------------------------------------------------------------------------------------------------- data


def load_offline_rows(args):
    """Offline pairs from --data.dataset (comma-separated files are concatenated).

    Returns (rows, use_prompt_key, info): rows are {id, prompt, chosen, rejected} dicts; use_prompt_key says
    whether prompts are separate (a prompt key or split HH dialogues) or part of the responses (stock semantics
    without --data.prompt_key); info counts what was loaded and skipped.
    """
    if args.data.dataset_probs:
        raise ConfigError("--data.dataset_probs (probability blending) is not supported with --sera.* flags; "
                          "concatenate the files instead")
    rows, info, split_prompts, records = [], {"files": [], "skipped": {}}, False, []
    for path in (p.strip() for p in args.data.dataset.split(",")):
        res = load_pairs(path, prompt_key=args.data.prompt_key, chosen_key=args.data.chosen_key,
                         rejected_key=args.data.rejected_key, max_samples=args.data.max_samples,
                         split=args.data.dataset_split, skip_invalid=args.sera.skip_invalid_pairs)
        split_prompts |= res.data_format == "hh"
        info["files"].append({"path": path, "n_pairs": len(res.records), "format": res.data_format})
        for reason, n in res.skipped.items():
            info["skipped"][reason] = info["skipped"].get(reason, 0) + n
        records.extend(res.records)
    seen = set()
    for r in records:
        if r.id in seen:
            raise ConfigError(f"pair id {r.id!r} ({r.source}) appears in more than one file of --data.dataset")
        seen.add(r.id)
        rows.append({"id": r.id, "prompt": r.prompt, "chosen": r.chosen, "rejected": r.rejected})
    info["n_pairs"] = len(rows)
    return rows, args.data.prompt_key is not None or split_prompts, info


def load_prompts(args, offline_rows, use_prompt_key: bool):
    """Bootstrapping prompts: --sera.prompts, else the offline pairs' distinct prompts. [{id, prompt}]"""
    if args.sera.prompts:
        key = args.data.prompt_key or "prompt"
        out = []
        with open(args.sera.prompts, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    prompt = row[key]
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise ConfigError(f"{args.sera.prompts} line {n}: expected a JSON object with key {key!r} "
                                      f"(--sera.prompts): {e}") from None
                out.append({"id": str(row.get("id", f"prompt-{n}")), "prompt": prompt})
        if not out:
            raise ConfigError(f"{args.sera.prompts}: no prompts (--sera.prompts)")
        return out
    if not use_prompt_key:
        raise ConfigError("bootstrapping needs prompts: set --data.prompt_key, use HH-format data, or give "
                          "--sera.prompts")
    seen, out = set(), []
    for r in offline_rows:
        key = json.dumps(r["prompt"])
        if key not in seen:
            seen.add(key)
            out.append({"id": "prompt-" + hashlib.sha1(key.encode()).hexdigest()[:12], "prompt": r["prompt"]})
    return out


# ---------------------------------------------------------------------------------------------------- state


def _flatten(d, prefix=""):
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def resume_config(config: dict) -> dict:
    """The part of the configuration a resumed run must share with the original."""
    return {k: v for k, v in _flatten(config).items()
            if not any(k == n or k.startswith(n + ".") for n in _RESUME_NEUTRAL)}


class RunState:
    """`sera_state.json`: the configuration, the finished phases and per-iteration statistics, checksummed."""

    def __init__(self, run_dir: str, config: dict, force: bool, writer: bool):
        self.path = os.path.join(run_dir, STATE_FILE)
        self.writer = writer
        if os.path.exists(self.path):
            self.data = self._read()
            old, new = resume_config(self.data["config"]), resume_config(config)
            diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            if diff and not force:
                shown = ", ".join(f"--{k} {old.get(k)!r} -> {new.get(k)!r}" for k in diff[:8])
                raise StateError(
                    f"{self.path}: this run directory was started with a different configuration ({shown}). "
                    "Use the original flags, another --sera.run_dir, or --sera.force_resume to continue anyway."
                )
            self.data["config"] = config
        else:
            self.data = {"version": 1, "config": config, "done": [], "iterations": {}, "final_policy": None}

    def _read(self) -> dict:
        try:
            with open(self.path, encoding="utf-8") as f:
                data = json.load(f)
            body = json.dumps({k: v for k, v in data.items() if k != "checksum"}, sort_keys=True)
            ok = data.get("checksum") == hashlib.sha256(body.encode()).hexdigest()
        except (OSError, json.JSONDecodeError, AttributeError) as e:
            raise StateError(f"{self.path} is unreadable ({e}); move it away to start the run afresh") from None
        if not ok:
            raise StateError(f"{self.path} fails its checksum (edited or corrupted); restore it or move it away "
                             "to start the run afresh")
        return data

    def save(self) -> None:
        if not self.writer:
            return
        self.data.pop("checksum", None)
        body = json.dumps(self.data, sort_keys=True)
        atomic_write_json(self.path, {**self.data, "checksum": hashlib.sha256(body.encode()).hexdigest()})

    def done(self, phase: str) -> bool:
        return phase in self.data["done"]

    def mark(self, phase: str, stats: dict | None = None, iteration: int | None = None) -> None:
        if stats is not None:
            self.data["iterations"].setdefault(str(iteration), {})[phase.split("/")[-1]] = stats
        if phase not in self.data["done"]:
            self.data["done"].append(phase)
        self.save()

    def stats(self, t: int) -> dict:
        return self.data["iterations"].get(str(t), {})


class RunLock:
    """An exclusive flock on <run_dir>/.lock: a second run on the same directory refuses to start. The kernel
    releases it when the process dies, even by SIGKILL, so a killed run never leaves a stale lock."""

    def __init__(self, run_dir: str):
        os.makedirs(run_dir, exist_ok=True)
        self.path = os.path.join(run_dir, ".lock")
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            raise StateError(f"{run_dir} is in use by another SeRA run (lock {self.path}); wait for it to finish "
                             "or use another --sera.run_dir") from None
        os.ftruncate(self.fd, 0)
        os.write(self.fd, f"{os.getpid()}\n".encode())

    def release(self):
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


# ---------------------------------------------------------------------------------------------------- loop


def _seed(args, t: int, phase: int) -> int:
    return args.train.seed * 1000 + t * 10 + phase


def _set_seed(seed: int) -> None:
    import transformers

    transformers.set_seed(seed)


def _barrier():
    if dist.is_initialized():
        dist.barrier()


def as_response(prompt, text: str):
    """A generated response in the prompt's form: text, or a one-message list for chat-format data."""
    return [{"role": "assistant", "content": text}] if isinstance(prompt, list) else text


def generated_share(args, t: int) -> float:
    """Linear schedule: 0 at iteration 1, --sera.generated_share_max at the last iteration."""
    T = args.sera.iterations
    return 0.0 if T <= 1 else args.sera.generated_share_max * (t - 1) / (T - 1)


def validate_sera_args(args) -> None:
    s = args.sera
    if s.iterations < 1:
        raise ConfigError(f"--sera.iterations must be >= 1, got {s.iterations}")
    if not 0.0 <= s.generated_share_max < 1.0:
        raise ConfigError(f"--sera.generated_share_max must be in [0, 1), got {s.generated_share_max}")
    if s.crossfit_folds < 0 or s.crossfit_folds == 1:
        raise ConfigError(f"--sera.crossfit_folds must be 0 (off) or >= 2, got {s.crossfit_folds}")
    if s.num_prompts < 0:
        raise ConfigError(f"--sera.num_prompts must be >= 0 (0 = all), got {s.num_prompts}")
    if not 0.0 <= s.converge_jaccard <= 1.0:
        raise ConfigError(f"--sera.converge_jaccard must be in [0, 1], got {s.converge_jaccard}")
    if s.bootstrap_nll_coef < 0:
        raise ConfigError(f"--sera.bootstrap_nll_coef must be >= 0, got {s.bootstrap_nll_coef}")
    if not 0.0 <= s.review_min_agreement <= 1.0:
        raise ConfigError(f"--sera.review_min_agreement must be in [0, 1], got {s.review_min_agreement}")
    if s.review_policy == "first_pass" and s.skip_first_training:
        raise ConfigError("--sera.review_policy first_pass needs a first training pass; drop "
                          "--sera.skip_first_training")
    selection_config(args)
    from sera_openrlhf.selection import SELECTORS

    # resolve the selector now: a typo should not cost a whole first training pass
    if not callable(SELECTORS.get(s.selector, flag="--sera.selector")):
        raise ConfigError(f"--sera.selector {s.selector} is not callable")


def selection_config(args) -> SelectionConfig:
    s = args.sera
    return SelectionConfig(mode=s.select_mode, keep_ratio=s.keep_ratio, threshold=s.threshold,
                           direction=s.select_direction, drop_negative=s.drop_negative_irm, min_keep=s.min_keep)


@dataclass
class Loop:
    args: object
    strategy: object
    state: RunState
    run_dir: str
    rows: list
    use_prompt_key: bool
    prompts: list
    daa_loss: object
    _wandb_run: object = None

    # -- paths ------------------------------------------------------------------------------------------------
    def iter_dir(self, t: int) -> str:
        return os.path.join(self.run_dir, f"iter_{t}")

    def policy(self, t: int) -> str:
        """π_t: t = 0 is the initial model; with --sera.skip_first_training π_1 is the initial model too."""
        if t == 0 or (t == 1 and self.args.sera.skip_first_training):
            return self.args.model.model_name_or_path
        return os.path.join(self.iter_dir(t), "policy")

    def reference(self, t: int) -> str:
        """The reference π_t is trained (and its implicit reward measured) against."""
        if self.args.sera.reference == "previous" and t >= 2:
            return self.policy(t - 1)
        return self.args.ref.model_name_or_path

    @property
    def cache_dir(self) -> str:
        return self.args.sera.cache_dir or os.path.join(self.run_dir, "cache")

    @property
    def is_writer(self) -> bool:
        return self.strategy.is_rank_0()

    # -- phases -----------------------------------------------------------------------------------------------
    def phase(self, t: int, name: str, index: int, fn):
        """Run `fn()` unless (t, name) is done; fn returns stats, stored in the state file with the phase."""
        key = f"iter{t}/{name}"
        if self.state.done(key):
            return self.state.stats(t).get(name)
        _set_seed(_seed(self.args, t, index))
        self.strategy.print(f"[sera] iteration {t}: {name}")
        faults.current_phase = key
        faults.kill_point(f"{key}:start")
        start = time.time()
        stats = fn()
        _barrier()
        faults.kill_point(f"{key}:end")
        self.state.data.setdefault("seconds", {})[key] = round(time.time() - start, 1)
        self.state.mark(key, stats, t)
        self.log_metrics(t, name, stats)
        return stats

    def log_metrics(self, t: int, phase: str, stats) -> None:
        """Numeric phase statistics through OpenRLHF's logger settings: wandb if --logger.wandb.key is set,
        else TensorBoard under --logger.tensorboard_dir/<run_name>_sera, with the iteration as the step."""
        lg = self.args.logger
        if not self.is_writer or not isinstance(stats, dict) or not (lg.wandb.key or lg.tensorboard_dir):
            return
        flat = {f"sera/{phase}/{k}": float(v) for k, v in _flatten(stats).items()
                if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if lg.wandb.key:
            import wandb

            if self._wandb_run is None:
                self._wandb_run = wandb.init(entity=lg.wandb.org, project=lg.wandb.project, group=lg.wandb.group,
                                             name=f"{lg.wandb.run_name}_sera", reinit=True)
            self._wandb_run.log({**flat, "sera/iteration": t})
        else:
            from torch.utils.tensorboard import SummaryWriter

            with SummaryWriter(log_dir=os.path.join(lg.tensorboard_dir, f"{lg.wandb.run_name}_sera")) as w:
                for k, v in flat.items():
                    w.add_scalar(k, v, t)

    def train(self, t: int, rows, output_dir: str, policy_path: str) -> dict:
        from sera_openrlhf.openrlhf_adapter.train import train_policy

        args = copy.deepcopy(self.args)  # the trainer rewrites eval/save steps in place
        args.logger.wandb.run_name = f"{self.args.logger.wandb.run_name}_iter{t}"
        return train_policy(
            args, self.strategy, policy_path=policy_path, ref_path=self.reference(t), rows=rows,
            output_dir=output_dir, daa_loss=self.daa_loss, use_prompt_key=self.use_prompt_key,
            use_ref_cache=self.args.sera.ref_cache != "off", cache_dir=self.cache_dir,
        )

    def write_rows(self, path: str, rows) -> None:
        if self.is_writer:
            atomic_write_jsonl(path, rows)

    # iteration 1 ----------------------------------------------------------------------------------------------
    def first_pass(self) -> None:
        t = 1
        if not self.args.sera.skip_first_training:
            def train():
                self.write_rows(os.path.join(self.iter_dir(t), "train_set.jsonl"), self.rows)
                stats = self.train(t, self.rows, self.policy(t), self.policy(0))
                return {**stats, "n_offline": len(self.rows), "n_generated": 0, "generated_share": 0.0}

            self.phase(t, "train", 0, train)
        for k in range(self.args.sera.crossfit_folds):
            def train_fold(k=k):
                folds = self.folds()
                rows = [r for r, f in zip(self.rows, folds) if f != k]
                return self.train(t, rows, self.fold_policy(k), self.policy(0))

            self.phase(t, f"crossfit_fold{k}", 1 + k, train_fold)

    def folds(self):
        return assign_folds([r["id"] for r in self.rows], self.args.sera.crossfit_folds, self.args.train.seed)

    def fold_policy(self, k: int) -> str:
        return os.path.join(self.iter_dir(1), f"fold_{k}", "policy")

    # SeRA-SS ----------------------------------------------------------------------------------------------------
    def score_offline(self, policy_path: str, ref_path: str, rows):
        """Implicit rewards of every offline pair under (policy, its reference). Returns a dict of [N] tensors
        aligned with the dataset's rows plus the dataset's ids."""
        from sera_openrlhf.openrlhf_adapter.train import CachedReference, ScoringModel, build_dataset, score_dataset

        scorer = ScoringModel.load(self.args, self.strategy, policy_path)
        tokenizer = scorer.tokenizer
        dataset = build_dataset(self.args, tokenizer, rows, self.use_prompt_key)
        chosen, rejected = score_dataset(self.args, scorer.logprob_fn, dataset, tokenizer.pad_token_id,
                                         desc="self-review: policy log-probs")
        scorer.free()
        ref_c = ref_r = None
        if self.daa_loss.needs_reference:
            ref = CachedReference(self.args, self.strategy, ref_path, self.cache_dir, [dataset],
                                  tokenizer.pad_token_id)
            ref_c, ref_r = ref(dataset, torch.arange(len(dataset)))
        lens_c, lens_r = chosen.num_tokens.double(), rejected.num_tokens.double()
        r_c = self.daa_loss.implicit_reward(chosen.logp_sum, ref_c, lens_c).double()
        r_r = self.daa_loss.implicit_reward(rejected.logp_sum, ref_r, lens_r).double()
        return {"ids": dataset.ids, "too_long": dataset.too_long_ids, "chosen_reward": r_c,
                "rejected_reward": r_r, "chosen_len": lens_c, "rejected_len": lens_r}

    def review(self, t: int) -> dict:
        s = self.args.sera
        if s.crossfit_folds >= 2:
            folds = self.folds()
            parts = []
            for k in range(s.crossfit_folds):
                rows_k = [r for r, f in zip(self.rows, folds) if f == k]
                parts.append(self.score_offline(self.fold_policy(k), self.reference(1), rows_k))
            scores = {key: (sum((p[key] for p in parts), []) if isinstance(parts[0][key], list)
                            else torch.cat([p[key] for p in parts])) for key in parts[0]}
            fold_of = dict(zip((r["id"] for r in self.rows), folds))
        else:
            src = 1 if s.review_policy == "first_pass" else t - 1
            scores = self.score_offline(self.policy(src), self.reference(src), self.rows)
            fold_of = {}
        ids = scores["ids"]
        irm = scores["chosen_reward"] - scores["rejected_reward"]
        table = {"id": ids, "irm": irm, **{k: scores[k] for k in
                                          ("chosen_reward", "rejected_reward", "chosen_len", "rejected_len")}}
        prev = [self.read_review(u) for u in range(2, t)]
        table["irm_prev"] = [torch.tensor([p.get(i, float("nan")) for i in ids], dtype=torch.float64)
                             for p in prev]
        selector, config = s.selector, selection_config(self.args)
        signal = review_signal(irm, out_of_fold=bool(fold_of))
        signal["action"] = "select"
        if signal["lower_bound"] is not None and signal["lower_bound"] < s.review_min_agreement:
            keep_all = s.no_signal == "keep_all"
            signal["action"] = "keep_all" if keep_all else "warned"
            advice = ("Keeping every offline pair (--sera.no_signal keep_all)." if keep_all else
                      "Train the review policies longer or on more data, or pass --sera.no_signal keep_all to keep "
                      "every pair when this happens.")
            self.strategy.print(
                f"[sera] warning: self-review has no signal at iteration {t}: the out-of-fold implicit reward "
                f"agrees with {signal['label_agreement']:.1%} of {signal['n']} labels (95 % lower bound "
                f"{signal['lower_bound']:.1%} < --sera.review_min_agreement {s.review_min_agreement:.0%}), hardly "
                f"better than chance, so selecting by IRM is close to random subsampling. {advice}")
            if keep_all:
                selector, config = "top", replace(config, mode="top", keep_ratio=1.0, drop_negative=False)
        result = apply_selector(selector, table, config)
        prev_kept = self.kept_ids(t - 1) if t >= 3 else None
        stats = selection_stats(table, result, previous_kept_ids=prev_kept)
        stats["signal"] = signal
        stats["n_prompt_too_long"] = len(scores["too_long"])
        by_id = {r["id"]: r for r in self.rows}
        review_rows = [
            {"id": i, "irm": float(irm[n]), "chosen_reward": float(scores["chosen_reward"][n]),
             "rejected_reward": float(scores["rejected_reward"][n]), "chosen_len": int(scores["chosen_len"][n]),
             "rejected_len": int(scores["rejected_len"][n]), "fold": fold_of.get(i),
             "kept": bool(result.kept_mask[n]), "weight": float(result.weights[n])}
            for n, i in enumerate(ids)
        ]
        self.write_rows(os.path.join(self.iter_dir(t), "review.jsonl"), review_rows)
        if self.is_writer:
            kept = [PairRecord(id=i, prompt=by_id[i]["prompt"], chosen=by_id[i]["chosen"],
                               rejected=by_id[i]["rejected"]) for i in result.kept_ids]
            write_pairs(os.path.join(self.iter_dir(t), "kept.jsonl"), kept,
                        self.args.data.prompt_key if self.use_prompt_key else None,
                        self.args.data.chosen_key, self.args.data.rejected_key)
        return stats

    def read_review(self, t: int) -> dict:
        return {r["id"]: r["irm"] for r in read_jsonl(os.path.join(self.iter_dir(t), "review.jsonl"))}

    def kept_ids(self, t: int) -> list:
        return [r["id"] for r in read_jsonl(os.path.join(self.iter_dir(t), "review.jsonl")) if r["kept"]]

    def converged(self, t: int) -> bool:
        if t < 3:
            return False
        now, before = self.state.stats(t)["review"], self.state.stats(t - 1)["review"]
        gain = (now["mean_irm_kept"] or 0.0) - (before["mean_irm_kept"] or 0.0)
        return (now["jaccard_previous"] is not None and now["jaccard_previous"] >= self.args.sera.converge_jaccard
                and gain < self.args.sera.converge_min_gain)

    # SeRA-PB ----------------------------------------------------------------------------------------------------
    def iteration_prompts(self, t: int):
        n = self.args.sera.num_prompts
        if n == 0 or n >= len(self.prompts):
            return self.prompts
        rng = random.Random(_seed(self.args, t, 9))
        return rng.sample(self.prompts, n)

    def generate(self, t: int) -> dict:
        from sera_openrlhf.openrlhf_adapter.generate import generate_samples

        prompts = self.iteration_prompts(t)
        samples = generate_samples(self.args, self.strategy, self.policy(t - 1), [p["prompt"] for p in prompts],
                                   seed=_seed(self.args, t, 2))
        rows = [{"prompt_id": p["id"], "prompt": p["prompt"], "sample_index": smp.sample_index, "text": smp.text,
                 "truncated": smp.truncated, "n_generated_tokens": len(smp.token_ids)}
                for p, group in zip(prompts, samples) for smp in group]
        self.write_rows(os.path.join(self.iter_dir(t), "samples.jsonl"), rows)
        n = len(rows)
        return {"n_prompts": len(prompts), "n_samples": n,
                "truncated_share": sum(r["truncated"] for r in rows) / max(n, 1),
                "mean_generated_tokens": sum(r["n_generated_tokens"] for r in rows) / max(n, 1)}

    def ensemble_members(self, t: int) -> list:
        """Indices of the trained policies π_1..π_{t-1} whose implicit rewards are ensembled, oldest first."""
        s = self.args.sera
        w = ensemble_weights(t - 1, s.ensemble_mode, s.ensemble_k, s.ensemble_lambda, s.ensemble_decay)
        return list(range(t - len(w), t)), w

    def score_samples(self, t: int) -> dict:
        from sera_openrlhf.openrlhf_adapter.train import ScoringModel, scoring_shard, build_dataset
        from sera_openrlhf.scoring import score_sequences

        path = os.path.join(self.iter_dir(t), "samples.jsonl")
        rows = read_jsonl(path)
        members, _ = self.ensemble_members(t)
        models = {f"pi{k}": self.policy(k) for k in members}
        for k in members:
            models[f"ref{k}"] = self.reference(k)
        models["init"] = self.args.ref.model_name_or_path
        # a directory scored once even when it plays several roles (π_1 is π_2's reference, ...)
        by_path = {}
        for tag, p in models.items():
            by_path.setdefault(os.path.abspath(p), []).append(tag)
        pair_rows = [{"id": f"s{n}", "prompt": r["prompt"], "chosen": as_response(r["prompt"], r["text"]),
                      "rejected": as_response(r["prompt"], r["text"])} for n, r in enumerate(rows)]
        for p, tags in by_path.items():
            scorer = ScoringModel.load(self.args, self.strategy, p)
            dataset = build_dataset(self.args, scorer.tokenizer, pair_rows, True)
            if dataset.too_long_ids:
                raise ConfigError(f"{len(dataset.too_long_ids)} bootstrapping prompts are longer than "
                                  f"--data.max_len {self.args.data.max_len}; raise it or shorten --sera.prompts")
            rank, world = scoring_shard(self.args)
            res = score_sequences(  # each sample once: the chosen side of its (text, text) row
                scorer.logprob_fn, [dataset.pair_tokens(i)[0::2] for i in range(len(dataset))],
                scorer.tokenizer.pad_token_id, max_tokens_per_batch=self.args.sera.score_tokens_per_batch,
                max_batch_size=self.args.sera.score_batch_size, desc=f"score samples ({', '.join(tags)})",
                rank=rank, world_size=world,
            )
            scorer.free()
            for n, r in enumerate(rows):
                r.setdefault("logp", {}).update({tag: float(res.logp_sum[n]) for tag in tags})
                r["n_tokens"] = int(res.num_tokens[n])
        self.write_rows(path, rows)
        return {"scored_under": sorted(models)}

    def pair(self, t: int) -> dict:
        s = self.args.sera
        rows = read_jsonl(os.path.join(self.iter_dir(t), "samples.jsonl"))
        S = s.num_samples
        P = len(rows) // S
        grid = lambda key: torch.tensor([r[key] for r in rows], dtype=torch.float64).view(P, S)  # noqa: E731
        lengths = grid("n_tokens")
        members, weights = self.ensemble_members(t)
        rewards = []
        for k in members:
            pi = torch.tensor([r["logp"][f"pi{k}"] for r in rows], dtype=torch.float64).view(P, S)
            ref = torch.tensor([r["logp"][f"ref{k}"] for r in rows], dtype=torch.float64).view(P, S)
            r_k = self.daa_loss.implicit_reward(pi.flatten(), ref.flatten(), lengths.flatten()).view(P, S)
            rewards.append(r_k / lengths if s.length_normalized_reward else r_k)
        reward = ensemble_rewards(torch.stack(rewards), weights)
        texts = [[rows[p * S + j]["text"] for j in range(S)] for p in range(P)]
        truncated = torch.tensor([r["truncated"] for r in rows], dtype=torch.bool).view(P, S)
        init_mean = torch.tensor([r["logp"]["init"] for r in rows], dtype=torch.float64).view(P, S) / lengths
        if s.no_fluency_guard:
            valid, guard = torch.ones(P, S, dtype=torch.bool), {"off": True}
        else:
            valid, guard = fluency_guard(init_mean, texts, s.fluency_floor, s.fluency_quantile)
        alpha = 0.0
        if s.length_debias:
            alpha = fit_length_alpha(reward, lengths, pairing_mask(valid, texts, truncated, not s.keep_truncated))
        pairs, pstats = make_pairs(reward, lengths, valid, texts, truncated, min_margin=s.min_margin, alpha=alpha,
                                   drop_truncated=not s.keep_truncated, top_fraction=s.pair_top_fraction)
        out = []
        for bp in sorted(pairs, key=lambda b: -b.margin):
            c, r = rows[bp.prompt_index * S + bp.chosen_index], rows[bp.prompt_index * S + bp.rejected_index]
            out.append({"id": f"boot{t}-{c['prompt_id']}", "prompt": c["prompt"],
                        "chosen": as_response(c["prompt"], c["text"]),
                        "rejected": as_response(r["prompt"], r["text"]), "margin": bp.margin,
                        "debiased_margin": bp.debiased_margin,
                        "chosen_len": c["n_tokens"], "rejected_len": r["n_tokens"]})
        self.write_rows(os.path.join(self.iter_dir(t), "bootstrapped.jsonl"), out)
        margins = [o["margin"] for o in out]
        return {**pstats, "guard": guard, "alpha": alpha, "ensemble": {"policies": members, "weights": weights},
                "n_pairs": len(out), "margins": margins,
                "mean_len_chosen": sum(o["chosen_len"] for o in out) / max(len(out), 1),
                "mean_len_rejected": sum(o["rejected_len"] for o in out) / max(len(out), 1)}

    def train_mix(self, t: int) -> dict:
        review = read_jsonl(os.path.join(self.iter_dir(t), "review.jsonl"))
        weights = {r["id"]: r["weight"] for r in review if r["weight"] > 0}
        offline = [{**r, "weight": weights[r["id"]]} for r in self.rows if r["id"] in weights]
        boot_path = os.path.join(self.iter_dir(t), "bootstrapped.jsonl")
        boot = read_jsonl(boot_path) if os.path.exists(boot_path) else []  # sorted by margin
        share = generated_share(self.args, t)
        n_gen = min(len(boot), round(share / (1 - share) * len(offline)))
        generated = [{"id": b["id"], "prompt": b["prompt"], "chosen": b["chosen"], "rejected": b["rejected"],
                      "weight": 1.0, "nll_coef": self.args.sera.bootstrap_nll_coef} for b in boot[:n_gen]]
        rows = offline + generated
        self.write_rows(os.path.join(self.iter_dir(t), "train_set.jsonl"), rows)
        stats = self.train(t, rows, self.policy(t), self.policy(t - 1))
        return {**stats, "n_offline": len(offline), "n_generated": len(generated),
                "generated_share": len(generated) / max(len(rows), 1), "generated_share_target": share}

    # driver -------------------------------------------------------------------------------------------------
    def run(self) -> str:
        self.first_pass()
        final = 1
        for t in range(2, self.args.sera.iterations + 1):
            self.phase(t, "review", 1, lambda: self.review(t))
            if self.converged(t):
                self.strategy.print(f"[sera] converged at iteration {t}: kept set stable and mean kept IRM no "
                                    f"longer rising; the final policy is iteration {t - 1}'s")
                self.state.data["converged_at"] = t
                break
            if generated_share(self.args, t) > 0:  # share 0 (e.g. --sera.generated_share_max 0): SeRA-SS only
                self.phase(t, "generate", 2, lambda: self.generate(t))
                self.phase(t, "score_samples", 3, lambda: self.score_samples(t))
                self.phase(t, "pair", 4, lambda: self.pair(t))
            self.phase(t, "train", 5, lambda: self.train_mix(t))
            final = t
        self.state.data["final_policy"] = self.policy(final)
        self.state.save()
        return self.policy(final)


def sera_config(args) -> dict:
    from sera_openrlhf.openrlhf_adapter.train import dump_args

    return dump_args(args)


def run_sera(args) -> str:
    """Entry point of `--sera.enable`. Returns the final policy's directory."""
    from sera_openrlhf.openrlhf_adapter.train import loss_from_args, setup_strategy

    validate_sera_args(args)
    run_dir = os.path.abspath(args.sera.run_dir or args.ckpt.output_dir)
    daa_loss = loss_from_args(args)
    rows, use_prompt_key, info = load_offline_rows(args)
    prompts = load_prompts(args, rows, use_prompt_key) if args.sera.iterations > 1 else []
    strategy = setup_strategy(args)
    lock = RunLock(run_dir) if strategy.is_rank_0() else None
    try:
        state = RunState(run_dir, sera_config(args), args.sera.force_resume, strategy.is_rank_0())
        state.data["data"] = info
        state.save()
        loop = Loop(args, strategy, state, run_dir, rows, use_prompt_key, prompts, daa_loss)
        final = loop.run()
        if strategy.is_rank_0():
            from sera_openrlhf.report import write_report

            report = write_report(run_dir)
            print(f"[sera] final policy: {final}", flush=True)
            print(f"[sera] report: {report}", flush=True)
        return final
    finally:
        if lock is not None:
            lock.release()
