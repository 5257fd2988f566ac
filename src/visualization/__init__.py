"""Figures from CSVs and checkpoints. Never imports src.distillation (the chain calls the plots)."""
