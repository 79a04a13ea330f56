"""vsectl: image-text retrieval with visual semantic embeddings and learned pooling (VSE∞, CVPR 2021)."""

__version__ = "0.1.0"
