"""Dataset sources -> uint8 tensors (or a streaming DataLoader) -> batches on the training device."""
from src.data.sources import DatasetSplits, load_dataset  # noqa: F401
from src.data.loaders import build_loaders  # noqa: F401
