"""Default fixtures of the e2e tests: one `kvrelay serve` (tiny model, one worker) per test module and an
official `openai` client for it (the OpenAI-API feature tests share them: structured outputs, tools,
the Responses API). A module that needs another deployment defines its own `served`, which wins."""

from __future__ import annotations

import openai
import pytest

from tests.e2e.serve import Serve


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    srv = Serve(tmp_path_factory.mktemp("serve"), "--lease-ttl", "3", workers=1).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(served) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{served.base_url}/v1", api_key="unused", max_retries=0)
