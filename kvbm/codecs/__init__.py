"""KV block codecs for the slow tiers (kvbm/README.md "Compression"): `none`, `lossless`, `int8`."""
