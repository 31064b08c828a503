"""A stub Kubernetes API server implementing the Deployment `/scale` subresource and status reads, for
the connector's logic test. Pods become ready when read, up to `schedulable`; the rest stay Pending."""

from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

_PATH = re.compile(r"^/apis/apps/v1/namespaces/([^/]+)/deployments/([^/]+)(/scale|/status)?$")


class StubApiServer:
    def __init__(self, deployments: dict[str, int], schedulable: int = 100, token: str = "t0ken"):
        self.replicas = dict(deployments)
        self.ready = dict(deployments)
        self.schedulable, self.token = schedulable, token
        self.patches: list[tuple[str, str, dict]] = []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, code: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _route(self):
                if self.headers.get("Authorization") != f"Bearer {stub.token}":
                    self._send(401, {"kind": "Status", "code": 401, "reason": "Unauthorized"})
                    return None
                m = _PATH.match(self.path.split("?")[0])
                if not m or m.group(2) not in stub.replicas:
                    self._send(404, {"kind": "Status", "code": 404, "reason": "NotFound"})
                    return None
                return m.group(1), m.group(2), m.group(3) or ""

            def do_GET(self):
                r = self._route()
                if r is None:
                    return
                ns, name, sub = r
                if sub == "/scale":
                    self._send(200, stub.scale_body(ns, name))
                else:
                    stub.ready[name] = min(stub.replicas[name], stub.schedulable)  # pods start when looked at
                    self._send(200, stub.deployment_body(ns, name))

            def do_PATCH(self):
                r = self._route()
                if r is None:
                    return
                ns, name, sub = r
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if sub != "/scale":
                    self._send(405, {"kind": "Status", "code": 405})
                    return
                stub.patches.append((ns, name, body))
                stub.replicas[name] = int(body["spec"]["replicas"])
                stub.ready[name] = min(stub.ready[name], stub.replicas[name])
                self._send(200, stub.scale_body(ns, name))

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def scale_body(self, ns: str, name: str) -> dict:
        return {"apiVersion": "autoscaling/v1", "kind": "Scale", "metadata": {"name": name, "namespace": ns},
                "spec": {"replicas": self.replicas[name]}, "status": {"replicas": self.replicas[name]}}

    def deployment_body(self, ns: str, name: str) -> dict:
        return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name, "namespace": ns},
                "spec": {"replicas": self.replicas[name], "selector": {"matchLabels": {"app": name}},
                         "template": {"metadata": {"labels": {"app": name}}, "spec": {"containers": []}}},
                "status": {"replicas": self.replicas[name], "readyReplicas": self.ready[name]}}

    def __enter__(self) -> StubApiServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
