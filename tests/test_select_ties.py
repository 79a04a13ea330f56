"""Model selection on dev under a tie rule from the recipe (train.select_tie_rule), checked against brute force."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import vsectl.evaluation as evaluation
from vsectl.config import load_recipe
from vsectl.errors import ConfigError
from vsectl.training import train

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "recipes" / "tiny.yaml"

# 4 images (3 = a copy of 2) and 7 captions; caption 2 repeats caption 0 on another image (an identical title)
IMAGES = torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 0, 1], [0, 0, 1]])
CAPTIONS = torch.tensor([[2.0, 1, 0], [1, 0, 1], [2, 1, 0], [0, 2, 1], [1, 1, 3], [0, 1, 2], [1, 0, 2]])
CAP2IMG = [0, 0, 1, 1, 2, 3, 3]


def _expected_hit(scores: list[float], own: set[int], k: int) -> float:
    """P(an own candidate within the top k) over every order of the items tied at the best own score (brute force)."""
    best = max(scores[j] for j in own)
    above = sum(s > best for s in scores)
    tied = [j for j, s in enumerate(scores) if s == best]
    hits = [above + next(i for i, j in enumerate(order) if j in own) < k for order in itertools.permutations(tied)]
    return float(np.mean(hits))


def _reference_rsum(rule: str) -> float:
    sims = (IMAGES @ CAPTIONS.T).tolist()
    total = 0.0
    queries = [(sims[i], {c for c, im in enumerate(CAP2IMG) if im == i}) for i in range(len(IMAGES))]
    queries += [([sims[i][c] for i in range(len(IMAGES))], {CAP2IMG[c]}) for c in range(len(CAPTIONS))]
    n_i2t = len(IMAGES)
    for q, (scores, own) in enumerate(queries):
        best = max(scores[j] for j in own)
        above = sum(s > best for s in scores)
        competitors = sum(s == best for j, s in enumerate(scores) if j not in own)
        weight = 100.0 / (n_i2t if q < n_i2t else len(CAPTIONS))
        for k in (1, 5, 10):
            if rule == "optimistic":
                total += weight * (above < k)
            elif rule == "pessimistic":
                total += weight * (above + competitors < k)
            else:
                total += weight * _expected_hit(scores, own, k)
    return total


@pytest.fixture
def fixed_embeddings(monkeypatch):
    monkeypatch.setattr(evaluation, "encode_split", lambda *args, **kwargs: (IMAGES, CAPTIONS))
    return SimpleNamespace(cap2img=np.array(CAP2IMG))


@pytest.mark.parametrize("rule", ["optimistic", "pessimistic", "expected"])
def test_validate_scores_dev_under_the_rule_it_is_given(fixed_embeddings, rule):
    val = evaluation.validate(None, fixed_embeddings, None, torch.device("cpu"), None, 8, tie_rule=rule)
    assert val["tie_rule"] == rule
    assert val["rsum"] == pytest.approx(_reference_rsum(rule))
    assert val["rsum_by_rule"] == pytest.approx({r: _reference_rsum(r) for r in ("optimistic", "pessimistic",
                                                                                "expected")})
    assert val["ties"]["i2t_queries_with_ties"] > 0 and val["ties"]["t2i_queries_with_ties"] > 0
    assert val["rsum_by_rule"]["pessimistic"] < val["rsum_by_rule"]["expected"] < val["rsum_by_rule"]["optimistic"]


def test_model_selection_defaults_to_the_expected_rule_and_refuses_unknown_rules():
    assert load_recipe(None).train.select_tie_rule == "expected"
    with pytest.raises(ConfigError, match="train.select_tie_rule"):
        load_recipe(None, ["train.select_tie_rule=best"])


def test_each_dev_record_says_its_tie_rule_and_its_rsum_under_every_rule(toy_root, tmp_path):
    cfg = load_recipe(TINY, [f"data.root={toy_root}", "name=ties", "train.epochs=1", "train.max_steps_per_epoch=2",
                             "train.select_tie_rule=pessimistic"])
    run = train(cfg, tmp_path, device="cpu")
    (val,) = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"val"' in x]
    assert val["tie_rule"] == "pessimistic" and val["rsum"] == val["rsum_by_rule"]["pessimistic"]
    assert set(val["ties"]) == {"i2t_queries_with_ties", "t2i_queries_with_ties"}
    state = json.loads((run / "checkpoints" / "best" / "trainer_state.json").read_text())
    assert state["best_rsum"] == val["rsum"]
    assert json.loads((run / "env.json").read_text())["select_tie_rule"] == "pessimistic"
