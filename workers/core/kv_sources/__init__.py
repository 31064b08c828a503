"""The one door for KV the engine did not compute in this step: a prefill worker's handoff, the lower
tiers G2/G3/G4, and (next) other workers' blocks. README: workers/README.md "The KV-source door"."""
