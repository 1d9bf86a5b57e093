"""The run's inputs: offline pairs from --data.dataset, bootstrapping prompts (--sera.prompts, else the offline
pairs' distinct prompts), described by a `DataSpec` built from the stock `--data.*` flags, and model names
resolved the way transformers resolves them (`resolve_model`).

Datasets are read as stock `openrlhf.cli.train_dpo` reads them: every comma-separated entry of --data.dataset is
loaded by OpenRLHF's own `blending_datasets` (Hub names, data directories, csv/arrow files, `name@data_dir`; split
--data.dataset_split, at most --data.max_samples rows), except local JSONL/JSON/parquet files and `save_to_disk`
directories, which `data.load_pairs` reads with the same rows and errors located by line. The entries are then
concatenated, or interleaved with --data.dataset_probs exactly as `blending_datasets` interleaves them
(`datasets.interleave_datasets`, seed --train.seed, "all_exhausted"), and cut to --data.max_samples rows.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, replace
from types import SimpleNamespace

from sera_openrlhf.data import LoadResult, derive_prompt, load_pairs, open_rows, parse_pairs, reads_locally
from sera_openrlhf.errors import ConfigError, DataError
from sera_openrlhf.fileio import sha256_file


@dataclass
class DataSpec:
    dataset: str  # --data.dataset: comma-separated Hub names, files, dirs
    probs: str | None  # --data.dataset_probs: interleave the entries with these probabilities (None: concatenate)
    seed: int  # --train.seed: the interleaving seed, as stock
    prompt_key: str | None
    chosen_key: str
    rejected_key: str
    max_samples: int | None  # --data.max_samples: rows per entry and in all (None: every row, as stock's eval)
    split: str  # --data.dataset_split
    use_ms: bool  # --use_ms: Hub names from ModelScope (OpenRLHF's loader)
    skip_invalid: bool  # --sera.skip_invalid_pairs
    prompts: str | None  # --sera.prompts
    flag: str  # where `dataset` came from, for errors: --data.dataset or --eval.dataset

    @classmethod
    def from_args(cls, args) -> "DataSpec":
        spec = cls(dataset=args.data.dataset, probs=args.data.dataset_probs, seed=args.train.seed,
                   prompt_key=args.data.prompt_key, chosen_key=args.data.chosen_key,
                   rejected_key=args.data.rejected_key, max_samples=args.data.max_samples,
                   split=args.data.dataset_split, use_ms=getattr(args, "use_ms", False),
                   skip_invalid=args.sera.skip_invalid_pairs, prompts=args.sera.prompts, flag="--data.dataset")
        if spec.dataset:
            mixture_probs(spec)  # a wrong --data.dataset_probs fails before anything loads
        return spec

    def for_eval(self, dataset: str, split: str) -> "DataSpec":
        """--eval.dataset as stock reads it: split --eval.split, concatenated (no probabilities), every row."""
        return replace(self, dataset=dataset, split=split, probs=None, max_samples=None, prompts=None,
                       flag="--eval.dataset")


@dataclass
class OfflineData:
    rows: list  # {id, prompt, chosen, rejected}
    use_prompt_key: bool  # prompts separate from responses (a prompt key, split HH dialogues or conversations)
    info: dict  # files loaded, counts skipped
    file_of: dict  # pair id -> the --data.dataset entry it came from (a Hub dataset's name)


def entries(dataset: str) -> list[str]:
    return [p.strip() for p in dataset.split(",")]


def mixture_probs(spec: DataSpec) -> list[float] | None:
    if spec.probs is None:
        return None
    names = entries(spec.dataset)
    try:
        probs = [float(p) for p in spec.probs.split(",")]
    except ValueError:
        raise ConfigError(f"--data.dataset_probs {spec.probs}: expected comma-separated numbers") from None
    if len(probs) != len(names):
        raise ConfigError(f"--data.dataset_probs has {len(probs)} values for {len(names)} {spec.flag} entries")
    if any(p < 0 for p in probs) or abs(sum(probs) - 1) > 1e-8:  # numpy's tolerance in interleave_datasets
        raise ConfigError(f"--data.dataset_probs {spec.probs}: probabilities must be >= 0 and sum to 1")
    return probs


def load_offline(spec: DataSpec) -> OfflineData:
    names = entries(spec.dataset)
    probs = mixture_probs(spec)
    results = [load_entry(name, spec) for name in names]

    # (entry, row ordinal) in stock order, then stock's final cut to --data.max_samples rows
    if probs is None:
        order = [(i, k) for i, res in enumerate(results) for k in range(res.n_rows)]
    else:
        from datasets import Dataset, interleave_datasets

        parts = [Dataset.from_dict({"entry": [i] * res.n_rows, "row": list(range(res.n_rows))})
                 for i, res in enumerate(results)]
        mixed = interleave_datasets(parts, probabilities=probs, seed=spec.seed, stopping_strategy="all_exhausted")
        order = list(zip(mixed["entry"], mixed["row"]))
    if spec.max_samples is not None:
        order = order[: spec.max_samples]

    by_row = [dict(zip(res.ordinals, res.records)) for res in results]
    owner, uses, rows, file_of = {}, {}, [], {}
    n_from = [0] * len(results)
    for i, k in order:
        r = by_row[i].get(k)
        if r is None:  # skipped while loading (counted there)
            continue
        if owner.setdefault(r.id, (i, k)) != (i, k):  # within one entry, load_pairs/parse_pairs refuse it
            raise ConfigError(f"pair id {r.id!r} ({r.source}) appears in more than one file of {spec.flag}")
        uses[(i, k)] = uses.get((i, k), 0) + 1
        # an "all_exhausted" mixture repeats rows of the smaller entries: later copies get their own id
        rid = r.id if uses[(i, k)] == 1 else f"{r.id}#{uses[(i, k)]}"
        rows.append({"id": rid, "prompt": r.prompt, "chosen": r.chosen, "rejected": r.rejected})
        file_of[rid] = names[i]
        n_from[i] += 1
    if not rows:
        raise DataError(f"{spec.dataset}: no preference pairs found")

    info = {"files": [], "skipped": {}, "n_pairs": len(rows)}
    for name, res, n in zip(names, results, n_from):
        info["files"].append({"path": name, "n_pairs": n, "format": res.data_format})
        for reason, count in res.skipped.items():
            info["skipped"][reason] = info["skipped"].get(reason, 0) + count
    if probs is not None:
        info["mixture"] = {"probs": probs, "seed": spec.seed}
    split_prompts = any(res.data_format in ("hh", "chat") for res in results)
    return OfflineData(rows, spec.prompt_key is not None or split_prompts, info, file_of)


def load_entry(name: str, spec: DataSpec) -> LoadResult:
    """One --data.dataset entry: local files by `load_pairs`, anything else by OpenRLHF's loader."""
    keys = dict(prompt_key=spec.prompt_key, chosen_key=spec.chosen_key, rejected_key=spec.rejected_key,
                max_samples=spec.max_samples, skip_invalid=spec.skip_invalid, split_chat=True)
    if reads_locally(name):
        return load_pairs(name, split=spec.split, **keys)
    data = openrlhf_rows(name, spec, spec.flag)
    return parse_pairs(name, "row", enumerate(data, 1), **keys)


