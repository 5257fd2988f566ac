"""Shared core of the teacher -> assistant -> student distillation toolkit."""
