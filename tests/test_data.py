"""Loading, validating and writing preference pairs (sera_openrlhf.data)."""

import gzip
import itertools
import json
import os
import random

import pytest

from sera_openrlhf.data import PairRecord, load_pairs, pair_id, split_hh_dialogue, write_pairs
from sera_openrlhf.errors import ConfigError, DataError

HH_FILE = "/work/shared/data/hh-rlhf-harmless-base/pairs.jsonl.gz"

ROWS = [
    {"question": "2+2?", "good": "4", "bad": "5", "margin": 1.0},
    {"question": "Capital of France?", "good": "Paris", "bad": "Lyon", "tags": ["geo"]},
    {"question": "Say hi", "good": "hi", "bad": "bye"},
]
KEYS = dict(prompt_key="question", chosen_key="good", rejected_key="bad")


def write_jsonl(path, rows):
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wt", encoding="utf-8") as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return str(path)


def load_error(path, **kw):
    with pytest.raises(DataError) as e:
        load_pairs(path, **kw)
    return str(e.value)


def hh(*turns):
    """HH dialogue from alternating human/assistant turns."""
    return "".join(f"\n\n{'Human' if i % 2 == 0 else 'Assistant'}: {t}" for i, t in enumerate(turns))


# ---------------------------------------------------------------------------------------------------- formats


@pytest.mark.parametrize("name", ["pairs.jsonl", "pairs.jsonl.gz"])
def test_jsonl_with_keys(tmp_path, name):
    path = write_jsonl(tmp_path / name, ROWS[:1] + [""] + ROWS[1:])  # a blank line 2 is skipped
    res = load_pairs(path, **KEYS)
    assert res.data_format == "openrlhf" and res.skipped == {}
    r = res.records[1]
    assert (r.prompt, r.chosen, r.rejected) == ("Capital of France?", "Paris", "Lyon")
    assert r.extra == {"tags": ["geo"]} and r.source == f"{path}:3"
    assert res.records[0].extra == {"margin": 1.0}


def test_no_prompt_key_gives_empty_prompt(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"chosen": "a", "rejected": "b", "question": "q"}])
    (r,) = load_pairs(path).records
    assert (r.prompt, r.chosen, r.rejected, r.extra) == ("", "a", "b", {"question": "q"})


def test_json_array_and_json_lines_in_dot_json(tmp_path):
    array = tmp_path / "a.json"
    array.write_text(json.dumps(ROWS, indent=2))
    res = load_pairs(str(array), **KEYS)
    assert [r.chosen for r in res.records] == ["4", "Paris", "hi"]
    assert res.records[1].source == f"{array}:8"  # the line where the second object starts
    lines = write_jsonl(tmp_path / "l.json", ROWS)
    assert [r.id for r in load_pairs(lines, **KEYS).records] == [r.id for r in res.records]


def test_hf_dataset_dir_and_parquet(tmp_path):
    import datasets

    rows = ROWS[:1] + ROWS[2:]  # same columns in every row
    ds = datasets.Dataset.from_list(rows)
    ds.save_to_disk(str(tmp_path / "ds"))
    datasets.DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(str(tmp_path / "dd"))
    ds.to_parquet(str(tmp_path / "p.parquet"))
    expected = [(r["question"], r["good"], r["bad"]) for r in rows]
    for path, kw in [("ds", {}), ("dd", {}), ("p.parquet", {})]:
        res = load_pairs(str(tmp_path / path), **KEYS, **kw)
        assert [(r.prompt, r.chosen, r.rejected) for r in res.records] == expected
        assert res.records[0].extra == {"margin": 1.0}
    assert len(load_pairs(str(tmp_path / "dd"), split="test", **KEYS).records) == 1
    assert "no split 'dev' (have: train, test)" in load_error(str(tmp_path / "dd"), split="dev", **KEYS)
    os.makedirs(tmp_path / "plain")
    assert "save_to_disk" in load_error(str(tmp_path / "plain"))


