"""The package's seams: callers ask encoder kinds instead of comparing names, and a new text tower, image source and
evaluation protocol each plug in with one registration, from outside vsectl (here, this test module)."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from vsectl.builders import TextSide
from vsectl.config import load_recipe
from vsectl.data.door import ImageSource, register_image_source
from vsectl.data.features import FeatureSource
from vsectl.data.sources import Split
from vsectl.evaluation import evaluate_runs
from vsectl.kinds import IMAGE_KINDS, TEXT_KINDS, ImageInput, TextKind, register_text_kind
from vsectl.scoring.positives import GroundTruth
from vsectl.scoring.protocols import RECALL_COLUMNS, Protocol, register_protocol
from vsectl.training import train

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "vsectl"
KIND_HOMES = ("models", "data")  # where an encoder kind's own code lives
FOREIGN = ("importers",)  # read the official code's option and branch names ('bigru', 'backbone'), not vsectl kinds
ENCODER_CLASSES = {"RegionEncoder", "GridEncoder", "BackboneGridEncoder", "BiGRUTextEncoder", "TransformerTextEncoder",
                   "RawImages", "NpyFeatures", "H5Features"}


def kind_decisions(tree: ast.AST) -> list[tuple[int, str]]:
    """Comparisons with an encoder kind's name or an `encoder` attribute, and isinstance tests of encoder classes."""
    names = set(IMAGE_KINDS.names()) | set(TEXT_KINDS.names())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            # `x in (names)` tests against names; `'name' in mapping` only looks a key up
            looked = [o for i, o in enumerate(operands)
                      if not (i < len(node.ops) and isinstance(node.ops[i], (ast.In, ast.NotIn)))]
            consts = {n.value for o in looked for n in ast.walk(o) if isinstance(n, ast.Constant)}
            if consts & names or any(isinstance(o, ast.Attribute) and o.attr == "encoder" for o in operands):
                found.append((node.lineno, ast.unparse(node)))
        elif isinstance(node, ast.Call) and getattr(node.func, "id", "") == "isinstance" and len(node.args) == 2:
            classes = {n.id if isinstance(n, ast.Name) else getattr(n, "attr", "") for n in ast.walk(node.args[1])}
            if classes & ENCODER_CLASSES:
                found.append((node.lineno, ast.unparse(node)))
    return found


def test_no_module_outside_the_kinds_homes_decides_by_encoder_kind() -> None:
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).parts
        if parts[0] in KIND_HOMES + FOREIGN:
            continue
        for line, code in kind_decisions(ast.parse(path.read_text())):
            offenders.append(f"{path.relative_to(REPO)}:{line}: {code}")
    assert not offenders, "\n".join(offenders)


def test_the_scan_finds_what_it_looks_for() -> None:
    code = ("a = cfg.model.image.encoder == 'backbone'\nb = name in ('bigru', 'x')\n"
            "c = isinstance(m, TransformerTextEncoder)\nd = kind.reads is ImageInput.PIXELS\n"
            "e = 'backbone' in attrs\nf = branch != 'grid'\n")
    assert [line for line, _ in kind_decisions(ast.parse(code))] == [1, 2, 3, 6]


# ---------------------------------------------------------------------------------------------- a toy of each seam

ALPHABET = "abcdefghijklmnopqrstuvwxyz "


class CharSide(TextSide):
    """A character-level text side: nothing to learn from the captions, a small file saved into the run."""

    @classmethod
    def prepare(cls, cfg, run_dir: Path, captions: list[str], write: bool = True) -> TextSide:
        if write:
            (run_dir / "chars.json").write_text(json.dumps(ALPHABET))
        return cls()

    @classmethod
    def load(cls, cfg, run_dir: Path) -> TextSide:
        assert json.loads((run_dir / "chars.json").read_text()) == ALPHABET
        return cls()

    def processor(self, augment: bool) -> CharSide:
        return self

    def encode(self, caption: str, rng: np.random.Generator | None = None) -> list[int]:
        return [ALPHABET.index(ch) + 1 for ch in caption.lower() if ch in ALPHABET] or [1]

    @property
    def vocab_size(self) -> int:
        return len(ALPHABET) + 1


class CharTower(nn.Module):
    """Mean of character embeddings, L2-normalised."""

    def __init__(self, n_chars: int, embed_dim: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(n_chars, embed_dim, padding_idx=0)

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, None]:
        mean = self.embed(tokens).sum(1) / lengths[:, None].float()
        return nn.functional.normalize(mean, dim=-1), None


def build_char_tower(cfg, embed_dim: int, vocab_size: int | None = None, body=None) -> nn.Module:
    return CharTower(vocab_size, embed_dim)


