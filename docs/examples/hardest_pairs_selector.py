"""Worked example: data-selection callbacks for SeRA's self-review, plugged in without editing sera_openrlhf.

    python -m sera_openrlhf.cli.train_dpo <stock flags> --sera.enable \\
        --sera.selector docs/examples/hardest_pairs_selector.py:keep_hardest --sera.keep_ratio 0.5
    python -m sera_openrlhf.cli.train_dpo <stock flags> --sera.enable \\
        --sera.selector docs/examples/hardest_pairs_selector.py:soft_weights

A selector is called once per review (iteration >= 2) as `selector(table, config)`:
  table   dict of columns, one entry per offline pair: "id" (list[str]), "irm" (Tensor[N], implicit reward
          margin r(x, y_w) - r(x, y_l) under the current policy), "chosen_reward", "rejected_reward",
          "chosen_len", "rejected_len" (Tensor[N]), "irm_prev" (list of Tensor[N], earlier reviews, oldest first)
  config  sera_openrlhf.selection.SelectionConfig: keep_ratio, threshold, direction, drop_negative, min_keep, mode
and returns either the kept ids (list[str]) or one weight >= 0 per pair (Tensor[N]; 0 drops the pair, and each
kept pair's loss is multiplied by its weight during training).
"""

from __future__ import annotations

import math

import torch


def keep_hardest(table, config):
    """Keep the `--sera.keep_ratio` share of pairs with the LOWEST IRM (those the policy separates worst).

    k = max(--sera.min_keep, round-half-up(keep_ratio * N)); ties go to the smaller id, so the answer does not
    depend on row order. (The built-in equivalent is `--sera.select_direction low`.)
    """
    ids = list(table["id"])
    irm = torch.as_tensor(table["irm"], dtype=torch.float64).tolist()
    k = max(config.min_keep, math.floor(config.keep_ratio * len(ids) + 0.5))
    hardest_first = sorted(range(len(ids)), key=lambda i: (irm[i], ids[i]))
    return [ids[i] for i in hardest_first[:k]]


def soft_weights(table, config):
    """Soft selection: keep every pair, weighting hard (low-IRM) pairs up and easy ones down.

        w_i = sigmoid(-(irm_i - median(irm)) / std(irm)),  then rescaled so that mean(w) = 1

    The mean of 1 keeps the loss scale (and so the effective learning rate) of unweighted training. With
    --sera.drop_negative_irm, pairs with IRM < 0 (likely flipped labels) get weight 0 and are dropped.
    """
    irm = torch.as_tensor(table["irm"], dtype=torch.float64)
    scale = irm.std(unbiased=False)
    if not scale > 0:  # all margins equal (e.g. before any training): nothing to tell the pairs apart
        w = torch.ones_like(irm)
    else:
        w = torch.sigmoid(-(irm - irm.median()) / scale)
    if config.drop_negative:
        w = torch.where(irm < 0, torch.zeros_like(w), w)
    total = w.sum()
    return w * (len(w) / total) if total > 0 else w  # all zero: the run stops with "fewer than --sera.min_keep"
