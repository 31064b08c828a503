"""Issue 14: the model card carries every tokenizer file the frontend reads. A checkpoint whose chat
template lives in `chat_template.jinja` (as current transformers saves it) chats through the frontend,
and a changed template after a restart is used, not a stale cached copy."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import httpx

from kvrelay.workers.models.tiny import ensure_tiny_model
from tests.e2e.serve import Serve

PREFIX = "{{- 'You are a careful assistant who answers in full sentences. ' }}"


def chat_prompt_tokens(tmp, model_dir, env) -> int:
    srv = Serve(tmp, "--engine", "mocker", "--model", str(model_dir), workers=1, env=env).start()
    try:
        r = httpx.post(f"{srv.base_url}/v1/chat/completions", timeout=60, json={
            "model": model_dir.name, "messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 2})
        assert r.status_code == 200, r.text
        return r.json()["usage"]["prompt_tokens"]
    finally:
        srv.stop()


def test_chat_template_jinja_reaches_the_frontend_and_changes_are_picked_up(tmp_path):
    model = tmp_path / "jinja-model"
    shutil.copytree(ensure_tiny_model(), model)
    config = json.loads((model / "tokenizer_config.json").read_text())
    template = config.pop("chat_template")
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    (model / "chat_template.jinja").write_text(template)
    cache = Path(tempfile.mkdtemp(prefix="kvc-"))  # short: serve's ZMQ socket paths live under it
    env = {"KVRELAY_CACHE_DIR": str(cache)}
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    try:
        plain = chat_prompt_tokens(tmp_path / "a", model, env)
        (model / "chat_template.jinja").write_text(PREFIX + template)
        prefixed = chat_prompt_tokens(tmp_path / "b", model, env)
        assert prefixed > plain + 5  # the new template's text is in the prompt
        cards = sorted((cache / "model-cards").iterdir())
        assert len(cards) == 2 and all((c / "chat_template.jinja").is_file() for c in cards)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
