"""ResNet-50 -> ResNet-34 -> ResNet-18 distillation. The chain is its config; the code is in src/."""
from pathlib import Path

from src.experiment.cli import main

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "cifar10.yaml"

if __name__ == "__main__":
    main("cnn", DEFAULT_CONFIG)
