"""The engine-neutral core every engine builds on."""
