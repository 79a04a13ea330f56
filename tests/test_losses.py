"""The loss registry and the symmetric InfoNCE loss with a learned temperature (against a loop reference)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vsectl.config import CHOICES, LossConfig, load_recipe
from vsectl.errors import ConfigError
from vsectl.losses import LOSSES, ContrastiveLoss, InfoNCELoss, create_loss
from vsectl.training import train

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "recipes" / "tiny.yaml"


def infonce_reference(img: torch.Tensor, cap: torch.Tensor, scale: float) -> float:
    """(1/2B) Σ_i [−log softmax_j(s·<img_i, cap_j>)_i − log softmax_j(s·<img_j, cap_i>)_i], with plain loops."""
    b = img.shape[0]
    s = [[scale * float(img[i] @ cap[j]) for j in range(b)] for i in range(b)]
    total = 0.0
    for i in range(b):
        row = math.log(sum(math.exp(s[i][j]) for j in range(b)))      # image i against every caption
        col = math.log(sum(math.exp(s[j][i]) for j in range(b)))      # caption i against every image
        total += (row - s[i][i]) + (col - s[i][i])
    return total / (2 * b)


def unit(rows: int, dim: int, gen: torch.Generator) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.randn(rows, dim, generator=gen), dim=-1)


@pytest.mark.parametrize("temperature", [0.07, 0.5, 1.0])
def test_infonce_matches_the_loop_reference(temperature):
    gen = torch.Generator().manual_seed(0)
    img = unit(5, 6, gen)
    cap = torch.nn.functional.normalize(img + 0.7 * torch.randn(5, 6, generator=gen), dim=-1)
    loss = InfoNCELoss(temperature=temperature)(img, cap)
    assert loss.item() == pytest.approx(infonce_reference(img, cap, 1 / temperature), rel=1e-5, abs=1e-6)


def test_infonce_temperature_gradient_matches_a_finite_difference():
    gen = torch.Generator().manual_seed(1)
    img, cap = unit(4, 5, gen), unit(4, 5, gen)
    loss = InfoNCELoss(temperature=0.2)
    loss(img, cap).backward()
    h, log_s = 1e-4, math.log(1 / 0.2)
    numeric = (infonce_reference(img, cap, math.exp(log_s + h)) - infonce_reference(img, cap, math.exp(log_s - h))) \
        / (2 * h)
    assert loss.logit_scale.grad.item() == pytest.approx(numeric, rel=1e-3, abs=1e-5)


def test_infonce_starts_at_clips_temperature_and_is_clamped_after_a_step():
    loss = InfoNCELoss()
    assert math.exp(loss.logit_scale.item()) == pytest.approx(1 / 0.07)  # CLIP's initial temperature
    with torch.no_grad():
        loss.logit_scale.fill_(10.0)
    loss.after_step()
    assert loss.logit_scale.item() == pytest.approx(math.log(100.0))     # CLIP's clamp: logits scaled by ≤ 100
    with torch.no_grad():
        loss.logit_scale.fill_(-3.0)
    loss.after_step()
    assert loss.logit_scale.item() == 0.0 and loss.log_values()["temperature"] == pytest.approx(1.0)


def test_a_fixed_temperature_is_not_a_parameter_to_learn():
    assert not InfoNCELoss(learn_temperature=False).logit_scale.requires_grad


def test_the_registry_resolves_every_recipe_choice_and_refuses_unknown_names():
    assert tuple(LOSSES.names()) == tuple(sorted(CHOICES["loss.name"]))
    assert isinstance(create_loss(LossConfig()), ContrastiveLoss)
    assert isinstance(create_loss(LossConfig(name="infonce")), InfoNCELoss)
    with pytest.raises(ConfigError, match="did you mean 'infonce'"):
        LOSSES.get("infonse")


@pytest.mark.parametrize("overrides, message", [
    (["loss.name=infonse"], "loss.name: 'infonse' is not one of hinge, infonce"),
    (["loss.temperature=0.1"], "loss.temperature applies to loss.name: infonce only"),
    (["loss.name=infonce", "loss.margin=0.1"], "loss.margin applies to loss.name: hinge only"),
    (["loss.name=infonce", "loss.temperature=0"], "loss.temperature must be in (0, 1]"),
    (["loss.name=infonce", "loss.temperature=0.005"], "1/temperature ≤ loss.max_logit_scale"),
])
def test_loss_settings_are_validated_when_the_recipe_loads(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_recipe(TINY, overrides)


def test_an_infonce_run_learns_its_temperature_saves_it_and_resumes_exactly(toy_root, tmp_path):
    base = [f"data.root={toy_root}", "train.deterministic=true", "loss.name=infonce"]
    straight = train(load_recipe(TINY, [*base, "name=a", "train.epochs=2"]), tmp_path, device="cpu")
    train(load_recipe(TINY, [*base, "name=b", "train.epochs=1"]), tmp_path, device="cpu")
    resumed = train(load_recipe(TINY, [*base, "name=b", "train.epochs=2"]), tmp_path, device="cpu", resume=True)
    a = load_file(str(straight / "checkpoints/last/model.safetensors"))
    b = load_file(str(resumed / "checkpoints/last/model.safetensors"))
    assert a.keys() == b.keys() and "loss.logit_scale" in a
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert a["loss.logit_scale"].item() != pytest.approx(math.log(1 / 0.07))  # it was learned
    records = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if r["kind"] == "train"]
    assert all(r["hardest"] is False and 0 < r["temperature"] <= 1 and r["lr_loss"] > 0 for r in train_records)
    hinge = train(load_recipe(TINY, [f"data.root={toy_root}", "name=h", "train.epochs=1"]), tmp_path, device="cpu")
    assert not any(k.startswith("loss.") for k in load_file(str(hinge / "checkpoints/last/model.safetensors")))
