"""The GPO research variants, kept at this import path; each lives in its own file in `vsectl/models/pooling/`."""

from vsectl.models.pooling.gpo_featin import FeatInGPO  # noqa: F401
from vsectl.models.pooling.gpo_index_bigru import IndexBiGRUGPO  # noqa: F401
from vsectl.models.pooling.gpo_interp import InterpGPO  # noqa: F401
from vsectl.models.pooling.gpo_mlp import MLPGPO  # noqa: F401
from vsectl.models.pooling.gpo_perdim import PerDimGPO  # noqa: F401
from vsectl.models.pooling.gpo_transformer import TransformerGPO  # noqa: F401
