"""Render the report of a SeRA run directory.

    python -m sera_openrlhf.cli.report RUN_DIR

Writes RUN_DIR/report/ (report.md, report.json, PNG plots; see sera_openrlhf.report) and prints the path of
report.md. Works on a finished, converged or still-running/interrupted run. Exit code 2 with a one-line message
on stderr when RUN_DIR is missing or is not a SeRA run directory.
"""

from __future__ import annotations

import argparse
import sys

from sera_openrlhf.errors import SeraError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m sera_openrlhf.cli.report",
        description="Write the Markdown/JSON/PNG report of a SeRA run directory (the --sera.run_dir of a "
                    "--sera.enable run) to RUN_DIR/report/ and print the path of report.md.",
    )
    parser.add_argument("run_dir", metavar="RUN_DIR", help="run directory holding sera_state.json")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else list(argv))
    from sera_openrlhf.report import write_report

    try:
        path = write_report(args.run_dir)
    except SeraError as e:
        print(f"sera-openrlhf: error: {e}", file=sys.stderr, flush=True)
        return 2
    print(path, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
