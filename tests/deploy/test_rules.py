"""The alert rules fire on the series that mean them and stay quiet on healthy ones (`promtool test
rules` with tests/deploy/rules_test.yml)."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.deploy.prom import RULES, promtool

TESTS = Path(__file__).with_name("rules_test.yml")


def test_alert_rules_fire_on_their_conditions(tmp_path):
    spec = TESTS.read_text().replace("rule_files: [RULES]", f"rule_files: [{RULES / 'kvrelay.yml'}]")
    (tmp_path / "rules_test.yml").write_text(spec)
    r = subprocess.run([promtool(), "test", "rules", str(tmp_path / "rules_test.yml")], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout
