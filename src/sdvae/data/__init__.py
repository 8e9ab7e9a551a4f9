"""Data: sources, decoding/validation, the sharded cache and the Lightning DataModule."""
