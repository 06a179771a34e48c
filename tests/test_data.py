"""Data layer: tiny tokenizer, dataset sources and blending, prompt dataset, padding, batch order.

References are independent: hand-written expected arrays, plain Python loops, the raw `tokenizers`/`datasets`
behaviour seen through transformers.AutoTokenizer and pandas/json.
"""
import collections
import json

import numpy as np
import pytest
from datasets import Dataset, DatasetDict, Features, Value
from transformers import AutoTokenizer

from jaxrlhf.data.loader import BatchIterator, bucket_length, left_pad, right_pad
from jaxrlhf.data.prompts import PromptDataset, truncate_left
from jaxrlhf.data.sources import blend, load_records, parse_probs, split_specs
from jaxrlhf.data.tokenizer import DEFAULT_CHARS, build_tiny_tokenizer, load_tokenizer

ROWS = [{"input": f"what is {i} plus {i}?", "label": str(2 * i)} for i in range(6)]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    build_tiny_tokenizer(out, list(DEFAULT_CHARS) + ["what", "plus"])
    return out


@pytest.fixture(scope="module")
def tok(tok_dir):
    return load_tokenizer(tok_dir)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ---------------------------------------------------------------- tokenizer


def test_tiny_tokenizer_round_trip_via_autotokenizer(tok_dir):
    t = AutoTokenizer.from_pretrained(tok_dir)  # the plain HF loader, offline
    assert (t.pad_token_id, t.bos_token_id, t.eos_token_id, t.unk_token_id) == (0, 1, 2, 3)
    text = "what is 3 plus 4?\nAnswer: 7"
    ids = t(text, add_special_tokens=False)["input_ids"]
    assert t.decode(ids) == text
    # longest symbol wins: "what" and "plus" are one token each; then chars
    assert ids[:1] == t.convert_tokens_to_ids(["what"])
    assert len(ids) == len(text) - 3 - 3
    # a character outside the vocabulary becomes <unk>
    assert t("a\u00e9b", add_special_tokens=False)["input_ids"] == t.convert_tokens_to_ids(["a", "<unk>", "b"])


def test_tiny_tokenizer_chat_template(tok_dir):
    t = AutoTokenizer.from_pretrained(tok_dir)
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    with_gen = t.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    without = t.apply_chat_template(msgs, tokenize=False, add_generation_prompt=False)
    assert without == "<s><|system|>be brief</s><|user|>hi</s>"
    assert with_gen == without + "<|assistant|>"
    ids = t(with_gen, add_special_tokens=False)["input_ids"]
    assert ids[0] == t.bos_token_id and ids[-1] == t.convert_tokens_to_ids("<|assistant|>")
    assert t.decode(ids) == with_gen
    assert t.decode(ids, skip_special_tokens=True) == "be briefhi"


def test_tiny_tokenizer_without_template_and_bad_symbols(tmp_path):
    t = build_tiny_tokenizer(tmp_path / "a", ["ab", "c"], chat_template=None)
    assert not t.chat_template
    assert t.decode(t("abcab", add_special_tokens=False)["input_ids"]) == "abcab"
    with pytest.raises(ValueError, match="reserved"):
        build_tiny_tokenizer(tmp_path / "b", ["a", "</s>"])
    with pytest.raises(ValueError, match="at least one symbol"):
        build_tiny_tokenizer(tmp_path / "c", [])


def test_load_tokenizer_errors_and_pad_fallback(tmp_path, tok_dir):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"no tokenizer in directory .*found \['config.json'\]"):
        load_tokenizer(tmp_path / "empty")
    # a tokenizer without a pad token gets pad = eos (OpenRLHF's rule)
    t = AutoTokenizer.from_pretrained(tok_dir)
    t.pad_token = None
    t.save_pretrained(tmp_path / "nopad")
    assert AutoTokenizer.from_pretrained(tmp_path / "nopad").pad_token is None
    t2 = load_tokenizer(tmp_path / "nopad")
    assert t2.pad_token == "</s>" and t2.pad_token_id == t2.eos_token_id == 2


# ---------------------------------------------------------------- sources


