"""Reading and writing preference-pair sets in OpenRLHF's formats, with validation and stable ids.

Input rows follow OpenRLHF's `--data.prompt_key / --data.chosen_key / --data.rejected_key` (prompt "" when no
prompt key is set), as strings or as chat-message lists (`--data.apply_chat_template`). Anthropic HH-RLHF
dialogues (`"\\n\\nHuman: ... \\n\\nAssistant: ..."`) are split into the shared prompt and the final assistant turns;
with `split_chat`, so are whole chat conversations (the prompt is the conversation before the last assistant
message, which is what OpenRLHF's DPO dataset uses as the prompt of such rows).

Every malformed row is a `DataError` naming the file, the 1-based line (or row) and the key, raised while
loading, so nothing downstream is written from bad input. `load_pairs` reads local files; `parse_pairs` validates
rows from anywhere (sera_openrlhf.sources feeds it Hub datasets read by OpenRLHF's own loader).
"""

from __future__ import annotations

import gzip
import hashlib
import itertools
import json
import os
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Union

from sera_openrlhf.errors import ConfigError, DataError
from sera_openrlhf.fileio import atomic_write_jsonl

Text = Union[str, list]  # a string, or a list of {"role", "content"} chat messages

HH_HUMAN = "\n\nHuman:"
HH_ASSISTANT = "\n\nAssistant:"
DATA_FORMATS = ("auto", "hh", "chat", "openrlhf")
# Data-quality problems found in real datasets (HH-RLHF has both); `skip_invalid` skips these rows. Anything
# else (bad JSON, missing keys, wrong types) means wrong flags or a broken file and always fails.
SKIPPABLE = ("empty_response", "hh_prefix_mismatch", "chat_prefix_mismatch")
# Files (and save_to_disk directories) read here, with errors located by line; anything else (Hub names, csv,
# arrow, data directories, `name@data_dir`) is read by OpenRLHF's `blending_datasets` (sera_openrlhf.sources).
LOCAL_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".parquet")


@dataclass
class PairRecord:
    """One preference pair. `extra` holds the row's other columns unchanged; `source` is "file:line"."""

    id: str
    prompt: Text
    chosen: Text
    rejected: Text
    extra: dict = field(default_factory=dict)
    source: str = ""


@dataclass
class LoadResult:
    """`skipped` counts rows left out by reason; `skipped_examples` lists their sources ("file:line").
    `ordinals[i]` is the 0-based position of `records[i]` among the `n_rows` rows read (skipped ones included), the
    row index OpenRLHF's loader would give it."""

    path: str
    records: list[PairRecord]
    data_format: str  # resolved: "hh", "chat" or "openrlhf"
    skipped: dict[str, int] = field(default_factory=dict)
    skipped_examples: list[str] = field(default_factory=list)
    ordinals: list[int] = field(default_factory=list)
    n_rows: int = 0