class _LoaderStrategy:
    """What `blending_datasets` asks of OpenRLHF's strategy (it runs before the strategy exists): quiet."""

    def __init__(self, use_ms: bool):
        self.args = SimpleNamespace(use_ms=use_ms)

    def print(self, *args, **kwargs):
        pass

    def is_rank_0(self) -> bool:
        return False


def openrlhf_rows(name: str, spec: DataSpec, flag: str):
    """The rows of one dataset entry as stock train_dpo reads them (OpenRLHF's `blending_datasets`: Hub name, data
    directory, csv/arrow/script, `name@data_dir`; split `spec.split`; at most `spec.max_samples` rows)."""
    from openrlhf.datasets.utils import blending_datasets

    try:
        return blending_datasets(name, None, _LoaderStrategy(spec.use_ms), spec.seed,
                                 max_count=spec.max_samples or 1e8, dataset_split=spec.split)
    except AttributeError as e:
        if "DatasetDict" not in str(e):
            raise
        split_flag = "--eval.split" if flag == "--eval.dataset" else "--data.dataset_split"
        raise ConfigError(f"{flag} {name}: no split {spec.split!r}; set {split_flag}") from None
    except (OSError, ValueError) as e:  # ConnectionError (offline, not cached), FileNotFoundError, DatasetNotFound
        msg = " ".join(str(e).split())
        raise ConfigError(f"{flag} {name}: cannot load it as a local file, directory or Hub dataset "
                          f"(HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', '0')}): {type(e).__name__}: "
                          f"{msg[:400]}") from None


