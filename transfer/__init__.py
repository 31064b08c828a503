"""Moving KV blocks between processes and machines: NIXL (UCX) and a TCP fallback."""
