"""OpenRLHF's `RewardDataset` with a stable example id, a loss weight and an NLL coefficient per pair.

Stock items carry no id, so nothing can be cached or selected per example. `RewardDataset` also silently drops
pairs whose prompt is too long; we drop them *before* it sees them, so our per-row columns stay aligned with its
rows and the drops are counted for the statistics.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Sequence

import torch
from datasets import Dataset
from openrlhf.datasets import RewardDataset
from openrlhf.datasets.reward_dataset import preprocess_data

from sera_openrlhf.errors import ConfigError


def prompt_too_long(tokenizer, prompt: str, max_length: int) -> bool:
    """The rule RewardDataset applies: a formatted prompt of >= max_length - 2 tokens is dropped."""
    n = len(tokenizer(prompt, max_length=max_length, truncation=True, add_special_tokens=False)["input_ids"])
    return n >= max_length - 2


def data_view(args, prompt_key):
    """The `strategy.args.data` view RewardDataset reads, with our fixed column names."""
    d = args.data
    return SimpleNamespace(
        args=SimpleNamespace(
            data=SimpleNamespace(
                prompt_key=prompt_key,
                chosen_key="chosen",
                rejected_key="rejected",
                apply_chat_template=d.apply_chat_template,
                tokenizer_chat_template=d.tokenizer_chat_template,
            )
        )
    )


class IndexedRewardDataset(RewardDataset):
    """Items are stock `RewardDataset` items plus their row index; `ids`, `weights`, `nll_coefs` are per row.

    rows: dicts with keys id, prompt, chosen, rejected and optionally weight (loss weight, default 1),
    nll_coef (extra NLL coefficient on the chosen response, default 0; used for bootstrapped pairs) and confidence
    (probability that the label is right, default 1; --sera.select_mode soft).
    """

    def __init__(self, rows: Sequence[dict], tokenizer, max_length: int, args, input_template=None,
                 use_prompt_key: bool = True):
        view = data_view(args, "prompt" if use_prompt_key else None)
        if view.args.data.apply_chat_template and view.args.data.tokenizer_chat_template:
            tokenizer.chat_template = view.args.data.tokenizer_chat_template
        if view.args.data.apply_chat_template and not getattr(tokenizer, "chat_template", None):
            raise ConfigError(
                f"--data.apply_chat_template: the tokenizer of {getattr(tokenizer, 'name_or_path', 'the model')} "
                "has no chat template; pass one with --data.tokenizer_chat_template, or drop the flag and give "
                "plain-text prompts"
            )
        apply_tpl = tokenizer.apply_chat_template if view.args.data.apply_chat_template else None
        kept, self.too_long_ids = [], []
        for row in rows:
            prompt, _, _, _ = preprocess_data(
                row, input_template, view.args.data.prompt_key, "chosen", "rejected", apply_tpl, is_dpo=True
            )
            (self.too_long_ids if prompt_too_long(tokenizer, prompt, max_length) else kept).append(row)
        self.ids = [str(r["id"]) for r in kept]
        self.weights = torch.tensor([float(r.get("weight", 1.0)) for r in kept], dtype=torch.float32)
        self.nll_coefs = torch.tensor([float(r.get("nll_coef", 0.0)) for r in kept], dtype=torch.float32)
        self.confidences = torch.tensor([float(r.get("confidence", 1.0)) for r in kept], dtype=torch.float32)
        table = Dataset.from_list([{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]}
                                   for r in kept]) if kept else Dataset.from_dict(
            {"prompt": [], "chosen": [], "rejected": []})
        # num_processors=1: the stock default of 8 map processes costs more than it saves on small sets
        super().__init__(table, tokenizer, max_length, view, input_template=input_template, is_dpo=True,
                         num_processors=1)
        if len(self) != len(self.ids):  # would mean OpenRLHF changed its filter rule
            raise RuntimeError(f"RewardDataset kept {len(self)} of {len(self.ids)} pre-filtered rows")

    def __getitem__(self, idx):
        return (*super().__getitem__(idx), idx)

    def collate_fn(self, item_list):
        base = super().collate_fn([item[:5] for item in item_list])
        return (*base, torch.tensor([item[5] for item in item_list], dtype=torch.long))

    def pair_tokens(self, idx):
        """(chosen_ids [L], rejected_ids [L'], prompt_len) exactly as training sees them."""
        chosen_ids, _, rejected_ids, _, prompt_len = super().__getitem__(idx)
        return chosen_ids[0], rejected_ids[0], int(prompt_len)
