"""A Hugging Face tokenizer directory, loaded with `tokenizers` and `jinja2` only (no transformers).

Reads tokenizer.json, tokenizer_config.json (special tokens, chat_template), special_tokens_map.json,
chat_template.jinja / chat_template.json, and generation_config.json (extra EOS ids).

Parity with `transformers.AutoTokenizer` (checked by tests/frontend/test_tokenizer.py):
- encode: tokenizer.json's post-processor decides BOS/EOS; tokenizer_config's add_bos_token /
  add_eos_token are not applied on top (transformers 5 does not either; files saved by transformers
  keep the two consistent).
- decode: the tokenizers decode; no clean_up_tokenization_spaces (transformers 5 ignores it for BPE,
  and the incremental detokenizer cannot apply it consistently).
- chat template: the same sandboxed Jinja environment transformers builds (trim_blocks, lstrip_blocks,
  loopcontrols, `raise_exception`, `strftime_now`, a JSON `tojson`, special tokens as variables).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import msgspec
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HfTokenizer

# One prompt is encoded at a time: `tokenizers`' thread pool only adds threads (and its fork warning);
# serially the "fast" encode below is 25% cheaper than `encode`. An operator's own setting wins.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
_BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


class _TokenizerJsonHead(msgspec.Struct):
    decoder: dict[str, Any] | None = None  # msgspec skips the (large) rest of tokenizer.json unparsed


class ChatTemplateError(ValueError):
    """The chat template refused the messages, or the model has none; the message is fit for a client."""


class Tokenizer:
    def __init__(self, model_dir: str | Path) -> None:
        d = Path(model_dir)
        self.path = d
        self._tok = HfTokenizer.from_file(str(d / "tokenizer.json"))
        cfg = _read_json(d / "tokenizer_config.json")
        gen = _read_json(d / "generation_config.json")

        # Special token strings ("<s>" or {"content": "<s>", ...}) -> template variables; older repos
        # keep them in special_tokens_map.json.
        smap = _read_json(d / "special_tokens_map.json")
        self.special_tokens: dict[str, str] = {
            k: v for k in _SPECIAL_KEYS if (v := _token_content(cfg.get(k, smap.get(k)))) is not None
        }
        self.bos_token: str | None = self.special_tokens.get("bos_token")
        self.eos_token: str | None = self.special_tokens.get("eos_token")
        self.bos_token_id: int | None = self._id_of(self.bos_token)
        self.eos_token_id: int | None = self._id_of(self.eos_token)

        # Generation stops at the tokenizer's EOS and at every generation_config eos_token_id.
        eos = gen.get("eos_token_id")
        eos_list = eos if isinstance(eos, list) else [] if eos is None else [eos]
        self.eos_token_ids: set[int] = {int(i) for i in eos_list}
        if self.eos_token_id is not None:
            self.eos_token_ids.add(self.eos_token_id)
        self.generation_config: dict[str, Any] = gen

        vocab = self._tok.get_vocab(with_added_tokens=True)
        # One past the largest id (ids may have holes); ids >= vocab_size do not decode.
        self.vocab_size: int = max(vocab.values(), default=-1) + 1
        self._added: dict[int, str] = {i: t.content for i, t in self._tok.get_added_tokens_decoder().items()}
        self._special_ids: frozenset[int] = frozenset(
            i for i, t in self._tok.get_added_tokens_decoder().items() if t.special)
        dec = msgspec.json.decode((d / "tokenizer.json").read_bytes(), type=_TokenizerJsonHead).decoder or {}
        self._byte_level = _has_decoder(dec, "ByteLevel")
        self._byte_fallback = _has_decoder(dec, "ByteFallback")
        self._byte_decoder = _gpt2_byte_decoder() if self._byte_level else {}
        self._token_bytes: dict[int, bytes] = {}
        # decode() is then the lossy UTF-8 decode of the ids' concatenated `output_bytes` (GPT-2,
        # Llama 3, Qwen, SmolLM2): the incremental detokenizer need not call the tokenizer at all.
        self.decodes_bytewise: bool = dec.get("type") == "ByteLevel"
        self._output_bytes: dict[int, bytes] = {}

        self.chat_templates: dict[str, str] = _load_chat_templates(d, cfg)
        self._compiled: dict[str, jinja2.Template] = {}

    # -- encode / decode ------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        # The batch "fast" form skips the character offsets nobody here reads: ~25% less CPU per prompt
        # (the largest single cost of a streamed chat request in the frontend's profile, issue 33).
        return self._tok.encode_batch_fast([text], add_special_tokens=add_special_tokens)[0].ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def is_special(self, token_id: int) -> bool:
        return token_id in self._special_ids

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token contributes to the output (for logprobs' `bytes` and `token`)."""
        b = self._token_bytes.get(token_id)
        if b is None:
            b = self._compute_token_bytes(token_id)
            self._token_bytes[token_id] = b
        return b

    def output_bytes(self, token_id: int, skip_special_tokens: bool = True) -> bytes:
        """With `decodes_bytewise`: the bytes this id adds to `decode` (b"" for a skipped special token
        or an unknown id). A token the ByteLevel decoder cannot map char by char contributes its raw
        UTF-8, as `tokenizers` does."""
        if skip_special_tokens and token_id in self._special_ids:
            return b""
        b = self._output_bytes.get(token_id)
        if b is None:
            tok = self._added.get(token_id)
            if tok is None:
                tok = self._tok.id_to_token(token_id)
            if tok is None:
                b = b""
            else:
                try:
                    b = bytes(self._byte_decoder[c] for c in tok)
                except KeyError:  # a character outside the byte alphabet: not a byte-level token
                    b = tok.encode("utf-8")
            self._output_bytes[token_id] = b
        return b

    def token_str(self, token_id: int) -> str:
        return self.token_bytes(token_id).decode("utf-8", errors="replace")

    def _compute_token_bytes(self, token_id: int) -> bytes:
        if token_id in self._added:
            return self._added[token_id].encode("utf-8")
        tok = self._tok.id_to_token(token_id)
        if tok is None:
            return b""
        if self._byte_level:
            return bytes(self._byte_decoder.get(c, 0x3F) for c in tok)  # unmapped chars -> "?" (never in GPT-2 vocabs)
        if self._byte_fallback and (m := _BYTE_FALLBACK.match(tok)):
            return bytes([int(m.group(1), 16)])
        return tok.replace("\u2581", " ").encode("utf-8")  # SentencePiece's metaspace is a space

    # -- chat templates -------------------------------------------------------------------------

    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
                            tools: list[dict[str, Any]] | None = None, **kwargs: Any) -> str:
        """Render OpenAI-style messages; list contents are reduced to their concatenated text parts.

        Raises ChatTemplateError for a missing template, a non-text content part, or a template that
        rejects the conversation (`raise_exception`, undefined values, sandbox violations).
        """
        name = self._template_name(bool(tools))
        source = self.chat_templates.get(name)
        if source is None:
            raise ChatTemplateError("this model has no chat template; use the completions API instead")
        template = self._compiled.get(name)
        if template is None:
            template = self._compiled[name] = _environment().from_string(source)
        variables = {**self.special_tokens, **kwargs, "messages": [_plain_message(m) for m in messages],
                     "tools": tools, "documents": None, "add_generation_prompt": add_generation_prompt}
        try:
            return template.render(**variables)
        except ChatTemplateError:
            raise
        except (jinja2.TemplateError, TypeError, ValueError, KeyError, IndexError) as e:
            raise ChatTemplateError(f"chat template error: {e}") from e

    def template_source(self, tools: bool = False) -> str | None:
        """The chat template used with (or without) tools, or None when the model has none."""
        return self.chat_templates.get(self._template_name(tools))

    def _template_name(self, tools: bool) -> str:
        return "tool_use" if tools and "tool_use" in self.chat_templates else "default"

    def chat_prompt_ids(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
                        tools: list[dict[str, Any]] | None = None) -> list[int]:
        """Token ids of the rendered conversation; the template supplies BOS, so no specials are added."""
        return self.encode(self.apply_chat_template(messages, add_generation_prompt, tools),
                           add_special_tokens=False)

    # -- helpers --------------------------------------------------------------------------------

    def _id_of(self, token: str | None) -> int | None:
        return None if token is None else self._tok.token_to_id(token)


