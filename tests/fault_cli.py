"""The entry point with fault injection: `python tests/fault_cli.py <train_dpo args>`.

`SERA_FAULT_KILL_AT` holds comma-separated event points (sera_openrlhf/events.py); reaching one SIGKILLs the
process at once, like an out-of-memory kill or a lost node (`SERA_FAULT_SIGNAL=TERM`: SIGTERM, what a scheduler
sends first). The product only emits the points; this test helper subscribes the killer.
"""

import os
import signal
import sys

from sera_openrlhf import events
from sera_openrlhf.cli.train_dpo import main


def kill_at(points: set, sig: int):
    def on_event(point: str) -> None:
        if point in points:
            os.kill(os.getpid(), sig)

    return on_event


if __name__ == "__main__":
    points = set(filter(None, os.environ.get("SERA_FAULT_KILL_AT", "").split(",")))
    sig = signal.SIGTERM if os.environ.get("SERA_FAULT_SIGNAL") == "TERM" else signal.SIGKILL
    events.subscribe(kill_at(points, sig))
    sys.exit(main(sys.argv[1:]))
