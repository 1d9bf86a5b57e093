"""The run's inputs: offline pairs from --data.dataset and bootstrapping prompts (--sera.prompts, else the
offline pairs' distinct prompts), described by a `DataSpec` built from the stock `--data.*` flags."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

from sera_openrlhf.data import load_pairs
from sera_openrlhf.errors import ConfigError
from sera_openrlhf.fileio import sha256_file


@dataclass
class DataSpec:
    dataset: str  # --data.dataset: comma-separated files/dirs, concatenated
    prompt_key: str | None
    chosen_key: str
    rejected_key: str
    max_samples: int | None
    split: str  # --data.dataset_split
    skip_invalid: bool  # --sera.skip_invalid_pairs
    prompts: str | None  # --sera.prompts

    @classmethod
    def from_args(cls, args) -> "DataSpec":
        if args.data.dataset_probs:
            raise ConfigError("--data.dataset_probs (probability blending) is not supported with --sera.* flags; "
                              "concatenate the files instead")
        return cls(dataset=args.data.dataset, prompt_key=args.data.prompt_key, chosen_key=args.data.chosen_key,
                   rejected_key=args.data.rejected_key, max_samples=args.data.max_samples,
                   split=args.data.dataset_split, skip_invalid=args.sera.skip_invalid_pairs,
                   prompts=args.sera.prompts)


@dataclass
class OfflineData:
    rows: list  # {id, prompt, chosen, rejected}
    use_prompt_key: bool  # prompts separate from responses (a prompt key or split HH dialogues)
    info: dict  # files loaded, counts skipped
    file_of: dict  # pair id -> the --data.dataset entry it came from


def load_offline(spec: DataSpec) -> OfflineData:
    info, split_prompts, records, file_of = {"files": [], "skipped": {}}, False, [], {}
    for path in (p.strip() for p in spec.dataset.split(",")):
        res = load_pairs(path, prompt_key=spec.prompt_key, chosen_key=spec.chosen_key,
                         rejected_key=spec.rejected_key, max_samples=spec.max_samples, split=spec.split,
                         skip_invalid=spec.skip_invalid)
        split_prompts |= res.data_format == "hh"
        info["files"].append({"path": path, "n_pairs": len(res.records), "format": res.data_format})
        for reason, n in res.skipped.items():
            info["skipped"][reason] = info["skipped"].get(reason, 0) + n
        records.extend(res.records)
        file_of.update((r.id, path) for r in res.records)
    seen, rows = set(), []
    for r in records:
        if r.id in seen:
            raise ConfigError(f"pair id {r.id!r} ({r.source}) appears in more than one file of --data.dataset")
        seen.add(r.id)
        rows.append({"id": r.id, "prompt": r.prompt, "chosen": r.chosen, "rejected": r.rejected})
    info["n_pairs"] = len(rows)
    return OfflineData(rows, spec.prompt_key is not None or split_prompts, info, file_of)


def load_prompts(spec: DataSpec, offline: OfflineData) -> list:
    """Bootstrapping prompts: [{id, prompt}]."""
    if spec.prompts:
        key = spec.prompt_key or "prompt"
        out = []
        with open(spec.prompts, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    prompt = row[key]
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise ConfigError(f"{spec.prompts} line {n}: expected a JSON object with key {key!r} "
                                      f"(--sera.prompts): {e}") from None
                out.append({"id": str(row.get("id", f"prompt-{n}")), "prompt": prompt})
        if not out:
            raise ConfigError(f"{spec.prompts}: no prompts (--sera.prompts)")
        return out
    if not offline.use_prompt_key:
        raise ConfigError("bootstrapping needs prompts: set --data.prompt_key, use HH-format data, or give "
                          "--sera.prompts")
    seen, out = set(), []
    for r in offline.rows:
        key = json.dumps(r["prompt"])
        if key not in seen:
            seen.add(key)
            out.append({"id": "prompt-" + hashlib.sha1(key.encode()).hexdigest()[:12], "prompt": r["prompt"]})
    return out


def drop_over_long(spec: DataSpec, offline: OfflineData, prompts: list, long_pairs: set, long_prompts: set,
                   max_len: int) -> tuple[OfflineData, list]:
    """Skip (and count, per source) the pairs and prompts that do not fit --data.max_len, before anything is
    generated or trained, as OpenRLHF's own dataset skips them; an error only when nothing is left."""
    per_file = {}
    for i in long_pairs:
        per_file[offline.file_of[i]] = per_file.get(offline.file_of[i], 0) + 1
    rows = [r for r in offline.rows if r["id"] not in long_pairs]
    prompt_source = spec.prompts or f"the prompts of {spec.dataset}"
    if long_pairs and not rows:
        raise ConfigError(f"every one of the {len(offline.rows)} pairs of {spec.dataset} has a prompt longer than "
                          f"--data.max_len {max_len}: raise --data.max_len")
    kept_prompts = [p for p in prompts if p["id"] not in long_prompts]
    if prompts and not kept_prompts:
        flag = "--sera.prompts" if spec.prompts else "--data.dataset"
        raise ConfigError(f"every one of the {len(prompts)} bootstrapping prompts ({prompt_source}, {flag}) is "
                          f"longer than --data.max_len {max_len}: raise --data.max_len")
    info = {**offline.info, "n_pairs": len(rows),
            "prompt_too_long": {"pairs": per_file, "prompts": {prompt_source: len(long_prompts)} if prompts else {}},
            "n_prompts": len(kept_prompts)}
    return OfflineData(rows, offline.use_prompt_key, info, offline.file_of), kept_prompts


def content_sha256(spec: DataSpec) -> dict:
    """sha256 of every local input file (--data.dataset entries, --sera.prompts): a resumed run must read the
    same bytes. Hub names and directories are skipped."""
    paths = [p.strip() for p in spec.dataset.split(",")] + ([spec.prompts] if spec.prompts else [])
    return {p: sha256_file(p) for p in paths if os.path.isfile(p)}