def load_prompts(spec: DataSpec, offline: OfflineData) -> list:
    """Bootstrapping prompts: [{id, prompt}], from --sera.prompts (a file or a Hub dataset; the prompt key, else a
    pair row's HH dialogue or conversation before its last assistant turn), else the offline pairs' distinct
    prompts (a prompt key, HH dialogues or chat conversations)."""
    if spec.prompts:
        return _prompts_file(spec)
    if not offline.use_prompt_key:
        raise ConfigError("bootstrapping needs prompts: set --data.prompt_key, use HH-format or chat-format data "
                          "(conversations ending with an assistant message), or give --sera.prompts")
    seen, out = set(), []
    for r in offline.rows:
        key = json.dumps(r["prompt"])
        if key not in seen:
            seen.add(key)
            out.append({"id": "prompt-" + hashlib.sha1(key.encode()).hexdigest()[:12], "prompt": r["prompt"]})
    return out


def _prompts_file(spec: DataSpec) -> list:
    key = spec.prompt_key or "prompt"
    if reads_locally(spec.prompts):
        unit, rows = open_rows(spec.prompts, spec.split)
    else:
        data = openrlhf_rows(spec.prompts, replace(spec, max_samples=None), "--sera.prompts")
        unit, rows = "row", enumerate(data, 1)
    out = []
    for n, row in rows:
        prompt = row.get(key) if isinstance(row, dict) else None
        if prompt is None and isinstance(row, dict):
            prompt = derive_prompt(row, spec.chosen_key, spec.rejected_key)
        if not (isinstance(prompt, str) and prompt.strip() or isinstance(prompt, list) and prompt):
            raise ConfigError(f"{spec.prompts} {unit} {n}: expected a JSON object with key {key!r} (--sera.prompts), "
                              f"or a pair row whose {spec.chosen_key!r}/{spec.rejected_key!r} are HH dialogues or "
                              "conversations ending with an assistant message")
        out.append({"id": f"prompt-{n}" if row.get("id") is None else str(row["id"]), "prompt": prompt})
    if not out:
        raise ConfigError(f"{spec.prompts}: no prompts (--sera.prompts)")
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
    paths = entries(spec.dataset) + ([spec.prompts] if spec.prompts else [])
    return {p: sha256_file(p) for p in paths if os.path.isfile(p)}


# ---------------------------------------------------------------------------------------------------- models


def hub_offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE): transformers then reads Hub ids from the cache only."""
    from huggingface_hub import constants

    transformers_offline = os.environ.get("TRANSFORMERS_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
    return bool(constants.HF_HUB_OFFLINE) or transformers_offline


def resolve_model(name: str, flag: str, revision: str | None = None, download: bool = False) -> str | None:
    """The directory `from_pretrained(name)` reads, as transformers resolves `name`: an existing local directory
    as given; else a Hub id (`org/name` or a slashless `gpt2`) at `revision` (default main: `refs/main` gives the
    commit, `snapshots/<commit>/` the files) in the Hugging Face cache. An id not in the cache: an error when
    offline; online, None (transformers downloads it when it loads), or with `download` its config and weights
    are fetched into the cache first, as `from_pretrained` would, and their snapshot returned."""
    if os.path.isdir(name):
        return name
    if name.startswith(("/", ".", "~")) or os.path.exists(name):
        raise ConfigError(f"{flag} {name}: no such model directory")
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        raise ConfigError(f"{flag} {name}: no such model directory (nor a valid Hugging Face Hub id)") from None
    cached = try_to_load_from_cache(name, "config.json", revision=revision)
    if isinstance(cached, str):
        return os.path.dirname(cached)
    if hub_offline():
        from huggingface_hub import constants

        raise ConfigError(f"{flag} {name}: no such model directory, and the Hub id is not in the Hugging Face cache "
                          f"{constants.HF_HUB_CACHE} at revision {revision or 'main'} (HF_HUB_OFFLINE=1: nothing is "
                          "downloaded)")
    if not download:
        return None
    from huggingface_hub import snapshot_download

    try:
        path = snapshot_download(name, revision=revision,
                                 allow_patterns=["config.json", "*.safetensors", "*.safetensors.index.json"])
        if not any(f.endswith(".safetensors") for f in os.listdir(path)):  # older repos: PyTorch pickles only
            path = snapshot_download(name, revision=revision,
                                     allow_patterns=["config.json", "*.bin", "*.bin.index.json"])
    except Exception as e:  # network, authentication, missing repo: one line, not a traceback
        raise ConfigError(f"{flag} {name}: not in the Hugging Face cache and not downloadable: "
                          f"{type(e).__name__}: {' '.join(str(e).split())[:300]}") from None
    return path
