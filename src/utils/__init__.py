"""Ground floor: guards, logging, reproducibility and metrics. Imports nothing else from src."""
