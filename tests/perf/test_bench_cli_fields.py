"""Every `BenchConfig` field is reachable from `kvrelay bench run` (issue 27: `--system-len` was parsed and
then silently dropped, so bench.json recorded `system_len: 0`)."""

from __future__ import annotations

import json

import pytest
from msgspec import structs

from kvrelay.cli.bench_cmd import config_from_args
from kvrelay.cli.main import build_parser
from kvrelay.perf.bench.config import BenchConfig

# A value other than the default for every field, as the flag's text and as the expected config value.
# A field added to BenchConfig without an entry here fails `test_every_field_has_a_flag` below.
_TRACE = "trace.jsonl"
_VALUES: dict[str, tuple[list[str], object]] = {
    "url": (["--url", "http://10.0.0.1:9"], "http://10.0.0.1:9"),
    "model": (["--model", "m"], "m"),
    "endpoint": (["--endpoint", "chat", "--prompt-format", "text"], "chat"),
    "prompt_format": (["--prompt-format", "text"], "text"),
    "tokenizer": (["--tokenizer", "tiny"], "tiny"),
    "workload": (["--workload", "multi-turn"], "multi-turn"),
    "seed": (["--seed", "7"], 7),
    "num_requests": (["--num-requests", "9"], 9),
    "duration": (["--duration", "3.5"], 3.5),
    "warmup": (["--warmup", "2"], 2),
    "concurrency": (["--concurrency", "5"], 5),
    "request_rate": (["--request-rate", "4"], 4.0),
    "burstiness": (["--burstiness", "0.5", "--request-rate", "4"], 0.5),
    "arrivals": (["--arrivals", "closed"], "closed"),
    "input_len": (["--input-len", "11"], 11),
    "output_len": (["--output-len", "12"], 12),
    "range_ratio": (["--range-ratio", "0.25"], 0.25),
    "num_prefixes": (["--num-prefixes", "3"], 3),
    "prefix_len": (["--prefix-len", "13"], 13),
    "suffixes_per_prefix": (["--suffixes-per-prefix", "2"], 2),
    "users": (["--users", "6"], 6),
    "turns": (["--turns", "3"], 3),
    "system_len": (["--system-len", "77"], 77),
    "long_users": (["--long-users", "2"], 2),
    "long_factor": (["--long-factor", "5"], 5),
    "num_docs": (["--num-docs", "2"], 2),
    "doc_len": (["--doc-len", "100"], 100),
    "questions_per_doc": (["--questions-per-doc", "3"], 3),
    "hot_doc_share": (["--hot-doc-share", "0.5"], 0.5),
    "trace": (["--trace", _TRACE, "--workload", "trace"], _TRACE),
    "block_size": (["--block-size", "32"], 32),
    "trace_speedup": (["--trace-speedup", "2"], 2.0),
    "slo": (["--slo", "ttft=100"], {"ttft": 100.0}),
    "ignore_eos": (["--no-ignore-eos"], False),
    "extra_body": (["--extra-body", json.dumps({"temperature": 0})], {"temperature": 0}),
    "timeout": (["--timeout", "9"], 9.0),
}


def test_every_field_has_a_flag() -> None:
    assert {f.name for f in structs.fields(BenchConfig)} == set(_VALUES)


@pytest.mark.parametrize("field", sorted(_VALUES))
def test_each_field_reaches_the_config(field: str, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / _TRACE).write_text('{"timestamp": 0, "input_length": 4, "output_length": 1}\n')
    flags, want = _VALUES[field]
    assert want != getattr(BenchConfig(), field), "pick a value other than the default"
    cfg = config_from_args(build_parser().parse_args(["bench", "run", *flags]))
    assert getattr(cfg, field) == want
