"""Evaluation: FID/KID features, reports."""
