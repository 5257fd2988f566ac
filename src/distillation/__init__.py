"""Losses -> engine (one epoch) -> stage (one model) -> chain (teacher -> assistant -> student)."""
