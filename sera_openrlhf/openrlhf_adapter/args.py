"""OpenRLHF's own DPO argument parser, taken from the installed `openrlhf/cli/train_dpo.py`.

OpenRLHF builds its parser inside `if __name__ == "__main__":`, so it cannot be imported. Rather than copy 150
flag definitions (and drift from the installed version), we read that block with `ast` and run the statements
that build the parser, and later the statements that post-process the parsed args, skipping only `train(args)`.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
from datetime import datetime
from types import SimpleNamespace

from sera_openrlhf.openrlhf_adapter.compat import require_openrlhf

_STOCK_MODULE = "openrlhf.cli.train_dpo"


def _main_block():
    spec = importlib.util.find_spec(_STOCK_MODULE)
    if spec is None or spec.origin is None:
        require_openrlhf()
        raise ImportError(f"cannot find {_STOCK_MODULE} in the installed OpenRLHF")
    with open(spec.origin, encoding="utf-8") as f:
        tree = ast.parse(f.read(), filename=spec.origin)
    for node in tree.body:
        if (
            isinstance(node, ast.If)
            and isinstance(node.test, ast.Compare)
            and getattr(node.test.left, "id", None) == "__name__"
        ):
            return node.body, spec.origin
    raise ImportError(f"{spec.origin} has no `if __name__ == '__main__':` block; unsupported OpenRLHF layout")


def _is_parse_args(stmt) -> bool:
    return (
        isinstance(stmt, ast.Assign)
        and isinstance(stmt.value, ast.Call)
        and getattr(stmt.value.func, "attr", None) == "parse_args"
    )


def _is_train_call(stmt) -> bool:
    return (
        isinstance(stmt, ast.Expr)
        and isinstance(stmt.value, ast.Call)
        and getattr(stmt.value.func, "id", None) == "train"
    )


def _mentions_sera(stmt) -> bool:
    """Statements added by patches/openrlhf-0.11.2-sera.patch (they import sera_openrlhf or use `sera_*` names):
    our entry point does their job itself, so a patched OpenRLHF gives the same parser as a stock one."""
    return any(
        (isinstance(n, ast.ImportFrom) and (n.module or "").startswith("sera_openrlhf"))
        or (isinstance(n, ast.Name) and n.id.startswith("sera_"))
        for n in ast.walk(stmt)
    )


def _split_main_block():
    body, origin = _main_block()
    body = [s for s in body if not _mentions_sera(s)]
    cut = next((i for i, s in enumerate(body) if _is_parse_args(s)), None)
    if cut is None:
        raise ImportError(f"{origin}: no `args = parser.parse_args()` found; unsupported OpenRLHF layout")
    build = body[:cut]
    post = [s for s in body[cut + 1 :] if not _is_train_call(s)]
    return build, post, origin


def _run(stmts, origin, namespace):
    code = compile(ast.Module(body=stmts, type_ignores=[]), origin, "exec")
    exec(code, namespace)  # the installed OpenRLHF's own code, nothing user-supplied
    return namespace


def build_stock_parser() -> argparse.ArgumentParser:
    """The parser `python -m openrlhf.cli.train_dpo` uses, with `fp32` added to --ds.param_dtype's choices."""
    build, _, origin = _split_main_block()
    ns = _run(build, origin, {"argparse": argparse, "datetime": datetime, "__name__": "__sera_stock_args__"})
    parser = ns["parser"]
    for action in parser._actions:
        if action.dest == "ds.param_dtype" and action.choices and "fp32" not in action.choices:
            action.choices = list(action.choices) + ["fp32"]
            action.help = (action.help or "") + " (fp32 added by sera-openrlhf, e.g. for CPU)"
    return parser


def postprocess_stock_args(flat_args: argparse.Namespace) -> SimpleNamespace:
    """hierarchize + OpenRLHF's own defaults and warnings (ref model = policy if unset, ...)."""
    _, post, origin = _split_main_block()
    ns = _run(post, origin, {"args": flat_args, "__name__": "__sera_stock_args__"})
    return ns["args"]
