#!/usr/bin/env bash
# The test command: set up (idempotent), then run the whole suite. Extra arguments go to pytest.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh || exit 1
# one pytest worker per core (GNU nproc honours OMP_NUM_THREADS, so count without it)
workers=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc); [ "$workers" -gt 4 ] && workers=4
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=disabled \
       TOKENIZERS_PARALLELISM=false MPLBACKEND=Agg
start=$(date +%s)
# the slow tests are single-threaded subprocesses (a test file stays on one worker)
.venv/bin/python -m pytest -p no:cacheprovider --timeout 900 -n "$workers" --dist loadfile "$@"
rc=$?
echo "tests: pytest exit $rc after $(( $(date +%s) - start )) s"
if [ $rc -eq 5 ]; then echo "tests: pytest collected no tests: failing the run" >&2; exit 1; fi
[ $rc -eq 0 ] || exit $rc
[ $# -eq 0 ] || exit 0  # a filtered run (arguments given) skips the peer suite
echo "tests: OpenRLHF's own test suite with sera-openrlhf's compatibility layer active"
.venv/bin/python scripts/peer_tests.py
prc=$?
if [ $prc -eq 5 ]; then echo "tests: the OpenRLHF suite collected no tests: failing the run" >&2; exit 1; fi
exit $prc