def test_load_records_every_local_form(tmp_path):
    rows = ROWS
    write_jsonl(tmp_path / "d.jsonl", rows)
    (tmp_path / "d.json").write_text(json.dumps(rows))
    Dataset.from_list(rows).to_parquet(str(tmp_path / "d.parquet"))
    Dataset.from_list(rows).to_csv(str(tmp_path / "d.csv"), index=False)
    Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved_ds"))
    DatasetDict({"train": Dataset.from_list(rows), "test": Dataset.from_list(rows[:2])}).save_to_disk(
        str(tmp_path / "saved_dd")
    )
    arrow_file = next((tmp_path / "saved_ds").glob("*.arrow"))
    jdir = tmp_path / "jdir"
    jdir.mkdir()
    write_jsonl(jdir / "part0.jsonl", rows[:3])
    write_jsonl(jdir / "part1.jsonl", rows[3:])
    pdir = tmp_path / "pdir"
    pdir.mkdir()
    Dataset.from_list(rows).to_parquet(str(pdir / "x.parquet"))

    specs = [
        str(tmp_path / "d.jsonl"),
        str(tmp_path / "d.json"),
        str(tmp_path / "d.parquet"),
        str(tmp_path / "d.csv"),
        str(arrow_file),
        str(tmp_path / "saved_ds"),
        str(tmp_path / "saved_dd"),
        f"json@{jdir}",
        str(jdir),
        str(pdir),
    ]
    expected = sorted((r["input"], r["label"]) for r in rows)
    for spec in specs:
        ds = load_records(spec)
        got = sorted((r["input"], str(r["label"])) for r in ds)  # csv parses "0" as an int
        assert got == expected, spec
    assert len(load_records(str(tmp_path / "saved_dd"), split="test")) == 2
    with pytest.raises(ValueError, match=r"has no split 'validation'; available splits: \['test', 'train'\]"):
        load_records(str(tmp_path / "saved_dd"), split="validation")


def test_load_records_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist locally.*Hub"):
        load_records("no_such_org/no_such_dataset_xyz")
    with pytest.raises(FileNotFoundError, match=r"dataset path '.*missing.jsonl' does not exist"):
        load_records(str(tmp_path / "missing.jsonl"))
    with pytest.raises(FileNotFoundError, match="directory .* does not exist"):
        load_records(f"json@{tmp_path / 'nodir'}")
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match=r"dataset '.*empty.jsonl' is empty"):
        load_records(str(tmp_path / "empty.jsonl"))
    (tmp_path / "empty_array.json").write_text("[]")
    with pytest.raises(ValueError, match=r"dataset '.*empty_array.json' is empty: it has 0 records"):
        load_records(str(tmp_path / "empty_array.json"))
    features = Features({"input": Value("string")})
    Dataset.from_dict({"input": []}, features=features).to_parquet(str(tmp_path / "empty.parquet"))
    with pytest.raises(ValueError, match=r"dataset '.*empty.parquet' is empty"):
        load_records(str(tmp_path / "empty.parquet"))
    (tmp_path / "nodata").mkdir()
    (tmp_path / "nodata" / "readme.md").write_text("hi")
    with pytest.raises(ValueError, match=r"holds no data files.*readme.md"):
        load_records(str(tmp_path / "nodata"))
    (tmp_path / "d.xml").write_text("<a/>")
    with pytest.raises(FileNotFoundError):  # unknown suffix that does not exist is a path error...
        load_records(str(tmp_path / "nope.parquet"))
    with pytest.raises(ValueError, match="suffix '.xml'"):  # ...and an existing one is a format error
        load_records(str(tmp_path / "d.xml"))


