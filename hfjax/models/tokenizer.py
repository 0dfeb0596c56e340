"""Tokenizers from a local HF folder or from a GGUF file's metadata, offline.

`load_tokenizer(path)`:
  - a folder with tokenizer files -> `AutoTokenizer.from_pretrained(path, local_files_only=True)`;
  - a `.gguf` file -> a fast tokenizer rebuilt from the metadata llama.cpp stores
    (`tokenizer.ggml.tokens/merges/token_type`, special ids, `tokenizer.chat_template`).

transformers can read GGUF tokenizers too (`from_pretrained(dir, gguf_file=...)`), but its GGUF
reader imports torch, which hfjax never depends on; so the byte-level BPE case (GPT-2 style:
SmolLM2, Llama 3, Qwen2) is rebuilt here with the `tokenizers` library, pre-tokenizing as
llama.cpp does for the file's `tokenizer.ggml.pre` (for SmolLM2: single digits, then GPT-2's
byte-level regex, which is also what its HF tokenizer.json does). Building SmolLM2's takes about
a second on 2 CPU cores, so nothing is cached.
"""

from __future__ import annotations

import os
import pathlib

from hfjax.errors import UserError
from hfjax.models.gguf_io import GGUFFile

_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "spiece.model",
)

# llama.cpp's pre-tokenizer regexes (llama-vocab.cpp), keyed by `tokenizer.ggml.pre`.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT2_PRE = ("default", "gpt-2", "gpt2", "olmo", "jais")
_DIGITS_THEN_GPT2_PRE = ("smollm", "starcoder", "refact", "codeshell", "exaone", "minerva")
_LLAMA3_PRE = ("llama3", "llama-v3", "llama-bpe", "falcon3", "smaug-bpe", "dbrx", "pixtral")
_QWEN2_PRE = ("qwen2", "deepseek-r1-qwen")
SUPPORTED_GGUF_PRE_TOKENIZERS = _GPT2_PRE + _DIGITS_THEN_GPT2_PRE + _LLAMA3_PRE + _QWEN2_PRE
_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types


class TokenizerError(UserError, ValueError):
    """A tokenizer source that exists but cannot be turned into a tokenizer."""


class TokenizerNotFoundError(UserError, FileNotFoundError):
    """The path does not exist, or the folder holds no tokenizer files."""


def load_tokenizer(path: str | os.PathLike):
    """A transformers fast tokenizer from an HF folder or a `.gguf` file, without network."""
    p = pathlib.Path(path)
    if not p.exists():
        raise TokenizerNotFoundError(f"tokenizer path not found: {p}")
    if p.is_dir():
        return _from_hf_folder(p)
    if p.suffix.lower() == ".gguf":
        return tokenizer_from_gguf(p)
    raise TokenizerError(f"{p} is neither a folder with tokenizer files nor a .gguf file")


def _from_hf_folder(folder: pathlib.Path):
    if not any((folder / name).is_file() for name in _TOKENIZER_FILES):
        raise TokenizerNotFoundError(
            f"{folder} holds no tokenizer (looked for {', '.join(_TOKENIZER_FILES)})"
        )
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise TokenizerError(f"cannot load the tokenizer in {folder}: {e}") from e


