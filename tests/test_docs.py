"""Docs that are generated from code must not go stale."""

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_flag_reference_is_current():
    proc = subprocess.run([sys.executable, "scripts/gen_flag_docs.py", "--check"], cwd=REPO)
    assert proc.returncode == 0, "docs/flags.md is stale: run `python scripts/gen_flag_docs.py`"


def test_every_sera_flag_has_help_and_default_in_help_text():
    import argparse

    from sera_openrlhf.cli.flags import add_sera_args

    parser = argparse.ArgumentParser()
    add_sera_args(parser)
    for action in parser._actions:
        if action.option_strings and action.option_strings[0].startswith("--sera."):
            assert action.help and len(action.help) > 15, action.option_strings
            if action.nargs != 0:
                assert "(default: " in action.help, action.option_strings
