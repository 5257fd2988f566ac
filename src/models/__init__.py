"""One factory over timm (and Hugging Face transformers for `hf:` names)."""
from .factory import (count_flops, count_params, create_model, has_batchnorm, is_cnn, is_vit,  # noqa: F401
                                shape_only)
