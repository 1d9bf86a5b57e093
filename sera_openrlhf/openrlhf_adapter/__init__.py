"""The only part of sera_openrlhf that imports OpenRLHF, DeepSpeed or Ray.

`require_openrlhf()` checks that a supported OpenRLHF is installed; `compat.apply()` makes it run on CPU.
"""

from sera_openrlhf.openrlhf_adapter.compat import SUPPORTED_OPENRLHF, require_openrlhf

__all__ = ["SUPPORTED_OPENRLHF", "require_openrlhf"]
