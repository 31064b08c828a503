"""Render the chart with the real `helm` and read the objects back."""

from __future__ import annotations

import base64
import subprocess
from pathlib import Path

import yaml

from tests.deploy.helm_bin import helm
from tests.deploy.local_run import Container

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "deploy" / "helm" / "kvrelay"
VALUES = ("values-aggregated.yaml", "values-disaggregated.yaml", "values-disaggregated-planner.yaml")
NAMESPACE = "kvrelay-test"


def run_helm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([helm(), *args], capture_output=True, text=True, timeout=60)


def render(values: str, *sets: str) -> list[dict]:
    argv = ["template", "kvrelay", str(CHART), "-f", str(CHART / values), "--namespace", NAMESPACE]
    for s in sets:
        argv += ["--set", s]
    r = run_helm(*argv)
    assert r.returncode == 0, r.stderr
    return [d for d in yaml.safe_load_all(r.stdout) if d]


def find(objs: list[dict], kind: str, name: str | None = None) -> list[dict]:
    return [o for o in objs if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]


def container_of(objs: list[dict], deployment: dict) -> Container:
    """A Deployment's (only) container as it would run: its args and its resolved environment
    (envFrom ConfigMaps/Secrets, secretKeyRef, fieldRef status.podIP -> 127.0.0.1)."""
    spec = deployment["spec"]["template"]["spec"]
    (c,) = spec["containers"]
    env: dict[str, str] = {}
    for src in c.get("envFrom", []):
        if "configMapRef" in src:
            env.update(find(objs, "ConfigMap", src["configMapRef"]["name"])[0]["data"])
        elif "secretRef" in src:
            env.update({k: base64.b64decode(v).decode()
                        for k, v in find(objs, "Secret", src["secretRef"]["name"])[0]["data"].items()})
    for e in c.get("env", []):
        if "value" in e:
            env[e["name"]] = e["value"]
        elif "secretKeyRef" in e["valueFrom"]:
            ref = e["valueFrom"]["secretKeyRef"]
            env[e["name"]] = base64.b64decode(find(objs, "Secret", ref["name"])[0]["data"][ref["key"]]).decode()
        elif e["valueFrom"].get("fieldRef", {}).get("fieldPath") == "status.podIP":
            env[e["name"]] = "127.0.0.1"
        else:
            raise AssertionError(f"unresolved env {e}")
    assert c.get("command") is None, "the image's entrypoint (kvrelay) runs the args"
    return Container(deployment["metadata"]["name"], [str(a) for a in c["args"]], env)
