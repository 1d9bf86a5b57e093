#!/usr/bin/env python
"""Build the packaged default preference set `sera_openrlhf/resources/hh_rlhf_harmless_base/`.

Reproducible: reads only the shared HH-RLHF harmless-base file and writes byte-identical output on every run.

    python scripts/build_default_data.py [--source /work/shared/data/hh-rlhf-harmless-base] [--out DIR]

Selection rule (documented in the output README.md):
  1. Split each source pair into prompt = the shared dialogue prefix up to and including the last
     "\\n\\nAssistant:", and chosen/rejected = the final assistant turns with one leading space removed.
     Pairs whose two sides do not share that prefix are skipped.
  2. A pair is eligible when len(prompt) <= 400 chars, both responses are non-empty after stripping
     whitespace, each response is <= 300 chars, and chosen != rejected (after stripping).
  3. pairs.jsonl = the first 512 eligible pairs in the original file order.
  4. prompts.jsonl = the next 128 eligible pairs in file order (prompt only) whose prompt text does not occur in
     pairs.jsonl and has not already been taken (held-out, unique prompts).
Ids are "hh-harmless-base-test-NNNN", NNNN = the 0-based line number in the source file.
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
import os
import shutil
import statistics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_SOURCE = "/work/shared/data/hh-rlhf-harmless-base"
DEFAULT_OUT = os.path.join(REPO, "sera_openrlhf", "resources", "hh_rlhf_harmless_base")

MARK = "\n\nAssistant:"
MAX_PROMPT_CHARS = 400
MAX_RESPONSE_CHARS = 300
N_PAIRS = 512
N_PROMPTS = 128


def split_pair(chosen_full: str, rejected_full: str):
    """Return (prompt, chosen, rejected) or None when both sides do not share the prefix."""
    ic, ir = chosen_full.rfind(MARK), rejected_full.rfind(MARK)
    if ic < 0 or ir < 0:
        return None
    prompt = chosen_full[: ic + len(MARK)]
    if rejected_full[: ir + len(MARK)] != prompt:
        return None
    chosen, rejected = chosen_full[ic + len(MARK):], rejected_full[ir + len(MARK):]
    if chosen.startswith(" "):
        chosen = chosen[1:]
    if rejected.startswith(" "):
        rejected = rejected[1:]
    return prompt, chosen, rejected


def to_messages(prompt: str) -> list:
    """'\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant:' -> [user a, assistant b, user c]."""
    turns = re.split(r"\n\n(Human|Assistant):", prompt)
    assert turns[0] == "" and turns[-1] == "" and turns[-2] == "Assistant", prompt[:80]
    messages = []
    for who, text in zip(turns[1:-2:2], turns[2:-2:2]):
        messages.append({"role": "user" if who == "Human" else "assistant", "content": text.strip()})
    return messages


def eligible(prompt: str, chosen: str, rejected: str) -> bool:
    return (
        len(prompt) <= MAX_PROMPT_CHARS
        and 0 < len(chosen.strip()) and len(chosen) <= MAX_RESPONSE_CHARS
        and 0 < len(rejected.strip()) and len(rejected) <= MAX_RESPONSE_CHARS
        and chosen.strip() != rejected.strip()
    )


def build(source_dir: str, out_dir: str) -> dict:
    src = os.path.join(source_dir, "pairs.jsonl.gz")
    with gzip.open(src, "rt", encoding="utf-8") as f:
        source = [json.loads(line) for line in f if line.strip()]

    candidates = []
    n_unsplittable = 0
    for i, row in enumerate(source):
        split = split_pair(row["chosen"], row["rejected"])
        if split is None:
            n_unsplittable += 1
            continue
        if eligible(*split):
            candidates.append((f"hh-harmless-base-test-{i:04d}", *split))
    if len(candidates) < N_PAIRS + N_PROMPTS:
        raise SystemExit(f"only {len(candidates)} eligible pairs in {src}; need {N_PAIRS + N_PROMPTS}")

    pairs = [{"prompt": p, "chosen": c, "rejected": r, "id": i} for i, p, c, r in candidates[:N_PAIRS]]
    used = {row["prompt"] for row in pairs}
    prompts = []
    for i, p, _c, _r in candidates[N_PAIRS:]:
        if p in used:
            continue
        used.add(p)
        prompts.append({"prompt": p, "id": i})
        if len(prompts) == N_PROMPTS:
            break
    if len(prompts) < N_PROMPTS:
        raise SystemExit(f"only {len(prompts)} held-out prompts available; need {N_PROMPTS}")

    os.makedirs(out_dir, exist_ok=True)
    chat_pairs = [{"prompt": to_messages(r["prompt"]), "chosen": [{"role": "assistant", "content": r["chosen"]}],
                   "rejected": [{"role": "assistant", "content": r["rejected"]}], "id": r["id"]} for r in pairs]
    chat_prompts = [{"prompt": to_messages(r["prompt"]), "id": r["id"]} for r in prompts]
    for name, rows in (("pairs.jsonl", pairs), ("prompts.jsonl", prompts), ("pairs_chat.jsonl", chat_pairs),
                       ("prompts_chat.jsonl", chat_prompts)):
        with open(os.path.join(out_dir, name), "w", encoding="utf-8", newline="\n") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    shutil.copyfile(os.path.join(source_dir, "LICENSE"), os.path.join(out_dir, "LICENSE"))
    os.chmod(os.path.join(out_dir, "LICENSE"), 0o644)

    def mean(xs):
        return round(statistics.mean(xs), 1)

    stats = {
        "n_source": len(source),
        "n_unsplittable": n_unsplittable,
        "n_eligible": len(candidates),
        "n_pairs": len(pairs),
        "n_prompts": len(prompts),
        "last_pair_line": int(pairs[-1]["id"].rsplit("-", 1)[1]),
        "last_prompt_line": int(prompts[-1]["id"].rsplit("-", 1)[1]),
        "n_single_turn": sum(r["prompt"].count("\n\nHuman:") == 1 for r in pairs),
        "n_unique_prompts": len({r["prompt"] for r in pairs}),
        "mean_prompt": mean([len(r["prompt"]) for r in pairs]),
        "mean_chosen": mean([len(r["chosen"]) for r in pairs]),
        "mean_rejected": mean([len(r["rejected"]) for r in pairs]),
        "mean_heldout_prompt": mean([len(r["prompt"]) for r in prompts]),
    }
    with open(os.path.join(out_dir, "README.md"), "w", encoding="utf-8", newline="\n") as f:
        f.write(README.format(**stats, MAX_PROMPT_CHARS=MAX_PROMPT_CHARS, MAX_RESPONSE_CHARS=MAX_RESPONSE_CHARS))
    return stats


README = """\
# Default preference set: HH-RLHF harmless-base (short pairs)