def test_blend_proportions_follow_probs(tmp_path):
    n = 400
    write_jsonl(tmp_path / "a.jsonl", [{"input": f"a{i}", "src": "a"} for i in range(n)])
    write_jsonl(tmp_path / "b.jsonl", [{"input": f"b{i}", "src": "b"} for i in range(n)])
    specs = [str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")]

    # first_exhausted: stops when 'a' (p=0.75) runs out -> about n/0.75 records, 75% from 'a'
    mixed = blend(specs, [0.75, 0.25], seed=0, stopping_strategy="first_exhausted")
    counts = collections.Counter(mixed["src"])
    frac_a = counts["a"] / len(mixed)
    assert abs(frac_a - 0.75) < 0.05, counts
    assert counts["a"] == n  # the first exhausted dataset is the likely one
    # all_exhausted (default): runs until 'b' is used up too; proportions still follow probs
    mixed = blend(specs, [3.0, 1.0], seed=0)  # unnormalised: same as 0.75/0.25
    counts = collections.Counter(mixed["src"])
    assert abs(counts["a"] / len(mixed) - 0.75) < 0.03, counts
    assert len(set(x for x, s in zip(mixed["input"], mixed["src"]) if s == "b")) == n
    # same seed -> same order; different seed -> different order
    again = blend(specs, [3.0, 1.0], seed=0)
    assert again["input"] == mixed["input"]
    assert blend(specs, [3.0, 1.0], seed=1)["input"] != mixed["input"]
    # no probs: concatenation in order; max_samples cuts each dataset
    cat = blend(specs, None, max_samples=10)
    assert cat["input"] == [f"a{i}" for i in range(10)] + [f"b{i}" for i in range(10)]


def test_blend_errors(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"input": "x"}])
    write_jsonl(tmp_path / "b.jsonl", [{"input": "y"}])
    write_jsonl(tmp_path / "c.jsonl", [{"question": "z"}])
    a, b, c = (str(tmp_path / f"{k}.jsonl") for k in "abc")
    with pytest.raises(ValueError) as e:
        blend([a, b], [0.5, 0.3, 0.2])
    msg = str(e.value)
    assert "--prompt_data names 2 dataset(s)" in msg and a in msg and b in msg
    assert "--prompt_data_probs has 3 value(s) (0.5,0.3,0.2)" in msg
    with pytest.raises(ValueError, match=r"--dataset_probs has 1 value"):
        blend([a, b], [1.0], flags=("--dataset", "--dataset_probs"))
    with pytest.raises(ValueError, match="must be positive"):
        blend([a, b], [1.0, 0.0])
    with pytest.raises(ValueError, match="must be positive"):
        blend([a, b], [1.0, -0.5])
    with pytest.raises(ValueError, match="same columns"):
        blend([a, c], [0.5, 0.5])
    assert split_specs(f" {a}, {b} ,") == [a, b]
    assert parse_probs("0.7, 0.3") == [0.7, 0.3] and parse_probs(None) is None
    with pytest.raises(ValueError, match="--prompt_data_probs='0.7,x'"):
        parse_probs("0.7,x")


# ---------------------------------------------------------------- prompts


def test_prompt_dataset_template_and_labels(tok):
    ds = PromptDataset(
        Dataset.from_list(ROWS), tok, input_key="input", label_key="label",
        input_template="Question: {}\nAnswer:", prompt_max_len=1000,
    )
    assert len(ds) == len(ROWS) and ds.num_truncated == 0
    for item, row in zip(ds.items, ROWS):
        assert item.prompt == f"Question: {row['input']}\nAnswer:"
        assert item.prompt_ids == tok(item.prompt, add_special_tokens=False)["input_ids"]
        assert item.label == row["label"] and item.datasource == "default"
    prompts, ids, labels = ds.batch(np.array([2, 0]))
    assert prompts == [ds[2].prompt, ds[0].prompt] and labels == ["4", "0"] and ids[1] == ds[0].prompt_ids
    # no label_key -> label None; list-of-dicts records work too
    ds = PromptDataset(ROWS, tok, input_key="input")
    assert ds[0].label is None and ds[0].prompt == ROWS[0]["input"]


def test_prompt_dataset_chat_template_string_and_messages(tok):
    records = [
        {"input": "hi"},
        {"input": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]},
    ]
    ds = PromptDataset(records, tok, input_key="input", apply_chat_template=True)
    assert ds[0].prompt == "<s><|user|>hi</s><|assistant|>"
    assert ds[1].prompt == "<s><|system|>be brief</s><|user|>hi</s><|assistant|>"
    assert ds[0].prompt_ids[0] == tok.bos_token_id  # written by the template, not added twice
    assert ds[0].prompt_ids.count(tok.bos_token_id) == 1
    # the same messages stored in an Arrow column (list of structs) read back as dicts
    arrow = PromptDataset(Dataset.from_list(records[1:]), tok, apply_chat_template=True)
    assert arrow[0].prompt == ds[1].prompt and arrow[0].prompt_ids == ds[1].prompt_ids


