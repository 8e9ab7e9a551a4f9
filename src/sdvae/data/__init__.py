"""Data: sources, decoding/validation, the litdata cache (encoding, prepare) and the Lightning DataModule."""
