"""Tokenizer: encode / decode / chat template parity with transformers.AutoTokenizer on the same dir."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvrelay.frontend.tokenizer import ChatTemplateError, Tokenizer

TEXTS = ["Hello, world!", "héllo 世界 🙂", "  two  spaces\n\ttabs\n", "x = {'a': 1}  # ok", "", "<|im_start|>user",
         "Καλημέρα — naïve café", "The keeper opened the ledger<|end_of_text|> and more"]
CHATS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Weather? 🙂"}],
    [{"role": "user", "content": [{"type": "text", "text": "part one, "}, {"type": "text", "text": "part two"}]}],
]
# Exercises what real templates use: namespace, loop controls, tojson, the generation tag, special
# tokens as variables, trim_blocks / lstrip_blocks (tags on their own, indented lines).
RICH_TEMPLATE = """{%- set ns = namespace(system='') -%}
{%- for m in messages %}
    {%- if m.role == 'system' %}
        {%- set ns.system = m.content %}
        {%- continue %}
    {%- endif %}
<{{ m.role }}>{% generation %}{{ m.content }}{% endgeneration %}</{{ m.role }}>
    {% if loop.last and m.role == 'user' %}
[last user turn]
    {% endif %}
{% endfor %}
{% if tools %}TOOLS={{ tools | tojson }}
{% endif %}
{% if ns.system %}SYSTEM={{ ns.system }}{% endif %}
{{ eos_token }}|{{ pad_token }}{% if add_generation_prompt %}<assistant>{% endif %}"""
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather <in> \"town\"",
                                           "parameters": {"type": "object", "properties": {}}}}]
text_st = st.text(st.characters(exclude_categories=("Cs",)), max_size=60)


def variant(src: Path, dst: Path, config: dict | None = None, files: dict[str, str] | None = None) -> Path:
    """A copy of the tokenizer files of `src` with tokenizer_config.json updated (None deletes a key)."""
    dst.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(src / name, dst / name)
    cfg = json.loads((dst / "tokenizer_config.json").read_text())
    for k, v in (config or {}).items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (dst / "tokenizer_config.json").write_text(json.dumps(cfg))
    for name, text in (files or {}).items():
        (dst / name).write_text(text)
    return dst


def hf(path: Path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(path)


def test_metadata(tok, hf_tok):
    assert tok.vocab_size == len(hf_tok) == 2048
    assert tok.bos_token_id == hf_tok.bos_token_id == 0
    assert tok.eos_token_ids == {1, 3}  # tokenizer EOS + generation_config's eos_token_id list
    assert tok.is_special(3) and not tok.is_special(100)


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("add_special", [True, False])
def test_encode_decode_parity(tok, hf_tok, text, add_special):
    ids = tok.encode(text, add_special_tokens=add_special)
    assert ids == hf_tok.encode(text, add_special_tokens=add_special)
    for skip in (True, False):
        assert tok.decode(ids, skip_special_tokens=skip) == hf_tok.decode(ids, skip_special_tokens=skip)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=text_st, ids=st.lists(st.integers(0, 2047), max_size=40), skip=st.booleans())
def test_parity_property(tok, hf_tok, text, ids, skip):
    assert tok.encode(text) == hf_tok.encode(text)
    assert tok.decode(ids, skip_special_tokens=skip) == hf_tok.decode(ids, skip_special_tokens=skip)


def test_token_bytes_concatenate_to_the_text(tok):
    text = "héllo 世界 🙂 — naïve"
    ids = tok.encode(text, add_special_tokens=False)
    assert b"".join(tok.token_bytes(i) for i in ids) == text.encode()
    assert tok.token_bytes(3) == b"<|im_end|>" and tok.token_str(3) == "<|im_end|>"
    assert tok.token_bytes(10**6) == b""


@pytest.mark.parametrize("messages", CHATS)
@pytest.mark.parametrize("gen_prompt", [True, False])
def test_chat_template_parity(tok, hf_tok, messages, gen_prompt):
    ours = tok.apply_chat_template(messages, add_generation_prompt=gen_prompt)
    assert ours == hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen_prompt)
    ids = hf_tok.apply_chat_template(messages, add_generation_prompt=gen_prompt, return_dict=True)["input_ids"]
    assert tok.chat_prompt_ids(messages, add_generation_prompt=gen_prompt) == ids
    assert ids.count(tok.bos_token_id) == 1  # the template's BOS only


def test_chat_template_errors(tok, tmp_path, tiny_dir):
    with pytest.raises(ChatTemplateError, match="unsupported chat role: robot"):
        tok.apply_chat_template([{"role": "robot", "content": "beep"}])
    with pytest.raises(ChatTemplateError, match="only 'text' parts"):
        tok.apply_chat_template([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}])
    bare = Tokenizer(variant(tiny_dir, tmp_path / "bare", {"chat_template": None}))
    with pytest.raises(ChatTemplateError, match="no chat template"):
        bare.apply_chat_template(CHATS[0])


@pytest.mark.parametrize("template", [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{% set ns = namespace() %}{% set ns._x = 1 %}",
    "{{ messages.append(1) }}",  # immutable sandbox: no mutation of the caller's data
    "{{ undefined_thing.attr }}",
])
def test_chat_template_sandbox(tiny_dir, tmp_path, template):
    evil = Tokenizer(variant(tiny_dir, tmp_path / "evil", {"chat_template": template}))
    with pytest.raises(ChatTemplateError):
        evil.apply_chat_template(CHATS[0])


@pytest.mark.parametrize("tools", [None, TOOLS])
@pytest.mark.parametrize("gen_prompt", [True, False])
def test_rich_template_from_jinja_file_parity(tiny_dir, tmp_path, tools, gen_prompt):
    d = variant(tiny_dir, tmp_path / "rich", {"chat_template": "{{ 'overridden by the .jinja file' }}"},
                {"chat_template.jinja": RICH_TEMPLATE})
    ours, ref = Tokenizer(d), hf(d)
    for messages in CHATS[:2]:
        got = ours.apply_chat_template(messages, add_generation_prompt=gen_prompt, tools=tools)
        assert got == ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen_prompt,
                                              tools=tools)
    assert "SYSTEM=Be brief." in got and "<|end_of_text|>|<|end_of_text|>" in got
    assert ("TOOLS=" in got) == bool(tools)
    # Text parts reach the template as one string (transformers would hand it the raw list).
    joined = [{"role": "user", "content": "part one, part two"}]
    assert ours.apply_chat_template(CHATS[2], tools=tools) == ours.apply_chat_template(joined, tools=tools)
    assert ("Weather <in>" in got) == bool(tools)  # plain JSON: no HTML escaping as Jinja's own tojson does


def test_named_templates_pick_tool_use_with_tools(tiny_dir, tmp_path):
    named = [{"name": "default", "template": "D{% for m in messages %}{{ m.content }}{% endfor %}"},
             {"name": "tool_use", "template": "T{{ tools | length }}{% for m in messages %}{{ m.content }}{% endfor %}"}]
    d = variant(tiny_dir, tmp_path / "named", {"chat_template": named})
    ours, ref = Tokenizer(d), hf(d)
    for tools in (None, TOOLS):
        got = ours.apply_chat_template(CHATS[0], tools=tools)
        assert got == ref.apply_chat_template(CHATS[0], tokenize=False, add_generation_prompt=True, tools=tools)
    assert got == "T1Hi"


@pytest.mark.parametrize("config", [{"add_bos_token": False}, {"add_bos_token": True, "add_eos_token": True}])
def test_tokenizer_json_post_processor_decides_bos_eos(tiny_dir, tmp_path, config):
    d = variant(tiny_dir, tmp_path / "flags", config)
    ours, ref = Tokenizer(d), hf(d)
    for text in TEXTS[:3]:
        for add in (True, False):
            assert ours.encode(text, add_special_tokens=add) == ref.encode(text, add_special_tokens=add)
    assert ours.encode("a") == [0, *ours.encode("a", add_special_tokens=False)]


def test_library_does_not_import_transformers_or_torch():
    code = ("import sys, kvrelay.frontend.tokenizer, kvrelay.frontend.detokenizer, kvrelay.frontend.openai_schema, "
            "kvrelay.frontend.openai_responses; bad = {'transformers', 'torch'} & set(sys.modules); "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
