"""Resume state of a SeRA run: `sera_state.json` (checksummed) and the run directory's lock."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os

from sera_openrlhf.errors import StateError
from sera_openrlhf.fileio import atomic_write_json

# flags that may change between a run and its resumption without changing what it computes
# (micro-batch and scoring-batch sizes change only the order of floating-point sums)
RESUME_NEUTRAL = {"local_rank", "ckpt.load_enable", "ckpt.save_steps", "ckpt.max_num", "ckpt.max_mem", "ckpt.save_hf",
                  "sera.force_resume", "logger", "eval.steps", "use_ms", "train.micro_batch_size",
                  "data.dataloader_num_workers", "sera.score_batch_size", "sera.score_tokens_per_batch"}


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def resume_config(config: dict) -> dict:
    """The part of the configuration a resumed run must share with the original."""
    return {k: v for k, v in flatten(config).items()
            if not any(k == n or k.startswith(n + ".") for n in RESUME_NEUTRAL)}


def added_at_default(key: str, old: dict, new: dict) -> bool:
    """A --sera flag newer than the run (absent from its stored configuration) left at its default changes
    nothing the run computes: upgrading the plugin must not strand a half-finished run."""
    from sera_openrlhf.config import defaults

    name = key[len("sera."):] if key.startswith("sera.") else None
    return key not in old and name in defaults() and new.get(key) == defaults()[name]


def checksum(data: dict) -> str:
    """sha256 of the state's JSON body (every key but "checksum"), as `RunState.save` writes it."""
    body = json.dumps({k: v for k, v in data.items() if k != "checksum"}, sort_keys=True)
    return hashlib.sha256(body.encode()).hexdigest()


class RunState:
    """The configuration, the finished phases and per-iteration statistics, checksummed."""

    def __init__(self, path: str, config: dict, force: bool, writer: bool, inputs: dict | None = None):
        """config: the parsed flags; inputs: {path: sha256} of the input files (a resumed run must read the same
        bytes). A mismatch in either is refused unless `force` (--sera.force_resume)."""
        self.path = path
        self.writer = writer
        inputs = inputs or {}
        if os.path.exists(self.path):
            self.data = self._read()
            old, new = resume_config(self.data["config"]), resume_config(config)
            diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k) and not added_at_default(k, old, new))
            if diff and not force:
                shown = ", ".join(f"--{k} {old.get(k)!r} -> {new.get(k)!r}" for k in diff[:8])
                raise StateError(
                    f"{self.path}: this run directory was started with a different configuration ({shown}). "
                    "Use the original flags, another --sera.run_dir, or --sera.force_resume to continue anyway."
                )
            before = self.data.get("inputs", {})
            changed = sorted(p for p in set(before) & set(inputs) if before[p] != inputs[p])
            if changed and not force:
                raise StateError(
                    f"{self.path}: the content of {', '.join(changed)} changed since this run started (sha256 "
                    f"{before[changed[0]][:12]} -> {inputs[changed[0]][:12]}). Restore the file, use another "
                    "--sera.run_dir, or --sera.force_resume to continue with the new content."
                )
            self.data["config"] = config
        else:
            self.data = {"version": 1, "config": config, "done": [], "iterations": {}, "final_policy": None}
        self.data["inputs"] = inputs

    def _read(self) -> dict:
        try:
            with open(self.path, encoding="utf-8") as f:
                data = json.load(f)
            ok = data.get("checksum") == checksum(data)
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
        atomic_write_json(self.path, {**self.data, "checksum": checksum(self.data)})

    def done(self, phase: str) -> bool:
        return phase in self.data["done"]

    def mark(self, phase: str, stats: dict | None, iteration: int, seconds: float, memory: dict | None = None) -> None:
        if stats is not None:
            self.data["iterations"].setdefault(str(iteration), {})[phase.split("/")[-1]] = stats
        self.data.setdefault("seconds", {})[phase] = round(seconds, 1)
        if memory is not None:  # this rank's peak RSS (and CUDA peak) during the phase
            self.data.setdefault("memory", {})[phase] = memory
        if phase not in self.data["done"]:
            self.data["done"].append(phase)
        self.save()

    def stats(self, t: int) -> dict:
        return self.data["iterations"].get(str(t), {})


class RunLock:
    """An exclusive flock on <run_dir>/.lock: a second run on the same directory refuses to start. The kernel
    releases it when the process dies, even by SIGKILL, so a killed run never leaves a stale lock."""

    def __init__(self, path: str):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        self.path = path
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            raise StateError(f"{os.path.dirname(path)} is in use by another SeRA run (lock {self.path}); wait for "
                             "it to finish or use another --sera.run_dir") from None
        os.ftruncate(self.fd, 0)
        os.write(self.fd, f"{os.getpid()}\n".encode())

    def release(self):
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