class _RowError(Exception):
    """A problem with one row; `reason` is a short code (see SKIPPABLE). Located by the caller."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def split_hh_dialogue(chosen: str, rejected: str) -> tuple[str, str, str]:
    """Split two HH-RLHF dialogues into (prompt, chosen_response, rejected_response).

    The prompt is the chosen dialogue up to and including its last "\\n\\nAssistant:"; the rejected dialogue must
    share it. One leading space of each response is removed (HH writes "Assistant: text").
    """
    try:
        return _split_hh(chosen, rejected)
    except _RowError as e:
        raise DataError(str(e)) from None


def _split_hh(chosen: str, rejected: str) -> tuple[str, str, str]:
    cut = chosen.rfind(HH_ASSISTANT)
    if cut < 0:
        raise _RowError("not_hh_dialogue", f"'chosen' is not an HH dialogue: no {HH_ASSISTANT!r} turn")
    prompt = chosen[: cut + len(HH_ASSISTANT)]
    if not rejected.startswith(prompt):
        raise _RowError(
            "hh_prefix_mismatch",
            f"the chosen and rejected dialogues differ before the chosen one's last {HH_ASSISTANT!r} turn",
        )
    return prompt, _strip_one_space(chosen[len(prompt) :]), _strip_one_space(rejected[len(prompt) :])


def _strip_one_space(s: str) -> str:
    return s[1:] if s.startswith(" ") else s


def _is_hh(chosen: Any, rejected: Any) -> bool:
    return all(isinstance(v, str) and v.startswith(HH_HUMAN) for v in (chosen, rejected))


def _is_chat(chosen: Any, rejected: Any) -> bool:
    """Whole conversations: message lists of at least two messages ending with an assistant message."""
    return all(isinstance(v, list) and len(v) >= 2 and isinstance(v[-1], dict) and v[-1].get("role") == "assistant"
               for v in (chosen, rejected))


def _split_chat(chosen: list, rejected: list) -> tuple[list, list, list]:
    """(conversation before the last assistant message, [chosen's last], [rejected's last]); the rejected
    conversation must share the prefix (OpenRLHF slices both responses after the chosen one's prefix)."""
    if not _is_chat(chosen, rejected):
        raise _RowError("not_chat_dialogue", "chat rows without a prompt key must be conversations of at least two "
                                             "messages ending with an assistant message")
    if chosen[:-1] != rejected[:-1]:
        raise _RowError("chat_prefix_mismatch",
                        "the chosen and rejected conversations differ before their last assistant message")
    return chosen[:-1], chosen[-1:], rejected[-1:]


def derive_prompt(row: dict, chosen_key: str = "chosen", rejected_key: str = "rejected") -> Text | None:
    """The prompt of a pair row without a prompt column: the shared HH dialogue or chat conversation before the
    last assistant turn; None when the row is neither."""
    chosen, rejected = row.get(chosen_key), row.get(rejected_key)
    try:
        if _is_hh(chosen, rejected):
            return _split_hh(chosen, rejected)[0]
        if _is_chat(chosen, rejected):
            return _split_chat(chosen, rejected)[0]
    except _RowError:
        return None
    return None


def pair_id(prompt: Text, chosen: Text, rejected: Text) -> str:
    """Content hash used as the id of rows without an "id" column (16 hex chars of sha1)."""
    blob = json.dumps([prompt, chosen, rejected], ensure_ascii=False, sort_keys=True)
    return hashlib.sha1(blob.encode("utf-8")).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------- reading


def load_pairs(
    path: str,
    prompt_key: str | None = None,
    chosen_key: str = "chosen",
    rejected_key: str = "rejected",
    data_format: str = "auto",
    max_samples: int | None = None,
    split: str = "train",
    skip_invalid: bool = False,
    split_chat: bool = False,
) -> LoadResult:
    """Load and validate preference pairs.

    Reads `.jsonl`, `.jsonl.gz`, `.json` (a JSON array, or JSON Lines as HF's json loader accepts), `.json.gz`,
    `.parquet`, and directories written by `datasets.save_to_disk` (`split` picks from a DatasetDict).
    `max_samples` keeps the first rows, like OpenRLHF's `--data.max_samples`.

    data_format: "openrlhf" (prompt = row[prompt_key], or "" when prompt_key is None), "hh" (split HH-RLHF
    dialogues), "chat" (split chat conversations at their last assistant message), or "auto" (= "hh" when
    prompt_key is None and the first row's chosen and rejected both start with "\\n\\nHuman:"; = "chat" when
    `split_chat`, prompt_key is None and they are both conversations ending with an assistant message; else
    "openrlhf").

    Pairs whose chosen equals rejected are skipped and counted under "identical_responses". With
    `skip_invalid`, rows with an empty response or diverging HH dialogues / conversations are skipped too
    (counted by reason) instead of raising.
    """
    _check_options(prompt_key, data_format, max_samples)
    unit, rows = open_rows(path, split)
    return parse_pairs(path, unit, rows, prompt_key=prompt_key, chosen_key=chosen_key, rejected_key=rejected_key,
                       data_format=data_format, max_samples=max_samples, skip_invalid=skip_invalid,
                       split_chat=split_chat)


def reads_locally(path: str) -> bool:
    """Whether `load_pairs` reads `path` itself (with located errors): a file with one of LOCAL_SUFFIXES (or
    missing and looking like a path, so the error is "no such file"), or a `save_to_disk` directory."""
    if os.path.isdir(path):
        return any(os.path.exists(os.path.join(path, f)) for f in ("dataset_dict.json", "state.json"))
    if path.lower().endswith(LOCAL_SUFFIXES):
        return True
    return not os.path.exists(path) and "@" not in path and (path.startswith(("/", ".", "~")) or path.count("/") > 1)


def _check_options(prompt_key: str | None, data_format: str, max_samples: int | None) -> None:
    if data_format not in DATA_FORMATS:
        raise ConfigError(f"--data.format must be one of {', '.join(DATA_FORMATS)}, got {data_format!r}")
    if data_format in ("hh", "chat") and prompt_key:
        what = "HH dialogues" if data_format == "hh" else "Chat conversations"
        raise ConfigError(f"{what} carry their own prompt: unset --data.prompt_key or use another format")
    if max_samples is not None and max_samples < 1:
        raise ConfigError(f"--data.max_samples must be >= 1, got {max_samples}")


def parse_pairs(
    name: str,
    unit: str,
    rows: Iterable[tuple[int, Any]],
    *,
    prompt_key: str | None = None,
    chosen_key: str = "chosen",
    rejected_key: str = "rejected",
    data_format: str = "auto",
    max_samples: int | None = None,
    skip_invalid: bool = False,
    split_chat: bool = False,
) -> LoadResult:
    """Validate `rows` ((number, row) pairs; errors say "<name> <unit> <number>") into a LoadResult, with the
    same rules as `load_pairs`."""
    _check_options(prompt_key, data_format, max_samples)
    keys = {"prompt": prompt_key, "chosen": chosen_key, "rejected": rejected_key}

    result = LoadResult(path=name, records=[], data_format=data_format)
    id_lines: dict[str, str] = {}  # id -> where it was first seen
    hash_counts: dict[str, int] = {}
    for ordinal, (n, row) in enumerate(itertools.islice(rows, max_samples)):
        result.n_rows = ordinal + 1
        where, source = f"{name} {unit} {n}", f"{name}:{n}"
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected a JSON object, got {_kind(row)}")
        if result.data_format == "auto":
            chosen, rejected = row.get(chosen_key), row.get(rejected_key)
            if prompt_key is None and _is_hh(chosen, rejected):
                result.data_format = "hh"
            elif prompt_key is None and split_chat and _is_chat(chosen, rejected):
                result.data_format = "chat"
            else:
                result.data_format = "openrlhf"
        try:
            prompt, chosen, rejected = _parse_row(row, keys, result.data_format)
        except _RowError as e:
            if skip_invalid and e.reason in SKIPPABLE:
                _skip(result, e.reason, source)
                continue
            raise DataError(f"{where}: {e}") from None
        if chosen == rejected:
            _skip(result, "identical_responses", source)
            continue

        if row.get("id") is not None:
            rid = str(row["id"])
        else:
            # Exact duplicates get -2, -3, ... so ids stay unique and do not depend on row order.
            base = pair_id(prompt, chosen, rejected)
            hash_counts[base] = hash_counts.get(base, 0) + 1
            rid = base if hash_counts[base] == 1 else f"{base}-{hash_counts[base]}"
        if rid in id_lines:
            raise DataError(f"{where}: duplicate id {rid!r} (first seen at {id_lines[rid]})")
        id_lines[rid] = where

        extra = {k: v for k, v in row.items() if k not in ("id", prompt_key, chosen_key, rejected_key)}
        result.records.append(PairRecord(rid, prompt, chosen, rejected, extra, source))
        result.ordinals.append(ordinal)

    if not result.records:
        skipped = ", ".join(f"{k}={v}" for k, v in result.skipped.items())
        raise DataError(f"{name}: no preference pairs found" + (f" (skipped: {skipped})" if skipped else ""))
    return result


def _skip(result: LoadResult, reason: str, source: str) -> None:
    result.skipped[reason] = result.skipped.get(reason, 0) + 1
    result.skipped_examples.append(source)


def _parse_row(row: dict, keys: dict[str, str | None], data_format: str) -> tuple[Text, Text, Text]:
    """Validate one row; returns (prompt, chosen, rejected). Raises _RowError."""
    values = {}
    for role, key in keys.items():
        if key is None:
            continue
        if key not in row:
            have = ", ".join(repr(k) for k in row)
            raise _RowError("missing_key", f"missing key {key!r} (set --data.{role}_key); the row has {have}")
        values[role] = _check_text(row[key], key)

    chosen, rejected = values["chosen"], values["rejected"]
    prompt = values.get("prompt", "")
    if data_format == "chat":
        prompt, chosen, rejected = _split_chat(chosen, rejected)
    elif data_format == "hh":
        if not _is_hh(chosen, rejected):
            raise _RowError(
                "not_hh_dialogue",
                f"{keys['chosen']!r} and {keys['rejected']!r} must both be strings starting with {HH_HUMAN!r} "
                "in HH format",
            )
        prompt, chosen, rejected = _split_hh(chosen, rejected)
    else:
        kinds = {role: type(v) for role, v in values.items()}
        if len(set(kinds.values())) > 1:
            desc = ", ".join(f"{keys[r]!r} is {_kind(values[r])}" for r in kinds)
            raise _RowError("bad_type", f"mixed value types ({desc}): use all strings or all message lists")

    for role, value in (("chosen", chosen), ("rejected", rejected)):
        text = value[-1]["content"] if isinstance(value, list) and value else value
        if not text or not text.strip():
            raise _RowError("empty_response", f"empty {keys[role]!r} response")
    return prompt, chosen, rejected


def _check_text(value: Any, key: str) -> Text:
    """A value must be a string or a list of {"role": str, "content": str} messages."""
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise _RowError("bad_type", f"{key!r} must be a string or a list of chat messages, got {_kind(value)}")
    for i, m in enumerate(value):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise _RowError(
                "bad_messages",
                f"{key!r} message {i}: expected an object with string 'role' and 'content', got {_short(m)}",
            )
    return value


def _kind(v: Any) -> str:
    names = {str: "a string", list: "a list", dict: "an object", bool: "a boolean", type(None): "null"}
    return names.get(type(v), "a number" if isinstance(v, (int, float)) else type(v).__name__)


def _short(v: Any, limit: int = 80) -> str:
    s = json.dumps(v, ensure_ascii=False, default=str)
    return s if len(s) <= limit else s[: limit - 3] + "..."


def open_rows(path: str, split: str) -> tuple[str, Iterator[tuple[int, Any]]]:
    """Returns (unit, rows): unit is "line" for text files, "row" for tabular ones; rows yields (number, row)."""
    if os.path.isdir(path):
        return "row", _read_hf_dir(path, split)
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file or directory")
    lower = path.lower()
    if lower.endswith(".parquet"):
        return "row", _read_parquet(path)
    if lower.endswith((".jsonl", ".jsonl.gz", ".json", ".json.gz")):
        data = _read_bytes(path)
        if data.removeprefix(b"\xef\xbb\xbf").lstrip()[:1] == b"[":  # after a UTF-8 byte-order mark
            return "line", _read_json_array(path, data)
        return "line", _read_json_lines(path, data)
    raise DataError(f"{path}: unsupported file type (use .jsonl[.gz], .json[.gz], .parquet or a save_to_disk dir)")


def _read_bytes(path: str) -> bytes:
    if not path.lower().endswith(".gz"):
        with open(path, "rb") as f:
            return f.read()
    try:
        with gzip.open(path, "rb") as f:
            return f.read()
    except (OSError, EOFError) as e:
        raise DataError(f"{path}: not a readable gzip file ({e})") from None


def _read_json_lines(path: str, data: bytes) -> Iterator[tuple[int, Any]]:
    for n, raw in enumerate(data.split(b"\n"), 1):
        where = f"{path} line {n}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{where}: invalid UTF-8 at byte {e.start} of the line") from None
        line = line.lstrip("\ufeff") if n == 1 else line
        if not line.strip():
            continue
        try:
            yield n, json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: invalid JSON: {e.msg} (column {e.colno})") from None


