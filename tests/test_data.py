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

from jaxrlhf.data.loader import BatchIterator, left_pad, right_pad
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