def _plain_message(m: Mapping[str, Any]) -> dict[str, Any]:
    msg = dict(m)
    content = msg.get("content")
    if isinstance(content, list):
        texts = []
        for i, part in enumerate(content):
            kind = part.get("type") if isinstance(part, Mapping) else None
            if kind != "text" or not isinstance(part.get("text"), str):
                raise ChatTemplateError(f"content part {i} has type {kind!r}; only 'text' parts are supported")
            texts.append(part["text"])
        msg["content"] = "".join(texts)
    return msg


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (transformers' assistant-mask marker): renders its body."""

    tags = {"generation"}

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return caller()


class _Namespace(jinja2.utils.Namespace):
    """`namespace()` that refuses underscore attributes (as transformers does), so templates cannot
    reach interpreter internals through it."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 - Jinja's own signature trick
        self, rest = args[0], args[1:]
        attrs = dict(*rest, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} is not allowed")


def _raise_exception(message: str) -> None:
    raise ChatTemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # Jinja's own tojson HTML-escapes; chat templates expect plain JSON (as in transformers).
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.globals["namespace"] = _Namespace
    return env


def _load_chat_templates(d: Path, cfg: Mapping[str, Any]) -> dict[str, str]:
    """Named templates; "default" is the one used without tools. chat_template.jinja wins (as in
    transformers), then tokenizer_config.json's chat_template, then chat_template.json."""
    raw: Any = cfg.get("chat_template")
    if raw is None:
        raw = _read_json(d / "chat_template.json").get("chat_template")
    templates: dict[str, str] = {}
    if isinstance(raw, str):
        templates["default"] = raw
    elif isinstance(raw, list):  # [{"name": ..., "template": ...}, ...]
        templates.update({t["name"]: t["template"] for t in raw if isinstance(t, dict)})
    jinja_file = d / "chat_template.jinja"
    if jinja_file.is_file():
        templates["default"] = jinja_file.read_text(encoding="utf-8")
    return templates


def _token_content(value: Any) -> str | None:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _has_decoder(dec: Mapping[str, Any], kind: str) -> bool:
    if dec.get("type") == kind:
        return True
    return any(_has_decoder(d, kind) for d in dec.get("decoders") or [] if isinstance(d, dict))


def _gpt2_byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode: the printable char that stands for each byte."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = list(bs)
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=True)}


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    return data if isinstance(data, dict) else {}
