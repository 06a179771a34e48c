"""A terminal chat with a model: ``python -m jaxrlhf.interactive_chat --pretrain DIR [flags]`` (an HF directory or a
converted checkpoint).

Each turn the conversation so far is rendered with the tokenizer's chat template (``--tokenizer_chat_template``
replaces it; a tokenizer without one uses ``--input_template`` per user turn, the replies appended as they are), its
last ``--max_len - --max_new_tokens`` tokens kept, and the reply is sampled token by token with a KV cache and
printed as it comes (``--temperature`` 0: greedy; ``--top_p``, ``--top_k``). Commands: ``/reset`` clears the
history, ``/exit`` (or end of input) quits. Reads stdin, so it can be piped: ``printf 'hi\\n/exit\\n' | python -m
jaxrlhf.interactive_chat --pretrain DIR``.

Decoding: one jitted prefill of the left-padded prompt (padded to a bucket length: few compiles as the history
grows) into a cache of ``bucket + --max_new_tokens`` slots, then one jitted step per token; token t is sampled
with ``jax_sampler.sample_tokens`` (the rollout sampler's math) from the key ``fold_in(fold_in(seed, turn), t)``.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Callable, Optional

from jaxrlhf.cli import arg, parse_config


@dataclass
class ChatConfig:
    pretrain: str = arg(None, "HF model directory or converted checkpoint to chat with")
    max_new_tokens: int = arg(512, "most tokens per reply")
    temperature: float = arg(0.7, "sampling temperature (0: greedy)")
    top_p: float = arg(0.9, "nucleus sampling (1: off)")
    top_k: int = arg(-1, "top-k sampling (-1: off)")
    max_len: int = arg(2048, "most tokens of history + reply (the oldest history tokens are dropped)")
    system_prompt: Optional[str] = arg(None, "a system message opening the conversation (chat template only)")
    tokenizer_chat_template: Optional[str] = arg(None, "Jinja chat template replacing the tokenizer's own")
    input_template: str = arg("User: {}\nAssistant: ", "without a chat template: how a user turn is written")
    bf16: bool = arg(False, "bf16 weights and compute")
    seed: int = arg(0, "sampling seed")

    def __post_init__(self):
        if not self.pretrain:
            raise ValueError("--pretrain is required: the model directory to chat with")
        if self.max_new_tokens < 1 or self.max_len <= self.max_new_tokens:
            raise ValueError(f"need --max_new_tokens >= 1 and --max_len > --max_new_tokens, got "
                             f"{self.max_new_tokens} and {self.max_len}")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"need --temperature >= 0 and --top_p in (0, 1], got {self.temperature}, {self.top_p}")
        if "{}" not in self.input_template:
            raise ValueError(f"--input_template {self.input_template!r} has no '{{}}' placeholder")


class Chat:
    """Token-by-token replies of ``model`` (a causal-LM ``Decoder``) to a conversation (module docstring)."""

    def __init__(self, model, tokenizer, *, max_new_tokens: int, temperature: float, top_p: float, top_k: int,
                 max_len: int, seed: int = 0, input_template: str = "User: {}\nAssistant: "):
        import jax
        import jax.numpy as jnp
        from flax import nnx

        from jaxrlhf.models.decoder import default_positions, init_cache
        from jaxrlhf.rollout.jax_sampler import sample_tokens

        self.tokenizer, self.max_new_tokens, self.max_len = tokenizer, max_new_tokens, max_len
        self.input_template, self.seed, self.turn = input_template, seed, 0
        self.stop = tokenizer.eos_token_id
        graphdef, state = nnx.split(model)
        self.params, cfg = state.to_pure_dict(), model.cfg
        cache_dtype = jax.tree_util.tree_leaves(self.params)[0].dtype
        greedy = temperature == 0

        def pick(logits_bv, key):
            keys = key[None]
            return sample_tokens(logits_bv, keys, greedy=greedy, temperature=temperature, top_k=top_k,
                                 top_p=None if greedy or top_p >= 1 else top_p)[0]

        def prefill(params, ids_bp, mask_bp, key):
            m = nnx.merge(graphdef, params)
            cache = init_cache(cfg, 1, ids_bp.shape[1] + max_new_tokens, cache_dtype)
            h, cache = m.hidden_states(ids_bp, mask_bp, default_positions(mask_bp), cache)
            return pick(m.logits(h[:, -1:])[:, 0], key), cache

        def step(params, tok_b, pos_b, cache, key):
            logits, cache = nnx.merge(graphdef, params).decode(tok_b[:, None], jnp.ones((1, 1), jnp.int32),
                                                               pos_b[:, None], cache)
            return pick(logits[:, 0], key), cache

        self._prefill, self._step = jax.jit(prefill), jax.jit(step, donate_argnums=(3,))

    def prompt_ids(self, history: list[dict]) -> list[int]:
        """The conversation as prompt tokens (chat template, or ``input_template`` per user turn), its last
        ``max_len - max_new_tokens`` kept."""
        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            text = tok.apply_chat_template(history, tokenize=False, add_generation_prompt=True)
        else:
            text = "".join(self.input_template.format(m["content"]) if m["role"] == "user" else m["content"] + "\n"
                           for m in history if m["role"] != "system")
        ids = tok(text, add_special_tokens=False)["input_ids"]
        return ids[-(self.max_len - self.max_new_tokens):]

    def reply(self, history: list[dict], on_text: Callable[[str], None] = lambda s: None) -> tuple[str, list[int]]:
        """``(reply text, its token ids)`` to ``history``; ``on_text`` gets each new piece of text as it is
        sampled (a piece ending in half a UTF-8 character waits for the rest)."""
        import jax
        import numpy as np

        from jaxrlhf.data.loader import bucket_length, left_pad

        prompt = self.prompt_ids(history)
        ids, mask = left_pad([prompt], self.tokenizer.pad_token_id,
                             length=bucket_length(len(prompt), self.max_len - self.max_new_tokens))
        base = jax.random.fold_in(jax.random.key(self.seed), self.turn)
        self.turn += 1
        tok, cache = self._prefill(self.params, ids, mask, jax.random.fold_in(base, 0))
        out, shown = [], ""
        for t in range(self.max_new_tokens):
            token = int(tok[0])
            if token == self.stop:
                break
            out.append(token)
            text = self.tokenizer.decode(out, skip_special_tokens=True)
            if not text.endswith("\ufffd"):
                on_text(text[len(shown):])
                shown = text
            if t + 1 < self.max_new_tokens:
                tok, cache = self._step(self.params, tok, np.array([len(prompt) + t], np.int32), cache,
                                        jax.random.fold_in(base, t + 1))
        return self.tokenizer.decode(out, skip_special_tokens=True), out


def main(cfg: ChatConfig, stdin=None, stdout=None) -> int:
    """The chat loop over ``stdin`` / ``stdout`` (default: the terminal); returns the number of replies."""
    import jax.numpy as jnp

    from jaxrlhf.data.tokenizer import load_tokenizer
    from jaxrlhf.models import from_pretrained

    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    tokenizer = load_tokenizer(cfg.pretrain)
    if cfg.tokenizer_chat_template:
        tokenizer.chat_template = cfg.tokenizer_chat_template
    model = from_pretrained(cfg.pretrain, dtype=jnp.bfloat16 if cfg.bf16 else jnp.float32, head="lm")
    chat = Chat(model, tokenizer, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                top_k=cfg.top_k, max_len=cfg.max_len, seed=cfg.seed, input_template=cfg.input_template)
    opening = [{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt else []
    history, replies = list(opening), 0
    print(f"[chat] {cfg.pretrain}: type a message; /reset clears the history, /exit quits", file=sys.stderr)
    while True:
        stdout.write("> ")
        stdout.flush()
        line = stdin.readline()
        if not line or line.strip() == "/exit":
            break
        if line.strip() == "/reset":
            history = list(opening)
            stdout.write("[history cleared]\n")
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line.rstrip("\n")})

        def show(piece: str) -> None:
            stdout.write(piece)
            stdout.flush()

        text, _ = chat.reply(history, show)
        stdout.write("\n")
        history.append({"role": "assistant", "content": text})
        replies += 1
    stdout.write("\n")
    return replies


def cli(argv: list[str] | None = None) -> int:
    from jaxrlhf.cli import report_errors

    cfg = parse_config(ChatConfig, argv, prog="python -m jaxrlhf.interactive_chat")
    return 2 if report_errors(main, cfg, (ValueError, KeyError, OSError)) is None else 0


if __name__ == "__main__":
    sys.exit(cli())
