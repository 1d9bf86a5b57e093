"""Drop-in entry point for `openrlhf.cli.train_dpo`, plus the `--sera.*` flags.

    python -m sera_openrlhf.cli.train_dpo <every stock OpenRLHF DPO flag> [--sera.* flags]
    torchrun --nproc_per_node 2 -m sera_openrlhf.cli.train_dpo ...
    deepspeed --module sera_openrlhf.cli.train_dpo ...

- no `--sera.*` flag: OpenRLHF's own `train()` runs unchanged (on CPU with the compatibility layer);
- `--sera.*` flags without `--sera.enable`: one DAA training run with SeRA's trainer (loss choice, reference
  cache);
- `--sera.enable`: the SeRA loop (sera_openrlhf.driver).

Every `--sera.*` value is validated (sera_openrlhf.config) before anything is loaded.
"""

from __future__ import annotations

import json
import os
import sys

from sera_openrlhf.errors import ConfigError, SeraError


def build_parser():
    from sera_openrlhf.cli.flags import add_sera_args
    from sera_openrlhf.openrlhf_adapter.args import build_stock_parser

    parser = build_stock_parser()
    parser.prog = "python -m sera_openrlhf.cli.train_dpo"
    add_sera_args(parser)
    return parser


def parse_args(argv):
    from sera_openrlhf.openrlhf_adapter.args import postprocess_stock_args

    flat = build_parser().parse_args(argv)
    return mark_given(postprocess_stock_args(flat), argv)


def mark_given(args, argv):
    """Record which flags the user gave (the CPU layer and the stock/SeRA dispatch depend on it)."""
    given = {a.split("=", 1)[0] for a in argv if a.startswith("--")}  # dotted flags may be --flag=value
    args._attn_defaulted = "--ds.attn_implementation" not in given
    args._param_dtype_given = "--ds.param_dtype" in given  # explicit: wins over --sera.precision auto
    args._sera_given = sorted(a[len("--sera."):] for a in given if a.startswith("--sera."))
    args._sera_active = bool(args._sera_given)
    return args


def sera_config(args):
    """All `--sera.*` values, validated; a loop-only flag without --sera.enable is an error, not ignored."""
    from sera_openrlhf.config import SeraConfig, stock_path_flags

    cfg = SeraConfig.from_namespace(args.sera)
    loop_only = [f for f in args._sera_given if f not in stock_path_flags() and f != "enable"]
    if loop_only and not cfg.loop.enable:
        shown = ", ".join(f"--sera.{f}" for f in loop_only)
        raise ConfigError(f"{shown} only acts in the SeRA loop: add --sera.enable (without it, only the stock-path "
                          "flags of docs/flags.md apply)")
    return cfg