def test_prompt_left_truncation_keeps_the_end(tok):
    assert truncate_left([1, 2, 3, 4, 5], 3) == ([3, 4, 5], True)
    assert truncate_left([1, 2], 3) == ([1, 2], False)
    rows = [{"input": "abcdefghij"}, {"input": "abc"}, {"input": "klmnopqrstuv"}]
    ds = PromptDataset(rows, tok, input_key="input", prompt_max_len=4)
    assert ds.num_truncated == 2 and ds.max_prompt_tokens == 12
    assert tok.decode(ds[0].prompt_ids) == "ghij"
    assert tok.decode(ds[1].prompt_ids) == "abc"
    assert tok.decode(ds[2].prompt_ids) == "stuv"
    assert ds[0].prompt == "abcdefghij"  # the text stays whole
    too_long = r"row 0 of dataset x.jsonl: the prompt has 10 tokens, more than prompt_max_len=4"
    with pytest.raises(ValueError, match=too_long):
        PromptDataset(rows, tok, input_key="input", prompt_max_len=4, on_too_long="error", source="x.jsonl")


def test_prompt_dataset_errors(tok, tmp_path):
    src = str(write_jsonl(tmp_path / "p.jsonl", ROWS))
    records = load_records(src)
    with pytest.raises(KeyError, match=rf"key 'prompt' not in dataset {src}; available keys: \['input', 'label'\]"):
        PromptDataset(records, tok, input_key="prompt", source=src)
    with pytest.raises(KeyError, match=r"key 'answer' not in dataset .*available keys: \['input', 'label'\]"):
        PromptDataset(records, tok, input_key="input", label_key="answer", source=src)
    bad = [{"input": "ok"}, {"input": "ok"}, {"input": 17}]
    with pytest.raises(TypeError, match=r"row 2 of dataset bad: 'input' is int"):
        PromptDataset(bad, tok, source="bad")
    msgs = [{"input": [{"role": "user", "content": "hi"}]}]
    with pytest.raises(TypeError, match=r"row 0 .*'input' is list.*needs --apply_chat_template"):
        PromptDataset(msgs, tok, source="m")
    bad_msgs = [{"input": "fine"}, {"input": [{"role": "user", "text": "hi"}]}]
    with pytest.raises(TypeError, match=r"row 1 of dataset m: message 0 of 'input'"):
        PromptDataset(bad_msgs, tok, apply_chat_template=True, source="m")
    bad_label = [{"input": "a", "label": "1"}, {"input": "b", "label": ["x"]}]
    with pytest.raises(TypeError, match=r"row 1 of dataset l: label 'label' is list"):
        PromptDataset(bad_label, tok, label_key="label", source="l")
    assert PromptDataset([{"input": "a", "label": 3}], tok, label_key="label")[0].label == "3"
    with pytest.raises(ValueError, match="no '\\{\\}' placeholder"):
        PromptDataset(ROWS, tok, input_template="Question:")
    no_template = build_tiny_tokenizer(tmp_path / "nt", ["a"], chat_template=None)
    with pytest.raises(ValueError, match="has no chat_template"):
        PromptDataset(ROWS, no_template, apply_chat_template=True)
    with pytest.raises(ValueError, match="must be 'truncate' or 'error'"):
        PromptDataset(ROWS, tok, on_too_long="cut")


# ---------------------------------------------------------------- padding


