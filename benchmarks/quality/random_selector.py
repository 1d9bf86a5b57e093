"""Selectors the quality benchmark plugs into the product with --sera.selector <this file>:<name>."""

from __future__ import annotations

import hashlib
import math
import random


def random_share(table, config):
    """Keep a uniformly random k = round-half-up(keep_ratio * N) of the pairs: the control for self-review at the
    same kept share (arXiv 2604.02766 finds margin-based selection often no better). Seeded by the table itself
    (ids and IRMs), so a resumed run keeps the same pairs and each iteration draws anew."""
    ids = list(table["id"])
    irm = [float(x) for x in table["irm"]]
    key = hashlib.sha1(repr((ids, [round(x, 6) for x in irm])).encode()).hexdigest()
    k = max(config.min_keep, math.floor(config.keep_ratio * len(ids) + 0.5))
    return random.Random(int(key[:16], 16)).sample(ids, min(k, len(ids)))
