"""GPO and its building blocks, kept at this import path; they live in `vsectl/models/pooling/` (gpo.py, base.py)."""

from vsectl.models.pooling.base import (  # noqa: F401
    MASK_VALUE,
    TEMPERATURE,
    length_mask,
    masked_softmax,
    positional_encoding,
    sort_features,
    weighted_sum,
)
from vsectl.models.pooling.gpo import GPO  # noqa: F401