def test_max_samples_reads_first_rows_only(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", ROWS + ["{broken"])
    assert [r.chosen for r in load_pairs(path, max_samples=2, **KEYS).records] == ["4", "Paris"]
    with pytest.raises(ConfigError, match="--data.max_samples"):
        load_pairs(path, max_samples=0, **KEYS)


# ---------------------------------------------------------------------------------------------------- HH


def test_split_hh_multi_turn():
    chosen = hh("hi", "hello!", "how do I bake bread?", "Mix flour, water and yeast.")
    rejected = hh("hi", "hello!", "how do I bake bread?", "No.")
    prompt, c, r = split_hh_dialogue(chosen, rejected)
    assert prompt == "\n\nHuman: hi\n\nAssistant: hello!\n\nHuman: how do I bake bread?\n\nAssistant:"
    assert (c, r) == ("Mix flour, water and yeast.", "No.")
    assert split_hh_dialogue(prompt + "  two spaces", prompt + "x")[1:] == (" two spaces", "x")  # one space only
    with pytest.raises(DataError, match="differ before"):
        split_hh_dialogue(chosen, hh("hi", "go away", "how do I bake bread?", "No."))
    with pytest.raises(DataError, match="no '\\\\n\\\\nAssistant:' turn"):
        split_hh_dialogue("\n\nHuman: hi", "\n\nHuman: hi")


def test_hh_auto_detect_and_mismatch_line(tmp_path):
    rows = [
        {"chosen": hh("q1", "good"), "rejected": hh("q1", "bad")},
        {"chosen": hh("q2", "a", "q3", "good"), "rejected": hh("q2", "a", "q3", "bad")},
    ]
    res = load_pairs(write_jsonl(tmp_path / "hh.jsonl", rows))
    assert res.data_format == "hh"
    assert [(r.prompt, r.chosen, r.rejected) for r in res.records] == [
        ("\n\nHuman: q1\n\nAssistant:", "good", "bad"),
        ("\n\nHuman: q2\n\nAssistant: a\n\nHuman: q3\n\nAssistant:", "good", "bad"),
    ]
    # with a prompt key, auto keeps OpenRLHF semantics: the dialogue is the response
    plain = load_pairs(write_jsonl(tmp_path / "k.jsonl", [dict(rows[0], p="x")]), prompt_key="p")
    assert plain.data_format == "openrlhf" and plain.records[0].chosen == rows[0]["chosen"]
    with pytest.raises(ConfigError, match="--data.prompt_key"):
        load_pairs(str(tmp_path / "k.jsonl"), prompt_key="p", data_format="hh")
    msg = load_error(write_jsonl(tmp_path / "bad.jsonl", rows + [{"chosen": hh("q", "a"), "rejected": hh("Q", "b")}]))
    assert msg.startswith(f"{tmp_path / 'bad.jsonl'} line 3: ") and "differ before" in msg
    msg = load_error(write_jsonl(tmp_path / "nohh.jsonl", rows + [{"chosen": "x", "rejected": "y"}]))
    assert "line 3: 'chosen' and 'rejected' must both be strings starting with" in msg


def test_hh_real_data_first_50_lines():
    with gzip.open(HH_FILE, "rt", encoding="utf-8") as f:
        raw = [json.loads(line) for line in itertools.islice(f, 50)]
    res = load_pairs(HH_FILE, max_samples=50)
    assert res.data_format == "hh" and len(res.records) == 50 and res.skipped == {}
    for row, r in zip(raw, res.records):
        assert r.prompt.startswith("\n\nHuman:") and r.prompt.endswith("\n\nAssistant:")
        assert row["chosen"] == f"{r.prompt} {r.chosen}" and row["rejected"] == f"{r.prompt} {r.rejected}"
        assert "\n\nAssistant:" not in r.chosen and r.chosen.strip() and r.rejected.strip()
    assert any(r.prompt.count("\n\nHuman:") > 1 for r in res.records)  # multi-turn dialogues are present


def test_hh_real_data_skip_invalid():
    # the full file has 4 empty final turns (first at line 87) and 2 dialogues that diverge early
    assert load_error(HH_FILE).endswith("line 87: empty 'chosen' response")
    res = load_pairs(HH_FILE, skip_invalid=True)
    assert len(res.records) == 1794
    assert res.skipped == {"empty_response": 4, "hh_prefix_mismatch": 2}
    assert res.skipped_examples[0] == f"{HH_FILE}:87"


# ---------------------------------------------------------------------------------------------------- chat messages


def test_chat_message_lists(tmp_path):
    msg = lambda role, text: {"role": role, "content": text}  # noqa: E731
    rows = [
        {"prompt": [msg("user", "hi")], "chosen": [msg("assistant", "hello")], "rejected": [msg("assistant", "go")]},
        {"prompt": [msg("system", "be nice"), msg("user", "q")], "chosen": [msg("assistant", "a")],
         "rejected": [msg("assistant", "b")]},
    ]
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    res = load_pairs(path, prompt_key="prompt")
    assert [r.prompt for r in res.records] == [row["prompt"] for row in rows]
    assert res.records[0].chosen == [msg("assistant", "hello")]
    # without a prompt key (OpenRLHF: the whole conversation is chosen/rejected)
    full = [{"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]} for r in rows]
    res = load_pairs(write_jsonl(tmp_path / "full.jsonl", full))
    assert res.data_format == "openrlhf" and res.records[1].chosen == full[1]["chosen"]


@pytest.mark.parametrize(
    "row, expected",
    [
        ({"chosen": [{"role": "assistant"}], "rejected": []}, "'chosen' message 0: expected an object with string"),
        ({"chosen": ["hi"], "rejected": []}, "'chosen' message 0"),
        ({"chosen": [{"role": "assistant", "content": "a"}], "rejected": []}, "empty 'rejected' response"),
        ({"chosen": [{"role": "assistant", "content": " "}], "rejected": [{"role": "assistant", "content": "b"}]},
         "empty 'chosen' response"),
        ({"chosen": [{"role": "assistant", "content": "a"}], "rejected": "b"},
         "mixed value types ('chosen' is a list, 'rejected' is a string)"),
    ],
)
def test_bad_chat_messages(tmp_path, row, expected):
    path = write_jsonl(tmp_path / "c.jsonl", [{"chosen": "a", "rejected": "b"}, row])
    assert f"line 2: {expected}" in load_error(path)


# ---------------------------------------------------------------------------------------------------- malformed


def test_malformed_rows_name_file_line_and_key(tmp_path):
    good = json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"})
    cases = [
        ([good] * 6 + ['{"prompt": "p", "chosen": '], "line 7: invalid JSON: "),
        ([good, good, '{"prompt": "p", "rejected": "b"}'],
         "line 3: missing key 'chosen' (set --data.chosen_key); the row has 'prompt', 'rejected'"),
        (['{"chosen": "a", "rejected": "b"}'], "line 1: missing key 'prompt' (set --data.prompt_key)"),
        ([good, '{"prompt": "p", "chosen": "a", "rejected": 3}'],
         "line 2: 'rejected' must be a string or a list of chat messages, got a number"),
        ([good, '{"prompt": null, "chosen": "a", "rejected": "b"}'],
         "line 2: 'prompt' must be a string or a list of chat messages, got null"),
        ([good, '{"prompt": "p", "chosen": "a", "rejected": ""}'], "line 2: empty 'rejected' response"),
        (['{"prompt": "p", "chosen": " \\n\\t", "rejected": "b"}'], "line 1: empty 'chosen' response"),
        ([good, "[1, 2]"], "line 2: expected a JSON object, got a list"),
        ([good, json.dumps({"prompt": "p", "chosen": [{"role": "assistant", "content": "a"}], "rejected": [
            {"role": "assistant", "content": "b"}]})], "line 2: mixed value types ('prompt' is a string, 'chosen' is a list"),
    ]
    for i, (lines, expected) in enumerate(cases):
        path = write_jsonl(tmp_path / f"m{i}.jsonl", lines)
        assert load_error(path, prompt_key="prompt").startswith(f"{path} {expected}"), expected


def test_invalid_utf8_and_gzip(tmp_path):
    path = tmp_path / "u.jsonl"
    path.write_bytes(b'{"chosen": "a", "rejected": "b"}\n{"chosen": "\xff", "rejected": "b"}\n')
    assert load_error(str(path)) == f"{path} line 2: invalid UTF-8 at byte 12 of the line"
    arr = tmp_path / "u.json"
    arr.write_bytes(b'[\n{"chosen": "a", "rejected": "b"},\n{"chosen": "\xff", "rejected": "b"}]')
    assert load_error(str(arr)).startswith(f"{arr} line 3: invalid UTF-8")
    gz = tmp_path / "x.jsonl.gz"
    gz.write_bytes(b"not gzip")
    assert "not a readable gzip file" in load_error(str(gz))


def test_json_array_errors_have_lines(tmp_path):
    arr = tmp_path / "a.json"
    arr.write_text('[\n  {"chosen": "a", "rejected": "b"},\n  {"chosen": "a" "rejected": "b"}\n]')
    assert load_error(str(arr)).startswith(f"{arr} line 3: invalid JSON: Expecting ','")
    arr.write_text('[\n  {"chosen": "a", "rejected": "b"},\n\n  {"chosen": "a", "rejected": " "}\n]')
    assert load_error(str(arr)) == f"{arr} line 4: empty 'rejected' response"


def test_empty_missing_and_unsupported(tmp_path):
    empty = write_jsonl(tmp_path / "e.jsonl", ["", "  "])
    assert load_error(empty) == f"{empty}: no preference pairs found"
    same = write_jsonl(tmp_path / "s.jsonl", [{"chosen": "a", "rejected": "a"}])
    assert load_error(same) == f"{same}: no preference pairs found (skipped: identical_responses=1)"
    assert "no such file" in load_error(str(tmp_path / "nope.jsonl"))
    (tmp_path / "x.csv").write_text("a,b\n")
    assert "unsupported file type" in load_error(str(tmp_path / "x.csv"))
    with pytest.raises(ConfigError, match="--data.format"):
        load_pairs(empty, data_format="yaml")


# ---------------------------------------------------------------------------------------------------- ids


def test_ids_stable_across_reordering_and_duplicates(tmp_path):
    rows = [{"chosen": f"c{i}", "rejected": f"r{i}"} for i in range(6)] + [{"chosen": "c1", "rejected": "r1"}] * 2
    a = load_pairs(write_jsonl(tmp_path / "a.jsonl", rows)).records
    shuffled = rows[:]
    random.Random(1).shuffle(shuffled)
    b = load_pairs(write_jsonl(tmp_path / "b.jsonl", shuffled)).records
    by_content = lambda recs: sorted((r.chosen, r.id) for r in recs)  # noqa: E731
    assert by_content(a) == by_content(b)
    base = pair_id("", "c1", "r1")
    assert [r.id for r in a if r.chosen == "c1"] == [base, f"{base}-2", f"{base}-3"]
    assert len(base) == 16 and len({r.id for r in a}) == 8


def test_explicit_id_column(tmp_path):
    rows = [{"id": 7, "chosen": "a", "rejected": "b"}, {"id": "x", "chosen": "a", "rejected": "b"}]
    res = load_pairs(write_jsonl(tmp_path / "i.jsonl", rows))
    assert [r.id for r in res.records] == ["7", "x"] and res.records[0].extra == {}
    dup = write_jsonl(tmp_path / "d.jsonl", rows + [{"id": "7", "chosen": "c", "rejected": "d"}])
    assert load_error(dup) == f"{dup} line 3: duplicate id '7' (first seen at {dup} line 1)"


def test_identical_responses_counted(tmp_path):
    rows = [{"chosen": "a", "rejected": "b"}, {"chosen": "same", "rejected": "same"}, {"chosen": "c", "rejected": "d"}]
    path = write_jsonl(tmp_path / "i.jsonl", rows)
    res = load_pairs(path)
    assert len(res.records) == 2
    assert res.skipped == {"identical_responses": 1} and res.skipped_examples == [f"{path}:2"]


# ---------------------------------------------------------------------------------------------------- writing


def test_write_round_trip_with_input_keys(tmp_path):
    res = load_pairs(write_jsonl(tmp_path / "in.jsonl", ROWS), **KEYS)
    out = str(tmp_path / "out.jsonl")
    assert write_pairs(out, res.records, "question", "good", "bad") == "question"
    first = json.loads(open(out).readline())
    assert set(first) == {"id", "question", "good", "bad", "margin"}
    again = load_pairs(out, **KEYS).records
    assert [(r.id, r.prompt, r.chosen, r.rejected, r.extra) for r in again] == [
        (r.id, r.prompt, r.chosen, r.rejected, r.extra) for r in res.records
    ]
    write_pairs(out, res.records, "question", "good", "bad", include_id=False)
    assert "id" not in json.loads(open(out).readline())


def test_write_hh_adds_prompt_key(tmp_path):
    res = load_pairs(HH_FILE, max_samples=5)
    out = str(tmp_path / "hh.jsonl")
    assert write_pairs(out, res.records, prompt_key=None) == "prompt"
    again = load_pairs(out, prompt_key="prompt").records
    assert [(r.id, r.prompt, r.chosen, r.rejected) for r in again] == [
        (r.id, r.prompt, r.chosen, r.rejected) for r in res.records
    ]


def test_write_without_prompt(tmp_path):
    out = str(tmp_path / "np.jsonl")
    recs = [PairRecord("a", "", [{"role": "user", "content": "q"}, {"role": "assistant", "content": "x"}],
                       [{"role": "user", "content": "q"}, {"role": "assistant", "content": "y"}])]
    assert write_pairs(out, recs, prompt_key=None) is None
    (r,) = load_pairs(out).records
    assert (r.id, r.prompt, r.chosen, r.rejected) == ("a", "", recs[0].chosen, recs[0].rejected)
