"""`vsectl import official` on hostile or odd checkpoints: one line each, nothing run, no run folder left behind;
values read as what they say ('False' is false), and lower-precision weights said in one warning line."""

from __future__ import annotations

import argparse
import collections
from pathlib import Path

import pytest
import torch
from cli_checks import one_error_line
from typer.testing import CliRunner

from vsectl.cli import app
from vsectl.importers.safe_load import load_torch_pickle

FIX = Path(__file__).parent / "fixtures" / "official_vse_infty"
BIGRU = FIX / "bigru" / "model_best.pth"
VOCAB = FIX / "bigru" / "vocab" / "f30k_precomp_vocab.json"


def variant(tmp_path: Path, edit) -> Path:  # noqa: ANN001 - edit(checkpoint dict) changes it in place
    ckpt = load_torch_pickle(BIGRU)
    edit(ckpt)
    path = tmp_path / "m.pth"
    torch.save(ckpt, path)
    return path


def import_argv(path: Path, out: Path) -> list[str]:
    return ["-q", "import", "official", str(path), "--vocab", str(VOCAB), "--out", str(out)]


class Calls:
    """Pickles that call a constructor the safe unpickler allows, with arguments it does not take."""

    class BadOrderedDict:
        def __reduce__(self):  # noqa: ANN204
            return (collections.OrderedDict, (1, 2, 3))

    class BadRebuild:
        def __reduce__(self):  # noqa: ANN204
            return (torch._utils._rebuild_tensor_v2, ("x", 1, 2, 3, 4, 5))

    class BadNamespace:
        def __reduce__(self):  # noqa: ANN204
            return (argparse.Namespace, (1,))


def _set_opt(name: str, value: object):  # noqa: ANN202
    return lambda c: setattr(c["opt"], name, value)


def _set_image(key: str, make):  # noqa: ANN001, ANN202
    return lambda c: c["model"][0].__setitem__(key, make(c["model"][0][key]))


def _module_keys_and_an_int(c: dict) -> None:
    image = {f"module.{k}": v for k, v in c["model"][0].items()}
    image[5] = torch.zeros(1)
    c["model"][0] = image


CASES = {
    "an option that is a tensor": (_set_opt("margin", torch.tensor([0.2, 0.3])),
                                   "official option margin is a Tensor, not a plain value"),
    "an option of 10 MB": (_set_opt("logger_name", "x" * 10_000_000),
                           "official option logger_name is 10,000,000 characters long"),
    "a long unknown option": (_set_opt("zzz", "x" * 1000), "cannot place official option zzz='xxxxxxxx"),
    "word_dim 0": (_set_opt("word_dim", 0), "model.text.word_dim must be positive, got 0"),
    "margin inf": (_set_opt("margin", float("inf")), "official option margin=inf is not a finite number"),
    "a flag that is not a flag": (_set_opt("no_imgnorm", "maybe"), "official option no_imgnorm='maybe' is not true"),
    "a whole number that is not": (_set_opt("num_epochs", 2.5), "official option num_epochs=2.5 is not a whole"),
    "module. keys and an int key": (_module_keys_and_an_int, "image encoder entry 5 is not a tensor"),
    "NaN weights": (_set_image("fc.weight", lambda w: torch.full_like(w, float("nan"))),
                    "weight image.fc.weight holds NaN or inf values"),
    "integer weights": (_set_image("fc.weight", lambda w: w.long()),
                        "weight image.fc.weight holds torch.int64 values where the model has torch.float32 ones"),
    "OrderedDict(1, 2, 3)": (lambda c: c.__setitem__("epoch", Calls.BadOrderedDict()),
                             "is not a readable torch checkpoint (expected at most 1 arguments, got 3); nothing in "
                             "it was run"),
    "a tensor rebuilt from a string": (lambda c: c.__setitem__("epoch", Calls.BadRebuild()),
                                       "is not a readable torch checkpoint"),
    "Namespace(1)": (lambda c: c.__setitem__("opt", Calls.BadNamespace()), "is not a readable torch checkpoint"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_an_odd_official_checkpoint_is_one_line_and_leaves_nothing(case: str, tmp_path: Path) -> None:
    edit, expect = CASES[case]
    path = variant(tmp_path, edit)
    line = one_error_line(CliRunner().invoke(app, import_argv(path, tmp_path / "runs" / "x")))
    assert expect in line and len(line) < 600, line
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").iterdir())


def test_flags_given_as_strings_are_read_as_what_they_say(tmp_path: Path) -> None:
    from vsectl.config import load_recipe

    path = variant(tmp_path, _set_opt("drop", "False"))
    result = CliRunner().invoke(app, import_argv(path, tmp_path / "run"))
    assert result.exit_code == 0, result.output
    assert load_recipe(tmp_path / "run" / "config.yaml").model.text.size_augment is False


def test_fp16_weights_are_widened_and_said_in_one_line(tmp_path: Path) -> None:
    path = variant(tmp_path, _set_image("fc.weight", lambda w: w.half()))
    result = CliRunner().invoke(app, import_argv(path, tmp_path / "run"))
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    warned = [line for line in lines if "lower precision" in line]
    assert len(warned) == 1 and "widened to torch.float32" in warned[0]
    assert len(lines) == 3 and lines[1].startswith("imported ") and lines[2].startswith("evaluate it: ")


def test_an_out_folder_name_that_is_no_run_name_is_refused(tmp_path: Path) -> None:
    line = one_error_line(CliRunner().invoke(app, import_argv(BIGRU, tmp_path / "my run")))
    assert "--out 'my run': a run's folder name takes letters, digits" in line
