"""interactive_chat: greedy streamed replies equal the JAX sampler's greedy samples (cached decode, one token at a
time), the loop driven through stdin (/reset, /exit, history), on an HF directory and on a converted checkpoint."""
import subprocess
import sys

import pytest

from jaxrlhf.interactive_chat import Chat, ChatConfig, main

TEMPLATE = ("{% for m in messages %}{{ m['content'] }}{% if m['role'] == 'user' %}={% else %}+{% endif %}"
            "{% endfor %}")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from jaxrlhf.data.tokenizer import build_tiny_tokenizer
    from jaxrlhf.demo import CHARS, save_tiny_llama

    path = str(tmp_path_factory.mktemp("chat") / "model")
    save_tiny_llama(path, build_tiny_tokenizer(path, CHARS), seed=0)
    return path


def test_streamed_greedy_reply_equals_the_jax_sampler(model_dir):
    from jaxrlhf.data.tokenizer import load_tokenizer
    from jaxrlhf.models import from_pretrained
    from jaxrlhf.rollout import JaxSampler, SamplingParams

    tok = load_tokenizer(model_dir)
    model = from_pretrained(model_dir)
    chat = Chat(model, tok, max_new_tokens=6, temperature=0.0, top_p=1.0, top_k=-1, max_len=40,
                input_template="{}=")
    history = [{"role": "user", "content": "12+3"}, {"role": "assistant", "content": "15"},
               {"role": "user", "content": "4+4"}]
    prompt = chat.prompt_ids(history)
    assert prompt == tok(tok.apply_chat_template(history, tokenize=False, add_generation_prompt=True),
                         add_special_tokens=False)["input_ids"]
    template, tok.chat_template = tok.chat_template, None  # without one: --input_template per user turn
    assert tok.decode(chat.prompt_ids(history)) == "12+3=15<unk>4+4="  # (no newline in the tiny vocabulary)
    tok.chat_template = template
    pieces = []
    text, ids = chat.reply(history, pieces.append)
    sampler = JaxSampler(model, pad_token_id=tok.pad_token_id, eos_token_ids=[tok.eos_token_id], max_prompt_len=40)
    want = sampler.generate([prompt], SamplingParams(temperature=0.0, max_tokens=6))[0].token_ids
    assert ids == [t for t in want if t != tok.eos_token_id] and "".join(pieces) == text
    sampled = Chat(model, tok, max_new_tokens=6, temperature=1.0, top_p=0.9, top_k=5, max_len=40, seed=1)
    assert len(sampled.reply(history)[1]) <= 6


def test_chat_loop_from_stdin_on_a_converted_checkpoint(model_dir, tmp_path):
    import io

    from converters.hf import is_flax_checkpoint

    flax_dir = str(tmp_path / "flax")
    subprocess.run([sys.executable, "-m", "converters", "hf-to-flax", model_dir, flax_dir], check=True,
                   capture_output=True)
    assert is_flax_checkpoint(flax_dir)
    out = io.StringIO()
    replies = main(ChatConfig(pretrain=flax_dir, max_new_tokens=3, temperature=0.0, max_len=32,
                              tokenizer_chat_template=TEMPLATE),
                   stdin=io.StringIO("1+1\n\n2+2\n/reset\n3+3\n/exit\nnot read\n"), stdout=out)
    assert replies == 3
    text = out.getvalue()
    assert text.count("> ") == 6 and "[history cleared]" in text


def test_piped_stdin_through_the_command_line(model_dir):
    run = subprocess.run([sys.executable, "-m", "jaxrlhf.interactive_chat", "--pretrain", model_dir,
                          "--max_new_tokens", "3", "--temperature", "0"], input="1+1\n", capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("> ") and run.stdout.count("> ") == 2  # one reply, then end of input
    bad = subprocess.run([sys.executable, "-m", "jaxrlhf.interactive_chat", "--pretrain", model_dir + "-missing"],
                         input="", capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("error: ")
