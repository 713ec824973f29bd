"""tokenline: compact 1D-token text-to-image models, with their lineage."""

__version__ = "0.1.0"