def test_left_and_right_pad_against_hand_built_arrays():
    seqs = [[5, 6, 7], [8], []]
    ids, mask = left_pad(seqs, 0)
    np.testing.assert_array_equal(ids, [[5, 6, 7], [0, 0, 8], [0, 0, 0]])
    np.testing.assert_array_equal(mask, [[1, 1, 1], [0, 0, 1], [0, 0, 0]])
    assert ids.dtype == np.int32 and mask.dtype == np.int32
    ids, mask = right_pad(seqs, 9, length=5)
    np.testing.assert_array_equal(ids, [[5, 6, 7, 9, 9], [8, 9, 9, 9, 9], [9, 9, 9, 9, 9]])
    np.testing.assert_array_equal(mask, [[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [0, 0, 0, 0, 0]])
    ids, mask = left_pad([[1, 2, 3, 4, 5]], 0, multiple_of=4)
    np.testing.assert_array_equal(ids, [[0, 0, 0, 1, 2, 3, 4, 5]])
    np.testing.assert_array_equal(mask, [[0, 0, 0, 1, 1, 1, 1, 1]])
    ids, _ = right_pad([[1, 2]], 0, length=3, multiple_of=4)
    np.testing.assert_array_equal(ids, [[1, 2, 0, 0]])
    with pytest.raises(ValueError, match="sequence 1 has 4 tokens, more than length=3"):
        left_pad([[1], [1, 2, 3, 4]], 0, length=3)


# ---------------------------------------------------------------- batch order


def collect(it, n):
    return [it.next_batch().tolist() for _ in range(n)]


@pytest.mark.parametrize("drop_last", [True, False])
def test_batch_iterator_resume_equals_uninterrupted(drop_last):
    n_items, bs, seed = 23, 4, 7
    full = BatchIterator(n_items, bs, seed=seed, drop_last=drop_last)
    per_epoch = 5 if drop_last else 6
    assert len(full) == per_epoch
    reference = collect(full, 3 * per_epoch + 2)
    for stop in [0, 1, per_epoch - 1, per_epoch, per_epoch + 3, 2 * per_epoch + 1]:
        first = BatchIterator(n_items, bs, seed=seed, drop_last=drop_last)
        head = collect(first, stop)
        state = json.loads(json.dumps(first.state()))  # survives a checkpoint file
        resumed = BatchIterator.from_state(state, n_items, bs, seed=seed, drop_last=drop_last)
        tail = collect(resumed, len(reference) - stop)
        assert head + tail == reference, stop
    # each epoch is a permutation (drop_last: the dropped tail differs per epoch)
    epoch0 = sum(reference[:per_epoch], [])
    assert len(set(epoch0)) == len(epoch0) == (20 if drop_last else 23)
    assert reference[:per_epoch] != reference[per_epoch : 2 * per_epoch]
    # the generator form: `for batch in it` walks the rest of the epoch, then the next loop the next epoch
    it = BatchIterator(n_items, bs, seed=seed, drop_last=drop_last)
    it.next_batch()
    assert [b.tolist() for b in it] == reference[1:per_epoch]
    assert it.state() == {"epoch": 1, "index": 0}
    assert [b.tolist() for b in it] == reference[per_epoch : 2 * per_epoch]


def test_batch_iterator_order_and_state_checks():
    it = BatchIterator(10, 5, seed=3, shuffle=False)
    assert collect(it, 3) == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9], [0, 1, 2, 3, 4]]
    # the order of epoch e is default_rng([seed, e]).permutation(N), a reference no one here wrote
    it = BatchIterator(10, 5, seed=3)
    assert sum(collect(it, 4), []) == (
        np.random.default_rng([3, 0]).permutation(10).tolist() + np.random.default_rng([3, 1]).permutation(10).tolist()
    )
    with pytest.raises(ValueError, match="epoch has 2 batches .*dataset or batch size changed"):
        it.load_state({"epoch": 0, "index": 2})
    with pytest.raises(KeyError, match="lacks"):
        it.load_state({"epoch": 0})
    with pytest.raises(ValueError, match="fewer than one batch"):
        BatchIterator(3, 8, seed=0)
    with pytest.raises(ValueError, match="does not split over 3 processes"):
        BatchIterator(100, 8, seed=0, process_index=0, process_count=3)


