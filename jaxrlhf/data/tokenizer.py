"""Tokenizers: load any Hugging Face tokenizer directory, or build a tiny one locally for tests and demos.

The tiny tokenizer is a `tokenizers` WordLevel model over a caller-given list of symbols (single characters,
whole words, or a mix):

- vocabulary, in id order: `<pad>`=0, `<s>`=1, `</s>`=2, `<unk>`=3, then the symbols in the order given
  (duplicates dropped), then the chat role markers `<|system|>`, `<|user|>`, `<|assistant|>`;
- pre-tokenizer: a regex `Split` that cuts text into the given symbols (longest symbol first, so "hello" wins over
  "h"); any stretch of text between matches becomes a single `<unk>`;
- decoder: `Fuse` (tokens are concatenated with nothing between them), so
  `decode(encode(text)) == text` for any text made only of the given symbols. Whitespace is NOT implicit: include
  " " (and "\\n") in the symbols when the text contains them;
- no post-processor: `tokenizer(text)` adds no BOS/EOS (the chat template writes `<s>`/`</s>` itself).

The default chat template renders
`<s><|user|>...</s><|assistant|>...</s>` (every turn closed by the EOS token) and, with
`add_generation_prompt=True`, ends with `<|assistant|>` so the model continues with the reply.
"""
from __future__ import annotations

import os
import string
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, BOS, EOS, UNK)  # ids 0, 1, 2, 3
ROLE_TOKENS: tuple[str, ...] = ("<|system|>", "<|user|>", "<|assistant|>")

# Printable ASCII (letters, digits, punctuation, space, newline): a convenient symbol set for demos.
DEFAULT_CHARS: tuple[str, ...] = tuple(string.ascii_letters + string.digits + string.punctuation + " \n")

DEFAULT_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>{{ message['content'] }}{{ eos_token }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

# Files whose presence marks a directory as holding a Hugging Face tokenizer.
TOKENIZER_FILES: tuple[str, ...] = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "spiece.model",
)


def _symbols_regex(symbols: list[str]) -> str:
    """Alternation of the symbols, longest first, every character written as `\\x{hex}` (no escaping pitfalls)."""
    ordered = sorted(symbols, key=len, reverse=True)  # Oniguruma alternation is leftmost-first: longest wins
    return "|".join("".join(f"\\x{{{ord(c):x}}}" for c in s) for s in ordered)


def build_tiny_tokenizer(
    out_dir: str | os.PathLike,
    words_or_chars: list[str] | tuple[str, ...],
    *,
    chat_template: str | None = DEFAULT_CHAT_TEMPLATE,
) -> PreTrainedTokenizerBase:
    """Build a WordLevel tokenizer over `words_or_chars`, save it to `out_dir`, and return it loaded back.

    `out_dir` then loads offline with `transformers.AutoTokenizer.from_pretrained(out_dir)`. Pass
    `chat_template=None` for a tokenizer without a chat template. See the module docstring for the vocabulary
    layout (pad id 0) and the encode/decode rules.
    """
    symbols: list[str] = []
    for s in words_or_chars:
        if not isinstance(s, str) or s == "":
            raise ValueError(f"tokenizer symbols must be non-empty strings, got {s!r}")
        if s in SPECIAL_TOKENS or s in ROLE_TOKENS:
            raise ValueError(f"symbol {s!r} is reserved (special tokens {SPECIAL_TOKENS}, role markers {ROLE_TOKENS})")
        if s not in symbols:
            symbols.append(s)
    if not symbols:
        raise ValueError("build_tiny_tokenizer needs at least one symbol, e.g. list(DEFAULT_CHARS)")

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for s in symbols:
        vocab[s] = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(_symbols_regex(symbols)), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(list(SPECIAL_TOKENS) + list(ROLE_TOKENS))  # role markers get the next ids

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=PAD,
        model_max_length=1 << 30,
    )
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(out))
    return load_tokenizer(out)


def looks_local(name: str) -> bool:
    """A model name that can only mean a local path (``/x``, ``./x``, ``~/x``, ``a/b/c``): never tried on the hub."""
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or (os.sep != "/" and os.sep in name)


def load_tokenizer(path: str | os.PathLike) -> PreTrainedTokenizerBase:
    """`AutoTokenizer.from_pretrained(path, trust_remote_code=False)`; pad_token := eos_token when it has none.

    `path` is a local directory (an HF model or tokenizer folder) or, where the hub or its cache is reachable, a
    hub model name. Setting the pad token to the EOS token mirrors OpenRLHF's get_tokenizer.
    """
    p = Path(path).expanduser()
    if not p.exists() and looks_local(str(path)):
        raise FileNotFoundError(f"'{path}' does not exist (resolved to {p.resolve()}): a path is only looked up "
                                "locally; check it, or pass a hub model name like org/name")
    if p.is_dir():
        if not any((p / name).exists() for name in TOKENIZER_FILES):
            found = sorted(x.name for x in p.iterdir())[:20]
            raise FileNotFoundError(
                f"no tokenizer in directory '{p}': expected one of {list(TOKENIZER_FILES)}, found {found}. "
                "Point the flag at a Hugging Face model directory that includes its tokenizer, or write one there "
                "with tokenizer.save_pretrained(dir)."
            )
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(p) if p.is_dir() else str(path), trust_remote_code=False)
    except Exception as e:  # noqa: BLE001 (transformers raises many types, e.g. for a config.json value's type)
        where = (
            f"the directory '{p}'"
            if p.is_dir()
            else f"'{path}' (not a local directory: {p.resolve()} does not exist, so it was tried as a hub name)"
        )
        detail = " ".join(str(e).split())  # one line: some of transformers' messages span several
        raise OSError(f"could not load a tokenizer from {where}: {type(e).__name__}: {detail}") from e
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(
                f"tokenizer at '{path}' has neither a pad token nor an EOS token; set one in its tokenizer_config.json"
            )
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
