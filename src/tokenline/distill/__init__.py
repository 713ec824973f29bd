"""Distilled students: one- and few-step generators trained from a teacher generator (reflow, consistency, mask_distill)."""
