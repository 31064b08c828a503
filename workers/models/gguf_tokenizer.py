"""A Hugging Face tokenizer directory (tokenizer.json, tokenizer_config.json) from GGUF metadata.

Supported: `tokenizer.ggml.model == "gpt2"`, the byte-level BPE of Llama 3, Qwen2/3 and SmolLM.
llama.cpp names the pre-tokenizer (`tokenizer.ggml.pre`); each maps to the split the model was trained
with (the same regular expressions llama.cpp applies). An unknown one is an error, not a guess: a
wrong split gives valid-looking but different token ids.

Special tokens are the vocabulary entries of type CONTROL (3) and USER_DEFINED (4), added as
"added tokens" so they are matched before the BPE split, as in the original tokenizer.json.
"""

from __future__ import annotations

from typing import Any

from kvrelay.workers.models.gguf_file import GgufError, GgufFile

_CONTROL, _USER_DEFINED = 3, 4

# Pre-tokenizer split patterns (llama.cpp's llama-vocab.cpp spells out the same ones).
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
          r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def _pre_tokenizer(pre: str) -> Any:
    from tokenizers import Regex, pre_tokenizers

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    if pre in ("gpt-2", "gpt2", "default"):
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "smollm":  # digits one by one, then GPT-2's split
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    pattern = {"llama-bpe": _LLAMA3, "llama3": _LLAMA3, "qwen2": _QWEN2, "qwen35": _QWEN2}.get(pre)
    if pattern is None:
        raise GgufError(f"tokenizer pre-tokenizer {pre!r} is not supported "
                        f"(gpt-2, smollm, llama-bpe, qwen2)")
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
                                    byte_level])


def build_tokenizer(gguf: GgufFile) -> tuple[Any, dict[str, Any], list[int]]:
    """(tokenizers.Tokenizer, tokenizer_config dict, EOS ids for generation_config)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, processors

    kind = gguf.require("tokenizer.ggml.model")
    if kind != "gpt2":
        raise GgufError(f"tokenizer model {kind!r} is not supported (gpt2 byte-level BPE only)")
    tokens: list[str] = list(gguf.require("tokenizer.ggml.tokens"))
    types: list[int] = list(gguf.get("tokenizer.ggml.token_type") or [1] * len(tokens))
    merges = [tuple(m.split(" ", 1)) for m in gguf.require("tokenizer.ggml.merges")]
    if len(types) != len(tokens):
        raise GgufError(f"tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} tokens")
    vocab = {tok: i for i, tok in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = _pre_tokenizer(str(gguf.get("tokenizer.ggml.pre", "default")))
    tok.decoder = decoders.ByteLevel()
    specials = [AddedToken(t, special=(ty == _CONTROL), normalized=False)
                for t, ty in zip(tokens, types, strict=True) if ty in (_CONTROL, _USER_DEFINED)]
    tok.add_tokens(specials)

    def token(key: str) -> str | None:
        i = gguf.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else None

    bos, eos = token("bos"), token("eos")
    add_bos = bool(gguf.get("tokenizer.ggml.add_bos_token", False))
    if add_bos and bos is not None:
        # The post-processor decides BOS (frontend/tokenizer.py reads only tokenizer.json for that).
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab[bos])])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": add_bos,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(gguf.get(f"{gguf.architecture}.context_length", 2048)),
    }
    for key, value in (("bos_token", bos), ("eos_token", eos), ("unk_token", token("unknown")),
                       ("pad_token", token("padding"))):
        if value is not None:
            config[key] = value
    template = gguf.get("tokenizer.chat_template")
    if template:
        config["chat_template"] = str(template)
    eos_ids = [int(i) for k in ("eos", "eot", "eom")
               if (i := gguf.get(f"tokenizer.ggml.{k}_token_id")) is not None]
    return tok, config, sorted(set(eos_ids))
