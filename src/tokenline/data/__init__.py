"""Data sources, validation, shards and captions."""
