"""Dataset sources -> uint8 tensors (or a streaming DataLoader) -> batches on the training device."""
from .sources import DatasetSplits, load_dataset  # noqa: F401
from .loaders import build_loaders  # noqa: F401