def run_from_openrlhf(args, argv) -> None:
    """Called by a patched `openrlhf/cli/train_dpo.py` (patches/): the same dispatch as our entry point."""
    try:
        run(mark_given(args, argv))
    except SeraError as e:
        print(f"sera-openrlhf: error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)


def check_model_dir(path, flag: str, trust_remote_code: bool) -> None:
    """A missing model is a one-line error, and custom modelling code needs an explicit opt-in. `path` is resolved
    as transformers resolves it (sources.resolve_model): a local directory, or a Hub id (`org/name`, `gpt2`) in the
    Hugging Face cache; an id not in the cache is an error offline, and online it is left to transformers."""
    from sera_openrlhf.sources import resolve_model

    if not path:
        raise ConfigError(f"{flag} is required")
    local = resolve_model(path, flag)
    config = os.path.join(local, "config.json") if local else None
    if config and os.path.exists(config):
        with open(config, encoding="utf-8") as f:
            auto_map = json.load(f).get("auto_map")
        if auto_map and not trust_remote_code:
            shown = path if local == path else f"{path} ({local})"
            raise ConfigError(
                f"{flag} {shown} ships custom model code (auto_map in config.json: {sorted(auto_map)}); "
                "OpenRLHF would run it with trust_remote_code=True. Pass --sera.trust_remote_code if you "
                "trust it."
            )


def run(args) -> None:
    from sera_openrlhf import precision
    from sera_openrlhf.openrlhf_adapter.compat import check_cpu_args

    cfg = sera_config(args)
    if args._sera_active:  # without any --sera flag the stock run keeps its own --ds.param_dtype
        precision.check_flags(cfg.precision.precision, args.ds.param_dtype,
                              getattr(args, "_param_dtype_given", False))
    daa_loss = build_daa_loss(args, cfg) if args._sera_active else None
    for notice in check_cpu_args(args):
        print(f"[sera-openrlhf] {notice}", flush=True)
    trust = args.sera.trust_remote_code
    check_model_dir(args.model.model_name_or_path, "--model.model_name_or_path", trust)
    check_model_dir(args.ref.model_name_or_path, "--ref.model_name_or_path", trust)
    if not args.data.dataset:
        raise ConfigError("--data.dataset is required")
    if args._sera_active:
        precision.apply_to_args(args)  # -> args.ds.param_dtype, and the record in args._sera_precision

    if not args._sera_active:
        from openrlhf.cli.train_dpo import train

        train(args)
        print(f"[sera-openrlhf] model saved to {os.path.abspath(args.ckpt.output_dir)}", flush=True)
    elif cfg.loop.enable:
        from sera_openrlhf.driver import run_sera

        run_sera(args, cfg, daa_loss)
    else:
        train_once(args, daa_loss)


def build_daa_loss(args, cfg):
    """The DAA loss from --sera.loss and the stock --model.beta / --model.label_smoothing / --model.ipo_enable;
    with the loop, the selector is resolved too: a typo should not cost a whole first training pass."""
    from sera_openrlhf.losses import build_loss
    from sera_openrlhf.selection import SELECTORS

    name = cfg.loss.loss
    if args.model.ipo_enable and name not in ("dpo", "ipo"):
        raise ConfigError(f"--model.ipo_enable selects the IPO loss; it cannot be combined with --sera.loss {name}")
    if args.model.ipo_enable:  # the stock flag keeps its meaning
        name = "ipo"
    soft = cfg.loop.enable and cfg.review.select_mode == "soft"
    if soft and name == "robust":
        raise ConfigError("--sera.select_mode soft gives each pair its own label confidence (per-pair cDPO); it "
                          "cannot be combined with --sera.loss robust, whose flip rate is one number for all pairs")
    if args.model.label_smoothing and name in ("ipo", "slic", "simpo", "rdpo") and not soft:
        raise ConfigError(f"--model.label_smoothing (the label-flip rate of cDPO / robust DPO) applies to the dpo "
                          f"and robust losses only, not to --sera.loss {name} (except as the prior flip rate of "
                          f"--sera.select_mode soft)")
    # soft mode: label smoothing reaches the loss as each pair's confidence (1 - eps before the first review)
    daa_loss = build_loss(name, beta=args.model.beta, label_smoothing=0.0 if soft else args.model.label_smoothing,
                          gamma=cfg.loss.simpo_gamma, alpha=cfg.loss.rdpo_alpha, delta=cfg.loss.slic_delta)
    if cfg.loop.enable and not callable(SELECTORS.get(cfg.review.selector, flag="--sera.selector")):
        raise ConfigError(f"--sera.selector {cfg.review.selector} is not callable")
    return daa_loss


def train_once(args, daa_loss) -> None:
    from sera_openrlhf.openrlhf_adapter.train import setup_strategy, train_policy
    from sera_openrlhf.sources import DataSpec, load_offline

    from sera_openrlhf.driver import eval_rows

    spec = DataSpec.from_args(args)
    offline = load_offline(spec)
    strategy = setup_strategy(args)
    stats = train_policy(
        args, strategy, policy_path=args.model.model_name_or_path, ref_path=args.ref.model_name_or_path,
        rows=offline.rows, output_dir=args.ckpt.output_dir, daa_loss=daa_loss,
        use_prompt_key=offline.use_prompt_key, eval_rows=eval_rows(args, spec),
        use_ref_cache=args.sera.ref_cache != "off", cache_dir=args.sera.cache_dir,
    )
    if strategy.is_rank_0():
        print(f"[sera-openrlhf] {json.dumps(stats)}", flush=True)
        print(f"[sera-openrlhf] model saved to {os.path.abspath(args.ckpt.output_dir)}", flush=True)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    from sera_openrlhf.openrlhf_adapter import compat

    try:
        compat.set_launch_env_defaults()
        compat.apply()  # before anything imports openrlhf.models
        run(parse_args(argv))
    except SeraError as e:
        print(f"sera-openrlhf: error: {e}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