def test_per_process_slices_partition_the_global_batch():
    n_items, bs, procs = 50, 8, 4
    glob = BatchIterator(n_items, bs, seed=11)
    locs = [BatchIterator(n_items, bs, seed=11, process_index=p, process_count=procs) for p in range(procs)]
    for step in range(15):  # crosses epochs (6 batches per epoch)
        g = glob.next_batch()
        parts = [it.next_batch() for it in locs]
        assert all(len(p) == bs // procs for p in parts)
        np.testing.assert_array_equal(np.concatenate(parts), g)
        assert len(set(np.concatenate(parts).tolist())) == bs
        assert all(it.state() == glob.state() for it in locs)
    # resume per process too
    resumed = BatchIterator.from_state(locs[2].state(), n_items, bs, seed=11, process_index=2, process_count=procs)
    assert resumed.next_batch().tolist() == locs[2].next_batch().tolist()


# ---------------------------------------------------------------- sources: row types, held-out split


def test_json_rows_that_are_not_objects_are_named(tmp_path):
    (tmp_path / "strings.json").write_text('["a", "b"]')  # `datasets` alone would read this as a "text" column
    with pytest.raises(ValueError, match=r"record 0 is a str \('a'\), not a JSON object"):
        load_records(str(tmp_path / "strings.json"))
    (tmp_path / "mixed.jsonl").write_text('{"input": "a"}\n\n[1, 2]\n')
    with pytest.raises(ValueError, match=r"line 3 is a list \('\[1, 2\]'\), not a JSON object"):
        load_records(str(tmp_path / "mixed.jsonl"))
    (tmp_path / "broken.jsonl").write_text('{"input": "a"}\n{"input": "b"\n')
    with pytest.raises(ValueError, match=r"line 2 is not valid JSON"):
        load_records(str(tmp_path / "broken.jsonl"))
    (tmp_path / "text.jsonl").write_text('{"text": "a"}\n{"text": "b"}\n')  # a real "text" column is fine
    assert load_records(str(tmp_path / "text.jsonl"))["text"] == ["a", "b"]


def test_holdout_split_is_disjoint_seeded_and_ordered():
    from jaxrlhf.data.sources import holdout_split

    ds = Dataset.from_list([{"i": i} for i in range(10)])
    train, ev = (list(part["i"]) for part in holdout_split(ds, 0.3, seed=5))
    assert len(ev) == 3 and len(train) == 7
    assert sorted(train + ev) == list(range(10))
    assert train == sorted(train) and ev == sorted(ev)  # original order kept
    assert list(holdout_split(ds, 0.3, seed=5)[1]["i"]) == ev
    assert any(list(holdout_split(ds, 0.3, seed=s)[1]["i"]) != ev for s in range(6, 10))
    with pytest.raises(ValueError, match=r"in \(0, 1\)"):
        holdout_split(ds, 0.0)
    with pytest.raises(ValueError, match="leaves none to train on"):
        holdout_split(Dataset.from_list([{"i": 0}]), 0.5)


# ---------------------------------------------------------------- SFT samples


def ids_of(tok, *texts):
    return [i for t in texts for i in tok(t, add_special_tokens=False)["input_ids"]]


def test_sft_multiturn_chat_template_masks_exactly_the_assistant_tokens(tok):
    from jaxrlhf.data.sft import SFTDataset

    conv = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"}, {"role": "user", "content": "what is 2 plus 2?"},
            {"role": "assistant", "content": "4"}]
    # What the default tiny template renders, written out by hand, split into context / assistant parts.
    context1 = "<s><|system|>be brief</s><|user|>hi</s><|assistant|>"
    context2 = "<|user|>what is 2 plus 2?</s><|assistant|>"
    expected_ids = ids_of(tok, context1, "hello</s>", context2, "4</s>")
    expected_mask = ([0] * len(ids_of(tok, context1)) + [1] * len(ids_of(tok, "hello</s>"))
                     + [0] * len(ids_of(tok, context2)) + [1] * len(ids_of(tok, "4</s>")))
    assert expected_ids == ids_of(tok, context1 + "hello</s>" + context2 + "4</s>")  # pieces == whole text
    for records, kw in [([{"conv": conv}], {}),
                        ([{"conv": conv[:-1], "answer": conv[-1]}], {"output_key": "answer"}),
                        (Dataset.from_list([{"conv": conv}]), {})]:  # Arrow list-of-struct column
        s = SFTDataset(records, tok, input_key="conv", apply_chat_template=True, multiturn=True, max_len=200, **kw)[0]
        assert s.input_ids == expected_ids and s.loss_mask == expected_mask
        learned = tok.decode([i for i, m in zip(s.input_ids, s.loss_mask) if m])
        assert learned == "hello</s>4</s>"
    # a conversation ending with a user turn: that tail is context, and it already ends with EOS
    s = SFTDataset([{"conv": conv + [{"role": "user", "content": "bye"}]}], tok, input_key="conv",
                   apply_chat_template=True, multiturn=True)[0]
    assert s.input_ids == expected_ids + ids_of(tok, "<|user|>bye</s>")
    assert s.loss_mask == expected_mask + [0] * len(ids_of(tok, "<|user|>bye</s>"))


def test_sft_single_turn_chat_template_and_custom_template(tok):
    from jaxrlhf.data.sft import SFTDataset

    ds = SFTDataset([{"q": "hi", "a": "yo"}], tok, input_key="q", output_key="a", apply_chat_template=True)
    s = ds[0]
    prompt = "<s><|user|>hi</s><|assistant|>"
    assert s.input_ids == ids_of(tok, prompt, "yo</s>")
    assert s.loss_mask == [0] * len(ids_of(tok, prompt)) + [1] * 3
    # the whole conversation in one field: the last assistant message is the response
    conv = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    assert SFTDataset([{"q": conv}], tok, input_key="q", apply_chat_template=True)[0] == s
    # a template whose turns end "<|end|>\n" (no EOS): the newline is stripped, EOS appended and learned
    t = copy_tokenizer(tok)
    t.chat_template = ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
                       "{% if add_generation_prompt %}[assistant] {% endif %}")
    s = SFTDataset([{"q": "hi", "a": "yo"}], t, input_key="q", output_key="a", apply_chat_template=True)[0]
    assert s.input_ids == ids_of(t, "[user] hi\n[assistant] ", "yo") + [t.eos_token_id]
    assert sum(s.loss_mask) == 3 and s.loss_mask[-3:] == [1, 1, 1]


