"""deploy/helm/kvrelay: `helm lint` and `helm template` per values file, every object valid against the
Kubernetes 1.30 schemas, the planner's Role no wider than its two Deployments, grace >= drain, and the
rendered containers run as local processes (real etcd and NATS, a stand-in API server that enforces the
planner's Role) serving chat completions."""

from __future__ import annotations

import json
import time

import httpx
import kubernetes_validate
import pytest

from tests.deploy.chart import CHART as CHART_DIR
from tests.deploy.chart import NAMESPACE, VALUES, container_of, find, render, run_helm
from tests.deploy.kube_api import KubeApi
from tests.deploy.local_run import HostMap, LocalProcesses, chat, nats_jetstream, wait_http
from tests.servers import etcd_server

K8S = "1.30.0"
OPERATOR_KINDS = {"ServiceMonitor", "PodMonitor"}  # CRDs: no upstream schema; checked by hand below


@pytest.mark.parametrize("values", VALUES)
def test_lint_template_and_kubernetes_schemas(values):
    lint = run_helm("lint", str(CHART_DIR), "-f", str(CHART_DIR / values), "--strict")
    assert lint.returncode == 0, lint.stdout + lint.stderr
    objs = render(values)
    kinds = {o["kind"] for o in objs}
    assert {"Deployment", "Service", "ConfigMap", "Secret", "PodDisruptionBudget"} <= kinds
    for o in objs:
        if o["kind"] in OPERATOR_KINDS:
            continue
        kubernetes_validate.validate(o, K8S, strict=True)  # raises ValidationError on any bad field
    # a schema violation is caught: the check can fail
    bad = json.loads(json.dumps(find(objs, "Deployment", "kvrelay-frontend")[0]))
    bad["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S, strict=True)


def test_monitors_select_what_exists():
    objs = render("values-disaggregated-planner.yaml")
    services = find(objs, "Service")
    for sm in find(objs, "ServiceMonitor"):
        svc = [s for s in services if sm["spec"]["selector"]["matchLabels"].items() <= s["metadata"]["labels"].items()]
        assert len(svc) == 1, sm["metadata"]["name"]
        assert {e["port"] for e in sm["spec"]["endpoints"]} <= {p["name"] for p in svc[0]["spec"]["ports"]}
    pod_monitors = find(objs, "PodMonitor")
    assert {p["metadata"]["name"] for p in pod_monitors} == {"kvrelay-prefill", "kvrelay-decode"}
    for pm in pod_monitors:
        (dep,) = [d for d in find(objs, "Deployment")
                  if pm["spec"]["selector"]["matchLabels"].items() <= d["spec"]["template"]["metadata"]["labels"].items()]
        ports = {p["name"] for p in dep["spec"]["template"]["spec"]["containers"][0]["ports"]}
        assert {e["port"] for e in pm["spec"]["podMetricsEndpoints"]} <= ports
    assert not find(render("values-disaggregated.yaml"), "PodMonitor")  # behind the flag


def test_planner_role_may_only_scale_the_two_worker_deployments():
    objs = render("values-disaggregated-planner.yaml")
    (role,) = find(objs, "Role")
    workers = {d["metadata"]["name"] for d in find(objs, "Deployment")
               if d["spec"]["template"]["metadata"]["labels"].get("kvrelay.io/role") in ("prefill", "decode")}
    assert workers == {"kvrelay-prefill", "kvrelay-decode"}
    for rule in role["rules"]:
        assert rule["apiGroups"] == ["apps"]
        assert set(rule["resourceNames"]) == workers
        assert rule["resources"][0].startswith("deployments")
        assert "patch" not in rule["verbs"] or rule["resources"] == ["deployments/scale"]
    assert not find(objs, "ClusterRole") and not find(objs, "ClusterRoleBinding")
    (binding,) = find(objs, "RoleBinding")
    (planner,) = find(objs, "Deployment", "kvrelay-planner")
    assert binding["subjects"][0]["name"] == planner["spec"]["template"]["spec"]["serviceAccountName"]
    assert not find(render("values-disaggregated.yaml"), "Role")


def test_secret_probes_and_grace():
    objs = render("values-disaggregated.yaml", "apiKey.value=sk-x", "drainTimeoutSeconds=90")
    (secret,) = find(objs, "Secret", "kvrelay-api-key")
    assert "sk-x" not in json.dumps(find(objs, "Deployment")) and "sk-x" not in json.dumps(find(objs, "ConfigMap"))
    assert secret["data"]["api-key"]
    for dep in find(objs, "Deployment"):
        spec = dep["spec"]["template"]["spec"]
        c = spec["containers"][0]
        assert spec["terminationGracePeriodSeconds"] >= 90 + 5
        assert c["resources"]["requests"] and spec["securityContext"]["runAsNonRoot"]
        assert {"startupProbe", "readinessProbe", "livenessProbe"} <= set(c)
    fe = find(objs, "Deployment", "kvrelay-frontend")[0]["spec"]["template"]["spec"]["containers"][0]
    assert fe["readinessProbe"]["httpGet"]["path"] == "/ready" and fe["livenessProbe"]["httpGet"]["path"] == "/health"
    gpu = render("values-disaggregated.yaml", "workers.gpu=1", "workers.device=cuda",
                 "decode.nodeSelector.gpu=h100")
    dec = find(gpu, "Deployment", "kvrelay-decode")[0]["spec"]["template"]["spec"]
    assert dec["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert dec["nodeSelector"] == {"gpu": "h100"}
    tokens = {}
    for dep in find(objs, "Deployment"):
        env = {e["name"]: e for e in dep["spec"]["template"]["spec"]["containers"][0].get("env", [])}
        if dep["metadata"]["name"] != "kvrelay-planner":
            tokens[dep["metadata"]["name"]] = env["KVRELAY_INTERNAL_TOKEN"]["valueFrom"]["secretKeyRef"]["name"]
            assert "--drain-timeout=90" in dep["spec"]["template"]["spec"]["containers"][0]["args"]
    assert set(tokens.values()) == {"kvrelay-internal-token"} and find(objs, "Secret", "kvrelay-internal-token")
    (fe3,) = find(render("values-disaggregated.yaml", "frontend.replicas=3"), "Deployment", "kvrelay-frontend")
    assert fe3["spec"]["replicas"] == 3
    kubernetes_validate.validate(fe3, K8S, strict=True)
    existing = render("values-aggregated.yaml", "apiKey.existingSecret=mine")
    assert not find(existing, "Secret", "kvrelay-api-key")
    ref = find(existing, "Deployment", "kvrelay-frontend")[0]["spec"]["template"]["spec"]["containers"][0]["env"]
    assert ref[0]["valueFrom"]["secretKeyRef"]["name"] == "mine"


# Chart values a local run sets: the built-in tiny model, small tiers, TCP handoff, remote prefill from
# 32 tokens, a fast planner.
LOCAL = ("model.name=tiny", "workers.kvHostBytes=32MiB", "workers.kvDiskBytes=32MiB", "workers.kvTransfer=tcp",
         "frontend.disaggMinTokens=32", "planner.interval=1", "apiKey.value=sk-helm")


@pytest.mark.parametrize("values", ["values-aggregated.yaml", "values-disaggregated-planner.yaml"])
def test_rendered_containers_run_as_local_processes(tmp_path, values):
    objs = render(values, *LOCAL)
    deployments = find(objs, "Deployment")
    etcd, nats = etcd_server(tmp_path), nats_jetstream(tmp_path)
    etcd.start()
    nats.start()
    procs, api = LocalProcesses(tmp_path), None
    try:
        hosts = HostMap()
        hosts.add("kvrelay-etcd", 2379, etcd.port)
        hosts.add("kvrelay-nats", 4222, nats.port)
        for dep in deployments:
            for p in dep["spec"]["template"]["spec"]["containers"][0]["ports"]:
                hosts.add(dep["metadata"]["name"], p["containerPort"])
        for svc in find(objs, "Service"):
            dep = svc["metadata"]["name"]
            if dep in ("kvrelay-etcd", "kvrelay-nats"):
                continue
            (port,) = svc["spec"]["ports"]
            named = {p["name"]: p["containerPort"] for p in
                     find(objs, "Deployment", dep)[0]["spec"]["template"]["spec"]["containers"][0]["ports"]}
            hosts.add(dep, port["port"], hosts.ports[(dep, named[port["targetPort"]])])
        extra: dict[str, dict[str, str]] = {}
        if find(objs, "Role"):
            workers = {d["metadata"]["name"]: d for d in deployments if "kvrelay.io/role" in d["metadata"]["labels"]}
            api = KubeApi(NAMESPACE, workers, find(objs, "Role")[0], {n: 1 for n in workers})
            (tmp_path / "kubeconfig").write_text(api.kubeconfig())
            # in place of the pod's service-account token: a kubeconfig for the stand-in API server
            extra["kvrelay-planner"] = {"KUBECONFIG": str(tmp_path / "kubeconfig")}
        for dep in deployments:
            c = container_of(objs, dep)
            c.args, c.env = hosts.argv(c.args, c.name), hosts.env(c.env)
            procs.start(c, extra.get(c.name))
        for dep in deployments:  # each container's startup probe, at its mapped port
            probe = dep["spec"]["template"]["spec"]["containers"][0]["startupProbe"]["httpGet"]
            ports = {p["name"]: p["containerPort"] for p in dep["spec"]["template"]["spec"]["containers"][0]["ports"]}
            local = hosts.ports[(dep["metadata"]["name"], ports[probe["port"]])]
            wait_http(f"http://127.0.0.1:{local}{probe['path']}", procs, timeout=90)
        frontend = f"http://127.0.0.1:{hosts.ports[('kvrelay-frontend', 8000)]}"
        wait_http(f"{frontend}/ready", procs, timeout=90)  # the readiness probe
        models = httpx.get(f"{frontend}/v1/models", headers={"Authorization": "Bearer sk-helm"}, timeout=5).json()
        prompt = "Helm check: " + " ".join(f"token{i}" for i in range(60))
        out = chat(frontend, models["data"][0]["id"], prompt, "sk-helm")
        assert out["choices"][0]["message"]["content"] and out["usage"]["completion_tokens"] > 0
        metrics = httpx.get(f"{frontend}/metrics", headers={"Authorization": "Bearer sk-helm"}, timeout=5).text
        if "planner" in values:
            assert 'kvrelay_frontend_prefills_total{where="remote"} 1.0' in metrics
            planner = f"http://127.0.0.1:{hosts.ports[('kvrelay-planner', 9400)]}"
            deadline = time.monotonic() + 30
            while not any(r[2] == 200 and r[1].endswith("/status") for r in api.requests):
                assert time.monotonic() < deadline, api.requests
                time.sleep(0.2)
            text = httpx.get(f"{planner}/metrics", timeout=5).text
            assert 'kvrelay_planner_ready_workers{pool="decode"} 1.0' in text, text
            assert [r for r in api.requests if r[2] == 403] == []  # the Role covers every call it made
        procs.check_alive()
    finally:
        codes = procs.stop()
        if api is not None:
            api.close()
        nats.stop()
        etcd.stop()
    assert all(c == 0 for c in codes.values()), (codes, {n: procs.log(n) for n in codes if codes[n]})
