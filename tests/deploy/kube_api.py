"""A stand-in Kubernetes API server for the planner's rendered command: it serves the chart's worker
Deployments (as rendered) and their /status and /scale, and refuses with 403 every request the chart's
Role for the planner does not allow. So the test proves the RBAC rules cover what the planner does."""

from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

_PATH = re.compile(r"^/apis/apps/v1/namespaces/([^/]+)/deployments/([^/?]+)(/status|/scale)?(\?.*)?$")
_VERB = {"GET": "get", "PATCH": "patch", "PUT": "update", "DELETE": "delete", "POST": "create"}


class KubeApi:
    def __init__(self, namespace: str, deployments: dict[str, dict], role: dict, ready: dict[str, int]):
        self.namespace, self.deployments, self.rules, self.ready = namespace, deployments, role["rules"], ready
        self.requests: list[tuple[str, str, int]] = []  # (verb, path, status)
        self.scales: list[tuple[str, int]] = []
        api = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def _serve(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                status, out = api.handle(self.command, self.path, body)
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                data = json.dumps(out).encode()
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_PATCH = do_PUT = do_POST = do_DELETE = _serve

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def allowed(self, verb: str, resource: str, name: str) -> bool:
        return any("apps" in r["apiGroups"] and resource in r["resources"] and verb in r["verbs"]
                   and name in r.get("resourceNames", [name]) for r in self.rules)

    def handle(self, method: str, path: str, body: bytes) -> tuple[int, dict]:
        m = _PATH.match(path)
        verb = _VERB.get(method, method.lower())
        if m is None:
            status, out = 403, {"kind": "Status", "code": 403, "message": f"no rule covers {path}"}
        else:
            ns, name, sub = m.group(1), m.group(2), (m.group(3) or "")
            resource = "deployments" + sub
            if ns != self.namespace or not self.allowed(verb, resource, name):
                status, out = 403, {"kind": "Status", "code": 403, "message": f"forbidden: {verb} {resource}/{name}"}
            elif name not in self.deployments:
                status, out = 404, {"kind": "Status", "code": 404}
            elif sub == "/scale":
                if verb == "patch":
                    replicas = int(json.loads(body)["spec"]["replicas"])
                    self.scales.append((name, replicas))
                status, out = 200, {"apiVersion": "autoscaling/v1", "kind": "Scale",
                                    "metadata": {"name": name, "namespace": ns},
                                    "spec": {"replicas": self.ready[name]}, "status": {"replicas": self.ready[name]}}
            else:
                n = self.ready[name]
                out = {**self.deployments[name], "status": {"replicas": n, "readyReplicas": n, "availableReplicas": n}}
                status = 200
        self.requests.append((verb, path, status))
        return status, out

    def kubeconfig(self) -> str:
        return json.dumps({"apiVersion": "v1", "kind": "Config", "current-context": "test",
                           "clusters": [{"name": "test", "cluster": {"server": self.url}}],
                           "users": [{"name": "planner", "user": {"token": "test-token"}}],
                           "contexts": [{"name": "test", "context": {"cluster": "test", "user": "planner",
                                                                     "namespace": self.namespace}}]})

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
