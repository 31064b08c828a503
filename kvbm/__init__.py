"""KV block manager: block identity, tier pools and storage, policies, KV events."""
