"""OpenRLHF's own test suite (the 0.11.2 wheel installs it as the top-level `tests` package), run with
sera-openrlhf installed and its compatibility layer active: the plugin must not change stock behaviour.

    python scripts/peer_tests.py [pytest args]
"""

import os
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")

from sera_openrlhf.openrlhf_adapter import compat  # noqa: E402

compat.set_launch_env_defaults()
compat.apply()

import pytest  # noqa: E402
import tests as openrlhf_tests  # noqa: E402  (OpenRLHF's package, not ours: ours has no __init__.py)

root = os.path.dirname(openrlhf_tests.__file__)
assert os.path.exists(os.path.join(os.path.dirname(root), "openrlhf")), f"{root} is not OpenRLHF's test package"
sys.exit(pytest.main([root, "-q", "-p", "no:cacheprovider", "-rs", "--timeout", "300", *sys.argv[1:]]))
