"""deploy/compose: the file validates against the compose-spec schema, and its kvrelay services, run
as local processes with their own command/args/env on real etcd, NATS JetStream and a moto S3 server,
serve chat completions that a real Prometheus (with the compose scrape config) sees."""

from __future__ import annotations

import time

import boto3
import httpx
import jsonschema
import yaml

from tests.deploy import compose_file
from tests.deploy.local_run import (
    Container,
    HostMap,
    LocalProcesses,
    chat,
    moto_s3,
    nats_jetstream,
    wait_http,
)
from tests.deploy.prom import REPO, Prometheus, local_config
from tests.servers import etcd_server

# Compose variables a test run sets: an internal token (frontend and workers must agree), the fast built-in model, small tiers, remote prefill from 32 tokens.
TEST_VARS = {"KVRELAY_INTERNAL_TOKEN": "internal-compose", "KVRELAY_MODEL": "tiny", "KVRELAY_KV_HOST_BYTES": "32MiB", "KVRELAY_KV_DISK_BYTES": "32MiB",
             "KVRELAY_DISAGG_MIN_TOKENS": "32", "KVRELAY_PLANNER_INTERVAL": "1", "KVRELAY_API_KEY": "sk-compose"}


def test_compose_file_validates_against_the_compose_spec():
    schema = compose_file.compose_schema()
    doc = compose_file.load({})
    errors = [f"{list(e.path)}: {e.message}" for e in jsonschema.Draft201909Validator(schema).iter_errors(doc)]
    assert errors == []
    # a bad file is caught: the check can fail
    bad = {**doc, "services": {**doc["services"], "frontend": {**doc["services"]["frontend"], "depends_on": 3}}}
    assert list(jsonschema.Draft201909Validator(schema).iter_errors(bad))


def test_depends_on_targets_exist_and_workers_wait_for_their_planes():
    doc = compose_file.load({})
    services = doc["services"]
    for name, svc in services.items():
        for dep, cond in (svc.get("depends_on") or {}).items():
            assert dep in services, (name, dep)
            assert not services[dep].get("profiles"), f"{name} depends on profiled {dep}: breaks the other profile"
            if cond["condition"] == "service_healthy":
                assert "healthcheck" in services[dep], (name, dep)
    for profile in ("cpu", "gpu"):
        roles = {svc["command"][2] for svc in compose_file.kvrelay_services(doc, profile).values()
                 if svc["command"][0] == "worker"}
        assert roles == {"prefill", "decode"}, profile
    for worker in ("prefill", "decode", "prefill-gpu", "decode-gpu"):
        assert set(services[worker]["depends_on"]) == {"etcd", "nats", "s3-init"}


def test_compose_services_run_as_local_processes_and_serve(tmp_path):
    doc = compose_file.load(TEST_VARS)
    services = compose_file.kvrelay_services(doc, "cpu")
    assert set(services) == {"frontend", "prefill", "decode", "planner"}
    etcd, nats, s3 = etcd_server(tmp_path), nats_jetstream(tmp_path), moto_s3(tmp_path)
    procs = LocalProcesses(tmp_path)
    prom = None
    for server in (etcd, nats, s3):
        server.start()
    try:
        hosts = HostMap()
        hosts.add("etcd", 2379, etcd.port)
        hosts.add("nats", 4222, nats.port)
        hosts.add("s3", 9000, s3.port)
        for name, svc in services.items():
            for port in svc.get("expose", []):
                hosts.add(name, int(port))
        # s3-init's job: the bucket G4 writes to
        worker_env = compose_file.env_of(services["decode"])
        boto3.client("s3", endpoint_url=f"http://127.0.0.1:{s3.port}", region_name="us-east-1",
                     aws_access_key_id=worker_env["AWS_ACCESS_KEY_ID"],
                     aws_secret_access_key=worker_env["AWS_SECRET_ACCESS_KEY"]).create_bucket(Bucket="kvrelay-kv")
        hosts.add("prometheus", 9090)
        # Prometheus first (the planner reads from it), with the compose scrape config: targets mapped,
        # the API-key file compose mounts written here
        (tmp_path / "api-key").write_text(TEST_VARS["KVRELAY_API_KEY"])
        raw = yaml.safe_load((REPO / "deploy/prometheus/prometheus.yml").read_text())
        scrape = []
        for job in raw["scrape_configs"]:
            job = {**job, "static_configs": [{**sc, "targets": [hosts.text(t) for t in sc["targets"]]}
                                             for sc in job["static_configs"]]}
            if "authorization" in job:
                assert job["authorization"]["credentials_file"] == "/etc/prometheus/api-key"
                job["authorization"] = {**job["authorization"], "credentials_file": str(tmp_path / "api-key")}
            scrape.append(job)
        prom = Prometheus(tmp_path, local_config(scrape), port=hosts.ports[("prometheus", 9090)])
        for name, svc in services.items():
            env = hosts.env(compose_file.env_of(svc))
            procs.start(Container(name, hosts.argv(svc["command"], name), env))
        frontend = f"http://127.0.0.1:{hosts.ports[('frontend', 8000)]}"
        # each service's own healthcheck command, pointed at its mapped port
        for name, svc in services.items():
            check = hosts.argv(svc["healthcheck"]["test"][1:], name)
            url = check[-1].split("'")[1]
            wait_http(url, procs, timeout=90)
        wait_http(f"{frontend}/ready", procs, timeout=90)

        prom.wait_up(4)

        key = TEST_VARS["KVRELAY_API_KEY"]
        assert httpx.get(f"{frontend}/v1/models", timeout=5).status_code == 401  # the API key is enforced
        model = httpx.get(f"{frontend}/v1/models", headers={"Authorization": f"Bearer {key}"},
                          timeout=5).json()["data"][0]["id"]
        prompt = "Deploy check: " + " ".join(f"word{i}" for i in range(60))
        outs = [chat(frontend, model, prompt, key)["choices"][0]["message"]["content"] for _ in range(3)]
        assert outs[0] and outs == [outs[0]] * 3  # greedy: the same text every time
        seen = False
        for _ in range(100):  # Prometheus scrapes every 1s here

            rows = prom.query('sum(kvrelay_frontend_requests_total{endpoint="chat",status="200"})')
            remote = prom.query('sum(kvrelay_frontend_prefills_total{where="remote"})')
            if rows and float(rows[0]["value"][1]) >= 3 and remote and float(remote[0]["value"][1]) >= 1:
                seen = True
                break
            time.sleep(0.3)
        assert seen, (prom.query("kvrelay_frontend_requests_total"), prom.query("kvrelay_frontend_prefills_total"))
        assert {r["metric"]["tier"] for r in prom.query("kvrelay_kv_tier_enabled == 1")} >= {"G2", "G3", "G4"}
        assert prom.query('kvrelay_planner_intervals_total{job="kvrelay-planner"} > 0')
        procs.check_alive()
    finally:
        if prom is not None:
            prom.stop()
        codes = procs.stop()
        for server in (s3, nats, etcd):
            server.stop()
    assert all(c == 0 for c in codes.values()), (codes, {n: procs.log(n) for n in codes if codes[n]})