class ArrayFeatures(FeatureSource):
    """Feature sets from one (N, K, D) array in memory."""

    def __init__(self, array: np.ndarray) -> None:
        self.array = array

    @property
    def feat_dim(self) -> int:
        return self.array.shape[2]

    def __len__(self) -> int:
        return self.array.shape[0]

    def lengths(self) -> np.ndarray:
        return np.full(len(self), self.array.shape[1], dtype=np.int64)

    def get(self, i: int) -> np.ndarray:
        return self.array[self._check_index(i)].astype(np.float32)


class NpzSource(ImageSource):
    """A folder with `<split>.npz` holding `feats` (N, K, D), `captions` and `cap2img`."""

    name = "toy_npz"

    def claims(self, root: Path, split: str) -> bool:
        return (root / f"{split}.npz").is_file()

    def load(self, root: Path, split: str) -> Split:
        z = np.load(root / f"{split}.npz")
        return Split(split, ArrayFeatures(z["feats"]), [str(c) for c in z["captions"]], z["cap2img"],
                     [f"{split}-{i}" for i in range(len(z["feats"]))], source=self.name)


class NeighbourProtocol(Protocol):
    """A caption is also correct for the next image, an image for the previous image's captions."""

    def ground_truth(self, split: Split, root: Path) -> GroundTruth:
        n = split.n_images
        t2i = [(c, j) for c, i in enumerate(split.cap2img.tolist()) for j in (i, (i + 1) % n)]
        return GroundTruth.from_pairs(n, split.n_captions, [(j, c) for c, j in t2i], t2i)


@pytest.fixture(scope="module")
def toys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Register the three toys (once per test session) and write a small data folder in the toy format."""
    if "toy_chars" not in TEXT_KINDS:
        register_text_kind(TextKind("toy_chars", side=CharSide, build=build_char_tower))
        register_image_source(NpzSource())
        register_protocol(NeighbourProtocol("toy_neighbours", "each caption also fits the next image",
                                            columns=(*RECALL_COLUMNS, "r_precision", "map_at_r")))
    root = tmp_path_factory.mktemp("toy_npz")
    rng = np.random.default_rng(0)
    words = ["red", "cat", "dog", "sky", "car", "sun"]
    for split, n in (("train", 24), ("dev", 8), ("test", 8)):
        concept = rng.integers(0, len(words), n)
        feats = rng.standard_normal((n, 4, 6)).astype(np.float32)
        feats[:, 0, :] += 3 * np.eye(6, dtype=np.float32)[concept]
        cap2img = np.repeat(np.arange(n), 2)
        captions = [f"a {words[concept[i]]} here" for i in cap2img]
        np.savez(root / f"{split}.npz", feats=feats, captions=np.array(captions), cap2img=cap2img)
    return root


def test_a_toy_tower_source_and_protocol_train_and_evaluate_through_the_public_functions(
        toys: Path, tmp_path: Path) -> None:
    cfg = load_recipe(REPO / "recipes" / "tiny.yaml", [
        f"data.root={toys}", "data.batch_size=8", "model.embed_dim=8", "model.image.feat_dim=6",
        "model.image.mlp_hidden=4", "model.text.encoder=toy_chars", "train.epochs=1", "train.log_every=1",
        "train.min_steps_warning=0", "name=toy"])
    assert IMAGE_KINDS.get(cfg.model.image.encoder).reads is ImageInput.FEATURES
    run = train(cfg, out_root=tmp_path, device="cpu")
    assert (run / "chars.json").is_file() and (run / "checkpoints" / "best" / "model.safetensors").is_file()
    result = evaluate_runs([run], protocol="toy_neighbours", device="cpu")["toy_neighbours"]
    assert result["n_images"] == 8 and result["split"] == "test"
    metrics = result["metrics"]
    assert 0 <= metrics["t2i_map_at_r"] <= 100 and 0 <= metrics["i2t_r_precision"] <= 100
    saved = json.loads(Path(result["path"]).read_text())
    assert saved["metrics"] == metrics and Path(result["path"]).name == "toy_neighbours-test.json"


def test_the_pooler_table_says_which_poolers_export_to_onnx() -> None:
    """POOLERS, POOL_OPTIONS and the exportable list come from one table, and its ONNX flag is what export does."""
    from vsectl.errors import ConfigError
    from vsectl.models.exportable import EXPORTABLE_POOLERS, ExportPool
    from vsectl.models.pooling import POOLERS, create_pooler
    from vsectl.pool_options import POOL_OPTIONS, POOLER_TABLE, options_class

    assert POOLERS.names() == POOL_OPTIONS.names() == sorted(n for row in POOLER_TABLE for n in row.names)
    assert EXPORTABLE_POOLERS == tuple(row.names[0] for row in POOLER_TABLE if row.onnx)
    for row in POOLER_TABLE:
        pool = create_pooler(options_class(row.names[0])(name=row.names[0]), in_dim=8)
        if row.onnx:
            ExportPool(pool)
        else:
            with pytest.raises(ConfigError, match="cannot be exported"):
                ExportPool(pool)