def _byte_level_alphabet() -> dict[int, str]:
    """GPT-2's reversible byte -> printable-unicode map (bytes_to_unicode)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars, extra = dict(zip(keep, keep, strict=True)), 0
    for b in range(256):
        if b not in chars:
            chars[b] = 256 + extra
            extra += 1
    return {b: chr(c) for b, c in chars.items()}


def _pre_tokenizer(pre: str | None):
    from tokenizers import Regex, pre_tokenizers

    byte_level = lambda regex: pre_tokenizers.ByteLevel(  # noqa: E731
        add_prefix_space=False, trim_offsets=True, use_regex=regex
    )
    pre = pre or "default"
    if pre in _GPT2_PRE:
        return byte_level(True)
    if pre in _DIGITS_THEN_GPT2_PRE:
        return pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level(True)]
        )
    split = {**dict.fromkeys(_LLAMA3_PRE, _LLAMA3_SPLIT), **dict.fromkeys(_QWEN2_PRE, _QWEN2_SPLIT)}
    if pre in split:
        return pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(split[pre]), behavior="isolated"), byte_level(False)]
        )
    raise TokenizerError(
        f"GGUF pre-tokenizer {pre!r} is not supported (supported: "
        f"{SUPPORTED_GGUF_PRE_TOKENIZERS}); pass a folder with the model's HF tokenizer files "
        "instead"
    )


def tokenizer_from_gguf(path: str | os.PathLike, gguf: GGUFFile | None = None):
    """Rebuild the byte-level BPE tokenizer a GGUF describes, as a transformers fast tokenizer.

    Control tokens (type 3, e.g. <|im_start|>) become special tokens, user-defined ones (type 4)
    added tokens; BOS/EOS are prepended/appended when the file's add_bos/add_eos flags say so.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors
    from transformers import PreTrainedTokenizerFast

    g = gguf if gguf is not None else GGUFFile(path)
    kind = g.get("tokenizer.ggml.model", None)
    if kind is None:
        raise TokenizerError(f"{g.path} has no tokenizer in its metadata (tokenizer.ggml.model)")
    if kind != "gpt2":
        raise TokenizerError(
            f"{g.path}: GGUF tokenizer model {kind!r} is not supported (only byte-level BPE, "
            "'gpt2'); pass a folder with the model's HF tokenizer files instead"
        )
    tokens: list[str] = g.get("tokenizer.ggml.tokens")
    merges: list[str] = g.get("tokenizer.ggml.merges")
    types: list[int] = g.get("tokenizer.ggml.token_type", [1] * len(tokens))
    pre = g.get("tokenizer.ggml.pre", None)
    if len(types) != len(tokens):
        raise TokenizerError(
            f"{g.path}: {len(types)} token types for {len(tokens)} tokens in the GGUF metadata"
        )

    alphabet = _byte_level_alphabet()
    spelled = set(alphabet.values())
    vocab = {}
    for i, t in enumerate(tokens):
        if not set(t) <= spelled:  # a raw-text token: respell its UTF-8 bytes
            t = "".join(alphabet[b] for b in t.encode("utf-8"))
        vocab.setdefault(t, i)
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    bpe = models.BPE(
        vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False,
        ignore_merges=pre in _LLAMA3_PRE,
    )
    tok = Tokenizer(bpe)
    if pre in _QWEN2_PRE:
        tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = _pre_tokenizer(pre)
    tok.decoder = decoders.ByteLevel()
    special = [
        AddedToken(t, special=True, normalized=False)
        for t, ty in zip(tokens, types, strict=True) if ty == _CONTROL and set(t) <= spelled
    ]
    tok.add_special_tokens(special)
    tok.add_tokens([
        AddedToken(t, special=False, normalized=False)
        for t, ty in zip(tokens, types, strict=True) if ty == _USER_DEFINED
    ])

    def token(key: str) -> str | None:
        idx = g.get(f"tokenizer.ggml.{key}", None)
        return None if idx is None or idx >= len(tokens) else tokens[idx]

    bos, eos = token("bos_token_id"), token("eos_token_id")
    add_bos = bool(g.get("tokenizer.ggml.add_bos_token", False)) and bos is not None
    add_eos = bool(g.get("tokenizer.ggml.add_eos_token", False)) and eos is not None
    steps = [processors.ByteLevel(trim_offsets=False)]
    if add_bos or add_eos:
        ids = {t: vocab.get(t, tokens.index(t)) for t in (bos, eos) if t is not None}
        pre_t = f"{bos}:0 " if add_bos else ""
        post_t = f" {eos}:0" if add_eos else ""
        steps.append(processors.TemplateProcessing(
            single=f"{pre_t}$A:0{post_t}",
            pair=f"{pre_t}$A:0{post_t} {pre_t.replace(':0', ':1')}$B:1{post_t.replace(':0', ':1')}",
            special_tokens=sorted(ids.items(), key=lambda kv: kv[1]),
        ))
    tok.post_processor = processors.Sequence(steps)

    arch = g.get("general.architecture", "")
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=bos,
        eos_token=eos,
        unk_token=token("unknown_token_id"),
        pad_token=token("padding_token_id"),
        chat_template=g.get("tokenizer.chat_template", None),
        model_max_length=int(g.get(f"{arch}.context_length", 2048)),
        clean_up_tokenization_spaces=False,
    )
    if len(wrapped) != len(tokens):
        raise TokenizerError(
            f"{g.path}: rebuilt tokenizer has {len(wrapped)} tokens, the file lists {len(tokens)}"
        )
    return wrapped
