"""The recipe section `data.noise`: noisy correspondence in the training pairs (no torch import, like config.py)."""

from __future__ import annotations

from dataclasses import dataclass

from vsectl.errors import ConfigError

CLEAN_SPLITS = ("dev", "val", "test", "testall")  # model selection and evaluation always see correct pairs


@dataclass(frozen=True)
class NoiseConfig:
    ratio: float = 0.0              # fraction of training captions paired with a wrong image (0 = clean)
    seed: int = 0                   # draws which captions are mismatched and which images they get
    index_file: str = ""            # a saved noise index (.npy) instead of ratio/seed, e.g. a published one
    log_pairs: int = 256            # clean and noisy training pairs whose loss is logged each epoch (0 = none)

    @property
    def enabled(self) -> bool:
        return self.ratio > 0 or bool(self.index_file)


def check_noise(noise: NoiseConfig, train_split: str) -> None:
    """Refuse what cannot be meant: a ratio outside [0, 1), both a ratio and a file, noise on a clean split."""
    if not 0.0 <= noise.ratio < 1.0:
        raise ConfigError(f"data.noise.ratio must be in [0, 1), got {noise.ratio}")
    if noise.ratio > 0 and noise.index_file:
        raise ConfigError("data.noise.ratio and data.noise.index_file are exclusive: the index file fixes which pairs "
                          "are noisy; give one of them")
    if noise.log_pairs < 0 or noise.seed < 0:
        raise ConfigError(f"data.noise.log_pairs and data.noise.seed must be ≥ 0, got {noise.log_pairs} and "
                          f"{noise.seed}")
    if noise.enabled and train_split in CLEAN_SPLITS:
        raise ConfigError(f"data.noise corrupts the training pairs, but data.train_split is '{train_split}': dev and "
                          "test pairs stay clean; train on a training split")