def copy_tokenizer(tok):
    import copy

    return copy.deepcopy(tok)


def test_sft_plain_eos_truncation_and_drops_are_counted(tok):
    from jaxrlhf.data.sft import SFTDataset

    rows = [
        {"input": "ab", "output": "cdefgh"},   # 8 + EOS = 9 tokens > 6: truncated, EOS kept
        {"input": "abc", "output": "xy</s>"},  # ends with EOS already: not doubled
        {"input": "abcd", "output": "x"},      # the first learned token at 4 >= max_len - 2: dropped
        {"input": "ab", "output": ""},         # nothing to learn: dropped
    ]
    ds = SFTDataset(rows, tok, input_key="input", output_key="output", max_len=6, source="d")
    assert len(ds) == 2 and ds.num_records == 4
    assert (ds.num_truncated, ds.num_dropped_too_long, ds.num_dropped_empty) == (1, 1, 1)
    assert ds[0].input_ids == ids_of(tok, "abcde") + [tok.eos_token_id] and ds[0].loss_mask == [0, 0, 1, 1, 1, 1]
    assert ds[1].input_ids == ids_of(tok, "abcxy</s>") and ds[1].loss_mask == [0, 0, 0, 1, 1, 1]
    assert "2 of 4 records kept; 1 dropped (the prompt fills --max_len 6 - 2), 1 dropped (nothing to learn" in \
        ds.summary() and "1 truncated" in ds.summary()
    b = ds.batch([1, 0])
    assert b["input_ids"].shape == (2, 6) and b["num_tokens"] == 7  # seq_len: longest (6) rounded up to 8, capped
    np.testing.assert_array_equal(b["loss_mask"][0], [0, 0, 0, 1, 1, 1])
    np.testing.assert_array_equal(b["attention_mask"], np.ones((2, 6)))
    # --input_template wraps the prompt, which is never learned
    ds = SFTDataset([{"input": "hi", "output": "yo"}], tok, output_key="output", input_template="Q: {} A: ")
    assert tok.decode(ds[0].input_ids) == "Q: hi A: yo</s>"
    assert ds[0].loss_mask == [0] * len("Q: hi A: ") + [1, 1, 1]
    padded = ds.batch([0])
    assert padded["input_ids"].shape == (1, 16) and padded["attention_mask"].sum() == 12


def test_recipe_rows_train_with_the_default_keys(tok):
    """batch_inference's rs/csft rows ({input, output} strings) and iter_dpo rows ({prompt, chosen, rejected}
    strings) read with the trainers' default (None) keys equal the explicit keys; conversations keep the old
    meaning of the None key (the response is the conversation's last message)."""
    from jaxrlhf.data.preference import PairedDataset
    from jaxrlhf.data.sft import SFTDataset

    rows = [{"prompt_index": 0, "input": "ab", "output": "cd", "reward": 1.0},
            {"prompt_index": 1, "input": "abc", "output": "x", "reward": 0.5}]
    implicit, explicit = SFTDataset(rows, tok), SFTDataset(rows, tok, output_key="output")
    assert [s.input_ids for s in implicit.samples] == [s.input_ids for s in explicit.samples]
    assert [s.loss_mask for s in implicit.samples] == [s.loss_mask for s in explicit.samples]
    assert implicit.implicit_key == "output" and explicit.implicit_key is None
    assert "responses from the 'output' field (no --output_key given)" in implicit.summary()
    with pytest.raises(ValueError, match="--output_key is required"):  # one row without it: no guessing
        SFTDataset(rows + [{"input": "a", "out": "b"}], tok)

    pairs = [{"prompt": "ab", "chosen": "cd", "rejected": "x"}, {"prompt": "b", "chosen": "e", "rejected": "fg"}]
    implicit, explicit = PairedDataset(pairs, tok), PairedDataset(pairs, tok, prompt_key="prompt")
    np.testing.assert_array_equal(implicit.batch([0, 1])["chosen_loss_mask"], explicit.batch([0, 1])["chosen_loss_mask"])
    np.testing.assert_array_equal(implicit.batch([0, 1])["rejected_input_ids"],
                                  explicit.batch([0, 1])["rejected_input_ids"])
    assert "prompts from the 'prompt' field (no --prompt_key given)" in implicit.summary()
    convs = [{"prompt": "hi", "chosen": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
              "rejected": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "no"}]}]
    assert PairedDataset(convs, tok, apply_chat_template=True).implicit_key is None  # UltraFeedback-style rows


