"""Read a torch pickle without running anything it names: only tensors, storages and plain containers come back.

The official VSE∞ checkpoints are `torch.save` pickles of a dict holding an `argparse.Namespace`. A pickle may name any
importable callable, so loading one with `weights_only=False` runs whatever a downloaded file asks for. torch's
`weights_only` unpickler builds only tensors, storages, `OrderedDict` and plain builtins; `argparse.Namespace` is the
one class added to its allow-list here (a Namespace is rebuilt by setting attributes, never by calling code).
"""

from __future__ import annotations

import argparse
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch

from vsectl.errors import CheckpointError

ALLOWED_CLASSES = (argparse.Namespace,)  # on top of torch's own weights-only allow-list
_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")


def load_torch_pickle(path: Path) -> Any:
    """Unpickle `path` (zip or legacy torch format) onto the CPU with the restricted unpickler.

    Raises:
        CheckpointError: one line when the file is missing, not a torch pickle, or names anything outside the
            allow-list (nothing in it has run).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no such checkpoint file: {path}")
    if not hasattr(torch.serialization, "safe_globals"):  # added in torch 2.5
        raise CheckpointError(f"reading official checkpoints safely needs torch >= 2.5 (this is {torch.__version__}); "
                              "upgrade torch")
    try:
        with torch.serialization.safe_globals(list(ALLOWED_CLASSES)):
            return torch.load(path, map_location="cpu", weights_only=True)  # explicit: no environment can override
    except pickle.UnpicklingError as err:
        found = _GLOBAL.search(str(err))
        if found is None:
            raise CheckpointError(f"{path} is not a readable torch checkpoint ({_reason(err)})") from None
        raise CheckpointError(
            f"refusing {path}: it asks to build '{found.group(1)}', which is not a tensor, OrderedDict, "
            "argparse.Namespace or plain value; nothing in it was run (an official VSE∞ checkpoint holds only those)"
        ) from None
    except (EOFError, RuntimeError, ValueError, zipfile.BadZipFile, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} is not a readable torch checkpoint ({_reason(err)})") from None
    except (TypeError, AttributeError, KeyError, IndexError, OverflowError, MemoryError, RecursionError) as err:
        # an allowed constructor called with arguments it does not take: the pickle is malformed, and since only
        # allowed constructors can be called, nothing else ran
        raise CheckpointError(f"{path} is not a readable torch checkpoint ({_reason(err)}); nothing in it was "
                              "run") from None


def _reason(err: BaseException) -> str:
    """The informative part of torch's error (never its advice to retry with weights_only=False)."""
    text = str(err).strip()
    if isinstance(err, EOFError) or not text:
        return "the file is empty or cut short"
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1].strip()
    first = text.splitlines()[0].strip()
    return first.split(". ")[0][:160]