def _read_json_array(path: str, data: bytes) -> Iterator[tuple[int, Any]]:
    """A JSON array of objects; elements are decoded one by one to know each one's line."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise DataError(f"{path} line {line}: invalid UTF-8 at byte {e.start} of the file") from None
    try:
        json.loads(text)  # whole-file check first, so a syntax error anywhere is reported with its line
    except json.JSONDecodeError as e:
        raise DataError(f"{path} line {e.lineno}: invalid JSON: {e.msg} (column {e.colno})") from None
    decoder = json.JSONDecoder()
    pos = text.index("[") + 1
    while True:
        while text[pos] in " \t\r\n,":
            pos += 1
        if text[pos] == "]":
            return
        obj, end = decoder.raw_decode(text, pos)
        yield text.count("\n", 0, pos) + 1, obj
        pos = end


def _read_parquet(path: str) -> Iterator[tuple[int, Any]]:
    import pyarrow.parquet as pq  # installed with `datasets`; imported here to keep `import data` light

    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises several types for a corrupt file
        raise DataError(f"{path}: not a readable parquet file ({e})") from None
    yield from enumerate(rows, 1)


def _read_hf_dir(path: str, split: str) -> Iterator[tuple[int, Any]]:
    import datasets  # heavy: only for save_to_disk directories

    if not any(os.path.exists(os.path.join(path, f)) for f in ("dataset_dict.json", "state.json")):
        raise DataError(f"{path}: directory is not a dataset saved with datasets.save_to_disk")
    ds = datasets.load_from_disk(path)
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(f"{path}: no split {split!r} (have: {', '.join(ds)}); set --data.dataset_split "
                            "(--eval.split for --eval.dataset)")
        ds = ds[split]
    yield from enumerate(ds, 1)


# ---------------------------------------------------------------------------------------------------- writing


def write_pairs(
    path: str,
    records: Iterable[PairRecord],
    prompt_key: str | None,
    chosen_key: str = "chosen",
    rejected_key: str = "rejected",
    include_id: bool = True,
) -> str | None:
    """Atomically write records as JSONL in the input's keys, so stock OpenRLHF can train on the file.

    Extra columns are kept. When `prompt_key` is None but records carry a prompt (split HH dialogues), the prompt
    goes under "prompt". Returns the prompt key written (None if none): pass it as `--data.prompt_key`.
    """
    records = list(records)
    if prompt_key is None and any(r.prompt for r in records):
        prompt_key = "prompt"
    rows = []
    for r in records:
        row = dict(r.extra)
        if include_id:
            row["id"] = r.id
        if prompt_key is not None:
            row[prompt_key] = r.prompt
        row[chosen_key] = r.chosen
        row[rejected_key] = r.rejected
        rows.append(row)
    atomic_write_jsonl(path, rows)
    return prompt_key