def test_sft_pretrain_mode_learns_every_token(tok):
    from jaxrlhf.data.sft import SFTDataset

    ds = SFTDataset([{"text": "abc"}, {"text": "abcdefgh"}, {"text": ""}], tok, input_key="text",
                    pretrain_mode=True, max_len=5)
    assert ds[0].input_ids == ids_of(tok, "abc") + [tok.eos_token_id] and ds[0].loss_mask == [0, 1, 1, 1]
    assert ds[1].input_ids == ids_of(tok, "abcd") + [tok.eos_token_id] and ds[1].loss_mask == [0, 1, 1, 1, 1]
    assert (ds.num_truncated, ds.num_dropped_too_long, ds.num_dropped_empty) == (1, 0, 1)


def test_sft_dataset_errors(tok, tmp_path):
    from jaxrlhf.data.sft import SFTDataset

    src = str(write_jsonl(tmp_path / "p.jsonl", ROWS))
    records = load_records(src)
    with pytest.raises(KeyError, match=r"--output_key 'answer' is not a field of dataset .*available keys: "
                                       r"\['input', 'label'\]"):
        SFTDataset(records, tok, output_key="answer", source=src)
    with pytest.raises(ValueError, match="--output_key is required"):
        SFTDataset(records, tok)
    with pytest.raises(ValueError, match="--multiturn needs --apply_chat_template"):
        SFTDataset(records, tok, multiturn=True)
    with pytest.raises(ValueError, match="--pretrain_mode trains on the raw"):
        SFTDataset(records, tok, pretrain_mode=True, output_key="label")
    with pytest.raises(ValueError, match=r"row 1 of dataset b: 'output' is list .*The record: "):
        SFTDataset([{"input": "a", "output": "b"}, {"input": "a", "output": ["b"]}], tok, output_key="output",
                   source="b")
    with pytest.raises(ValueError, match=r"row 0 of dataset m: message 1 of 'c' is"):
        SFTDataset([{"c": [{"role": "user", "content": "a"}, {"role": "assistant", "text": "b"}]}], tok,
                   input_key="c", apply_chat_template=True, multiturn=True, source="m")
    with pytest.raises(ValueError, match=r"must end with an assistant message .*\['user'\]"):
        SFTDataset([{"c": [{"role": "user", "content": "a"}]}], tok, input_key="c", apply_chat_template=True)
    odd = copy_tokenizer(tok)  # the generation prompt is not how the assistant turn starts
    odd.chat_template = ("{% for m in messages %}{{ m['content'] }}{% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    with pytest.raises(ValueError, match="renders the prompt differently"):
        SFTDataset([{"q": "hi", "a": "yo"}], odd, input_key="q", output_key="a", apply_chat_template=True)
    with pytest.raises(ValueError, match=r"no usable samples in dataset x: 0 of 1 records kept"):
        SFTDataset([{"input": "abcdef", "output": "g"}], tok, output_key="output", max_len=4, source="x")
    with pytest.raises(ValueError, match="is empty"):
        SFTDataset([], tok, output_key="output")


def test_bucket_length():
    assert [bucket_length(n, 100) for n in (0, 1, 16, 17, 25, 33, 64, 65, 97, 100)] == \
        [16, 16, 16, 24, 32, 48, 64, 96, 100, 100]
    assert bucket_length(5, 8) == 8 and bucket_length(3, 1024, (4, 12)) == 4 and bucket_length(13, 1024, (4, 12)) == 1024
    assert bucket_length(3, 64, ()) == 64  # no buckets: always the maximum
    with pytest.raises(ValueError, match="does not fit the maximum length 8"):
        bucket_length(9, 8)
