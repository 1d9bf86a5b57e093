"""Reference log-prob cache: each pair's log pi_ref(y|x) is computed once per reference model and reused.

OpenRLHF runs the reference forward on every DPO step; the reference is frozen (SeRA keeps the initial SFT model),
so those numbers never change across epochs, iterations or resumed runs. One file per reference model:

    <cache_dir>/ref_logps-<fingerprint[:16]>.pt        torch.save of plain tensors / lists (loads weights_only)
    <cache_dir>/ref_logps-<fingerprint[:16]>.pt.sha256 sha256 of the .pt (sha256sum format)

Entries are keyed by example id and validated by a content hash of the pair's token ids and prompt length, so
re-tokenised or edited data misses instead of silently reusing stale numbers. A different model (or dtype, see
`scoring.model_fingerprint(extra=...)`) has a different fingerprint, hence a different file.

Kill-safety: the .pt and the sidecar are each written atomically; the sidecar is first rewritten to accept both
the old and the new checksum, then the .pt is replaced, then the sidecar keeps only the new one, so a kill at any
point leaves a pair that verifies.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any, Dict, Hashable, List, Optional, Sequence, Tuple

import torch

from .errors import ConfigError, DataError, StateError
from .fileio import atomic_open, atomic_write_text, sha256_file
from .scoring import LogprobFn, add_counts, score_pairs

__all__ = ["ReferenceCache", "content_hash"]

_FORMAT = 1
# per id: (content_hash, chosen_logp, rejected_logp, chosen_len, rejected_len)
_Entry = Tuple[str, float, float, int, int]


def _flat_ids(ids: Any) -> torch.Tensor:
    return torch.as_tensor(ids, dtype=torch.long).reshape(-1).cpu().contiguous()


def content_hash(chosen_ids: Any, rejected_ids: Any, prompt_len: int) -> str:
    """sha1 hex of a pair's token ids (LongTensor[L] / [1, L] / list) and prompt length."""
    c, r = _flat_ids(chosen_ids), _flat_ids(rejected_ids)
    h = hashlib.sha1()
    # The lengths go first so that moving a token from chosen to rejected changes the hash.
    h.update(f"{c.numel()},{r.numel()},{int(prompt_len)};".encode())
    h.update(c.numpy())
    h.update(r.numpy())
    return h.hexdigest()


def _norm_id(x: Any) -> Hashable:
    # ids arrive as python ints/strs or as 0-d tensors from a collated batch; store plain ints/strs.
    if isinstance(x, torch.Tensor):
        x = x.item()
    if isinstance(x, bool) or not isinstance(x, (int, str)):
        raise DataError(f"example id {x!r} must be an int or a str")
    return x


def _norm_ids(ids: Any) -> List[Hashable]:
    if isinstance(ids, torch.Tensor):
        ids = ids.reshape(-1).tolist()
    return [_norm_id(x) for x in ids]


