"""`kvrelay planner profile --url` against a real `kvrelay serve --engine mocker`: the measured curves
agree with the timing model the mocker sleeps by (plus the serving path's overhead)."""

from __future__ import annotations

import pytest

from kvrelay.planner.profile import load_profile
from kvrelay.planner.profiler import measure_profile
from kvrelay.workers.engines.mocker.config import MockerConfig
from kvrelay.workers.engines.mocker.timing import TimingModel
from tests.e2e.serve import Serve

KNOBS = {"prefill_us_per_token": 200.0, "decode_base_ms": 20.0, "decode_us_per_seq": 1000.0}


@pytest.fixture
def serve(tmp_path):
    flags = [f for k, v in KNOBS.items() for f in (f"--mocker-{k.replace('_', '-')}", str(v))]
    s = Serve(tmp_path, "--engine", "mocker", *flags, workers=1).start()
    yield s
    s.stop()


async def test_measured_profile_matches_the_mocker_timing_model(serve, tmp_path):
    model = TimingModel(MockerConfig(model="", **KNOBS))
    profile = await measure_profile(serve.base_url, "kvrelay-tiny", isls=(256, 2048), concurrencies=(1, 8),
                                    contexts=(256,), decode_tokens=16, repeats=2)
    assert profile.check() is None
    for isl, ttft in zip(profile.prefill_isl, profile.prefill_ttft_s, strict=True):
        expected = model.prefill_seconds(int(isl))
        assert expected <= ttft <= expected + 0.25, (isl, ttft, expected)
    for c, itl in zip(profile.decode_concurrency, profile.decode_itl_s[0], strict=True):
        expected = model.decode_seconds(int(c), int(c) * 17)
        assert 0.8 * expected <= itl <= 1.6 * expected + 0.01, (c, itl, expected)
    assert profile.prefill_ttft_s[1] > profile.prefill_ttft_s[0]


def test_profile_cli_writes_a_file_the_sla_policy_loads(tmp_path):
    from kvrelay.cli.main import main

    out = tmp_path / "p.json"
    assert main(["planner", "profile", "--out", str(out), "--mocker-decode-base-ms", "7"]) == 0
    p = load_profile(str(out))
    assert p.decode_itl_s[0][0] == pytest.approx(TimingModel(MockerConfig(model="", decode_base_ms=7)).decode_seconds(
        1, 16))
    assert main(["planner", "profile", "--out", str(out), "--url", "http://127.0.0.1:1"]) == 1
