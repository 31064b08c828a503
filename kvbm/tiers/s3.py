"""The S3 client configuration G4 uses (obstore). Any obstore store works with `ObjectStore`; this one
is tuned so a dead endpoint fails fast instead of retrying for minutes (obstore's default)."""

from __future__ import annotations

from datetime import timedelta
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # obstore's config types exist in its stubs only
    from obstore.store import ClientConfig, S3Config, S3Store


def s3_store(bucket: str, *, endpoint: str | None = None, region: str = "us-east-1",
             access_key_id: str | None = None, secret_access_key: str | None = None,
             timeout_s: float = 10.0, connect_timeout_s: float = 2.0, prefix: str | None = None) -> S3Store:
    """An obstore S3Store with short timeouts and at most one retry (a dead endpoint must fail fast).
    Credentials not given come from the usual AWS_* environment variables."""
    from obstore.store import S3Store

    config: S3Config = {"region": region}
    if access_key_id:
        config["access_key_id"] = access_key_id
    if secret_access_key:
        config["secret_access_key"] = secret_access_key
    client: ClientConfig = {"timeout": timedelta(seconds=timeout_s),
                            "connect_timeout": timedelta(seconds=connect_timeout_s)}
    if endpoint is not None:
        config["endpoint"] = endpoint
        config["virtual_hosted_style_request"] = False
        client["allow_http"] = endpoint.startswith("http://")
    return S3Store(bucket, prefix=prefix, config=config, client_options=client,
                   retry_config={"max_retries": 1, "retry_timeout": timedelta(seconds=timeout_s)})
