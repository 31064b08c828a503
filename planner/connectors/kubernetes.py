"""`kubernetes`: the prefill and decode Deployments, scaled through their `/scale` subresource with the
official `kubernetes` client (a pip extra: `pip install kvrelay[kubernetes]`).

`scale()` PATCHes `spec.replicas` on `.../deployments/<name>/scale`; `ready()` reads each Deployment's
`status.readyReplicas`. Pods that stay Pending keep `readyReplicas` below the target: the planner loop
reports the scale as timed out and plans again from what is ready. The client is synchronous; calls run
in a thread so the planner's event loop never blocks on the API server.

RBAC the planner's ServiceAccount needs: `get` on deployments, `get`/`patch` on deployments/scale.
"""

from __future__ import annotations

import asyncio
import logging

from kvrelay.planner.connectors.base import ScaleError
from kvrelay.planner.observation import Pool

log = logging.getLogger(__name__)


class KubernetesConnector:
    kind = "kubernetes"

    def __init__(self, namespace: str, deployments: dict[Pool, str], api_url: str = "", token: str = "",
                 verify_ssl: bool = True):
        """`api_url` empty: in-cluster config, else ~/.kube/config. A pool without a Deployment name is
        not managed (reads 0, scale requests for it are ignored)."""
        from kubernetes import client, config

        if api_url:
            conf = client.Configuration()
            conf.host = api_url
            conf.verify_ssl = verify_ssl
            if token:  # the whole header value: client versions differ in where they look up a prefix
                conf.api_key = {"authorization": f"Bearer {token}"}
            api_client = client.ApiClient(conf)
        else:
            try:
                config.load_incluster_config()
            except config.ConfigException:
                config.load_kube_config()
            api_client = client.ApiClient()
        self.api = client.AppsV1Api(api_client)
        self._api_client = api_client
        self.namespace, self.deployments = namespace, {p: n for p, n in deployments.items() if n}
        self._exceptions = (client.ApiException, OSError)

    async def ready(self) -> dict[Pool, int]:
        out = {p: 0 for p in Pool}
        for pool, name in self.deployments.items():
            try:
                dep = await asyncio.to_thread(self.api.read_namespaced_deployment_status, name, self.namespace)
            except Exception as e:  # noqa: BLE001 - the API server being unreachable is not fatal
                log.warning("planner: cannot read deployment %s: %s", name, e)
                continue
            out[pool] = int((dep.status.ready_replicas if dep.status else 0) or 0)
        return out

    async def scale(self, target: dict[Pool, int]) -> None:
        for pool, n in target.items():
            name = self.deployments.get(pool)
            if name is None:
                continue
            try:
                await asyncio.to_thread(self.api.patch_namespaced_deployment_scale, name, self.namespace,
                                        {"spec": {"replicas": n}})
            except self._exceptions as e:
                raise ScaleError(f"scale {name} to {n}: {getattr(e, 'reason', e)}") from None

    async def close(self) -> None:
        await asyncio.to_thread(self._api_client.close)