The default data for `sera-openrlhf` demos and tests: real human preference pairs, short enough for CPU runs
with SmolLM2-135M-Instruct. Built by `scripts/build_default_data.py`; do not edit by hand.

## Source

- Anthropic HH-RLHF, split `harmless-base/test.jsonl.gz` (Bai et al. 2022, "Training a Helpful and Harmless
  Assistant with Reinforcement Learning from Human Feedback"), via the project's shared copy of its first
  {n_source} pairs (`hh-rlhf-harmless-base/pairs.jsonl.gz`, original order).
- Labels are crowd-worker judgements (the chosen reply was judged less harmful). They are noisy: some pairs are
  near-ties or look flipped.
- Content warning: the prompts are red-teaming attempts and some responses are offensive or harmful.

## Files

| file | rows | keys |
|---|---|---|
| `pairs.jsonl` | {n_pairs} | `prompt`, `chosen`, `rejected`, `id` |
| `prompts.jsonl` | {n_prompts} | `prompt`, `id` (held-out prompts for bootstrapping and evaluation) |
| `pairs_chat.jsonl`, `prompts_chat.jsonl` | same | the same rows as chat messages, for `--data.apply_chat_template` |
| `LICENSE` | | MIT licence of HH-RLHF, copied from the source |

`id` is `hh-harmless-base-test-NNNN`, where NNNN is the 0-based line of the pair in the source file.

## Format

Prompts are kept in the raw HH **text form**, `"\\n\\nHuman: ...\\n\\nAssistant:"` (multi-turn prompts contain
earlier turns in the same form); they always end with `"\\n\\nAssistant:"`. `chosen` and `rejected` are the final
assistant turns only, with the single leading space after `Assistant:` removed, so `prompt + " " + chosen`
restores the original dialogue. The set works without `--data.apply_chat_template`.

`pairs_chat.jsonl` / `prompts_chat.jsonl` hold the same rows as chat messages: `prompt` is the list of earlier
turns (`user` for Human, `assistant` for Assistant), `chosen`/`rejected` are one-message lists
`[{{"role": "assistant", "content": ...}}]`. Use them with `--data.apply_chat_template` so an instruct model sees
its own chat template (the demo does: in the raw text form SmolLM2-Instruct rarely ends its turn).

## Selection rule

1. Split each pair: prompt = the dialogue prefix shared by both sides, up to and including the last
   `"\\n\\nAssistant:"`; responses = the rest, one leading space removed. Pairs whose sides do not share that
   prefix are skipped ({n_unsplittable} of {n_source}).
2. Eligible: prompt <= {MAX_PROMPT_CHARS} characters; each response non-empty after stripping whitespace and
   <= {MAX_RESPONSE_CHARS} characters; chosen != rejected (after stripping). {n_eligible} pairs are eligible.
3. `pairs.jsonl`: the first {n_pairs} eligible pairs in source order (source lines 0..{last_pair_line}).
4. `prompts.jsonl`: the following eligible pairs in source order, prompt only, skipping any prompt text that
   occurs in `pairs.jsonl` or earlier in `prompts.jsonl`, until {n_prompts} are taken (up to source line
   {last_prompt_line}). Disjoint from `pairs.jsonl` by id and by prompt text.

## Statistics (`pairs.jsonl`)

- {n_single_turn} of {n_pairs} prompts are single-turn; {n_unique_prompts} distinct prompts.
- Mean length in characters: prompt {mean_prompt}, chosen {mean_chosen}, rejected {mean_rejected}.
- Held-out prompts (`prompts.jsonl`): mean {mean_heldout_prompt} characters.

## Licence

HH-RLHF is released under the MIT licence, Copyright (c) 2022 Anthropic; the full text is in `LICENSE`
beside this file and must accompany any copy of the data.
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", default=DEFAULT_SOURCE, help="folder holding pairs.jsonl.gz and LICENSE")
    ap.add_argument("--out", default=DEFAULT_OUT)
    args = ap.parse_args()
    stats = build(args.source, args.out)
    print(json.dumps(stats, indent=2))


if __name__ == "__main__":
    main()