class ReferenceCache:
    """Per-example reference log-probs for one reference model.

    cache_dir: directory of cache files (created on first save).
    model_fingerprint: hex digest from `scoring.model_fingerprint` (at least 16 hex characters).
    A file that fails its checksum or cannot be read raises StateError naming it (delete it to recompute).
    writer: whether this process saves (set False on all but one rank per shared file system; every rank
        still computes, so all ranks hold the same entries).
    """

    def __init__(
        self,
        cache_dir: str,
        model_fingerprint: str,
        *,
        writer: bool = True,
    ) -> None:
        fp = str(model_fingerprint)
        if len(fp) < 16 or any(ch not in "0123456789abcdef" for ch in fp.lower()):
            raise ConfigError(f"model_fingerprint must be a hex digest of >= 16 characters, got {fp!r}")
        self.cache_dir = os.fspath(cache_dir)
        self.fingerprint = fp
        self.writer = writer
        self.path = os.path.join(self.cache_dir, f"ref_logps-{fp[:16]}.pt")
        self.checksum_path = self.path + ".sha256"
        self.entries: Dict[Hashable, _Entry] = {}
        self.num_computed = 0  # pairs scored by the last ensure() call
        self.scored_per_rank = None
        self._load()

    # ---------------------------------------------------------------------------------------------------- disk

    def _corrupt(self, why: str) -> None:
        raise StateError(f"reference log-prob cache {self.path} is unusable: {why}. Delete it (and "
                         f"{self.checksum_path}) to recompute.")

    def _accepted_checksums(self) -> Optional[List[str]]:
        try:
            with open(self.checksum_path, encoding="utf-8") as f:
                return [line.split()[0].lower() for line in f if line.strip()]
        except (OSError, IndexError, UnicodeDecodeError):
            return None

    def _load(self) -> None:
        if not os.path.exists(self.path):
            return
        accepted = self._accepted_checksums()
        if not accepted:
            return self._corrupt(f"checksum file {self.checksum_path} is missing or unreadable")
        try:
            actual = sha256_file(self.path)
        except OSError as e:
            return self._corrupt(f"cannot read it ({e})")
        if actual not in accepted:
            return self._corrupt(f"sha256 {actual[:12]}... does not match {self.checksum_path}")
        try:
            blob = torch.load(self.path, map_location="cpu", weights_only=True)
            if not isinstance(blob, dict) or blob.get("format") != _FORMAT:
                raise ValueError(f"unknown format {blob.get('format') if isinstance(blob, dict) else type(blob)}")
            if blob["fingerprint"] != self.fingerprint:
                raise ValueError(f"it belongs to model fingerprint {blob['fingerprint'][:16]}...")
            ids, hashes = blob["ids"], blob["hashes"]
            cols = [blob[k].tolist() for k in ("chosen_logp", "rejected_logp", "chosen_len", "rejected_len")]
            if not all(len(c) == len(ids) for c in [hashes] + cols):
                raise ValueError("column lengths differ")
        except Exception as e:  # any unreadable content is "corrupt", never a crash with a bare traceback
            return self._corrupt(f"cannot load it ({type(e).__name__}: {e})")
        self.entries = {i: (h, c, r, cl, rl) for i, h, c, r, cl, rl in zip(ids, hashes, *cols)}

    def save(self) -> None:
        """Write all entries atomically (no-op when writer=False)."""
        if not self.writer:
            return
        ids = list(self.entries)
        vals = [self.entries[i] for i in ids]
        blob = {
            "format": _FORMAT,
            "fingerprint": self.fingerprint,
            "ids": ids,
            "hashes": [v[0] for v in vals],
            "chosen_logp": torch.tensor([v[1] for v in vals], dtype=torch.float64),
            "rejected_logp": torch.tensor([v[2] for v in vals], dtype=torch.float64),
            "chosen_len": torch.tensor([v[3] for v in vals], dtype=torch.long),
            "rejected_len": torch.tensor([v[4] for v in vals], dtype=torch.long),
        }
        os.makedirs(self.cache_dir, exist_ok=True)
        old = self._accepted_checksums() if os.path.exists(self.path) else None
        with atomic_open(self.path + ".new", "wb") as f:  # stage first: the checksum must be known before swap
            torch.save(blob, f)
        staged = self.path + ".new"
        new = sha256_file(staged)
        name = os.path.basename(self.path)
        if old:
            atomic_write_text(self.checksum_path, f"{new}  {name}\n" + "".join(f"{c}  {name}\n" for c in old))
        else:
            atomic_write_text(self.checksum_path, f"{new}  {name}\n")
        os.replace(staged, self.path)
        atomic_write_text(self.checksum_path, f"{new}  {name}\n")

    # ------------------------------------------------------------------------------------------------ queries

    def __len__(self) -> int:
        return len(self.entries)

    def lookup(
        self, ids: Sequence[Any], content_hashes: Sequence[str]
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Cached values for B examples.

        Returns (hit_mask BoolTensor[B], chosen float64[B], rejected float64[B]); a miss (unknown id or changed
        content) has hit_mask False and NaN values.
        """
        ids = _norm_ids(ids)
        if len(ids) != len(content_hashes):
            raise ValueError(f"lookup: {len(ids)} ids but {len(content_hashes)} content hashes")
        hit = torch.zeros(len(ids), dtype=torch.bool)
        chosen = torch.full((len(ids),), float("nan"), dtype=torch.float64)
        rejected = chosen.clone()
        for k, (i, h) in enumerate(zip(ids, content_hashes)):
            e = self.entries.get(i)
            if e is not None and e[0] == h:
                hit[k], chosen[k], rejected[k] = True, e[1], e[2]
        return hit, chosen, rejected

    def ensure(
        self,
        ids: Sequence[Any],
        pair_items: Sequence[Tuple[Any, Any, int]],
        logprob_fn: LogprobFn,
        pad_token_id: int,
        *,
        save_every: int = 16384,
        **score_kw: Any,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Make sure every (id, pair) is cached; returns (chosen float64[B], rejected float64[B]) in `ids` order.

        pair_items: (chosen_ids, rejected_ids, prompt_len) per id. Only missing or stale entries are scored, with
        `score_pairs(logprob_fn, ..., **score_kw)` (pass rank/world_size/gather_fn there for data parallel; every
        rank must call ensure with the same ids and hold the same cache state). Saves after every `save_every`
        scored pairs, so a kill loses at most that much work.
        """
        ids = _norm_ids(ids)
        if len(ids) != len(pair_items):
            raise ValueError(f"ensure: {len(ids)} ids but {len(pair_items)} pairs")
        hashes = [content_hash(c, r, p) for c, r, p in pair_items]
        todo: Dict[Hashable, int] = {}  # id -> first position needing a score
        seen: Dict[Hashable, str] = {}
        # the same tokens under another id (e.g. the repeats of --sera.train_pairs) are scored once
        cached_by_hash = {e[0]: e for e in self.entries.values()}
        first_of_hash: Dict[str, int] = {}
        copies: Dict[Hashable, int] = {}  # id -> position of the same content scored in this call
        for k, (i, h) in enumerate(zip(ids, hashes)):
            if seen.setdefault(i, h) != h:
                raise DataError(f"example id {i!r} appears twice with different token ids; ids must be unique")
            e = self.entries.get(i)
            if (e is not None and e[0] == h) or i in todo or i in copies:
                continue
            if h in cached_by_hash:
                self.entries[i] = cached_by_hash[h]
            elif h in first_of_hash:
                copies[i] = first_of_hash[h]
            else:
                first_of_hash[h] = todo[i] = k
        positions = list(todo.values())
        self.num_computed = len(positions)
        self.scored_per_rank = None  # sequences each rank scored for the misses (score_pairs' per_rank, summed)
        save_every = max(1, int(save_every))
        desc = score_kw.pop("desc", "reference log-probs")
        for start in range(0, len(positions), save_every):
            chunk = positions[start : start + save_every]
            part = f" [{start // save_every + 1}/{-(-len(positions) // save_every)}]" if len(positions) > save_every else ""
            chosen, rejected = score_pairs(
                logprob_fn, [pair_items[k] for k in chunk], pad_token_id, desc=desc + part, **score_kw
            )
            self.scored_per_rank = add_counts(self.scored_per_rank, chosen.per_rank)
            for j, k in enumerate(chunk):
                self.entries[ids[k]] = (
                    hashes[k],
                    float(chosen.logp_sum[j]),
                    float(rejected.logp_sum[j]),
                    int(chosen.num_tokens[j]),
                    int(rejected.num_tokens[j]),
                )
            self.save()
        if copies:
            for i, k in copies.items():
                self.entries[i] = self.entries[ids[k]]
            self.save()
        hit, chosen, rejected = self.lookup(ids, hashes)
        assert bool(hit.all()), "every entry was just computed"
        return chosen, rejected
