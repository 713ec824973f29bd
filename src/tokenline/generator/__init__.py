"""Generators over 1D tokens: flow and masked transformers, samplers, training."""
