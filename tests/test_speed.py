"""CPU speed paths give the same numbers: dense two-pass BiGRU vs packed, GPO's one-pass forward direction, fused
AdamW vs the for-loop one, and the once-per-run precision decision."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from vsectl.errors import ConfigError
from vsectl.models.pooling.gpo import GPO
from vsectl.models.pooling.gpo_index_bigru import IndexBiGRUGPO
from vsectl.models.rnn import dense_bigru, packed_bigru, reverse_index
from vsectl.models.text_encoders import BiGRUTextEncoder
from vsectl.optim import create_adamw, load_optimizer_state
from vsectl.runtime import bf16_pays, resolve_precision


def loop_bigru(gru: nn.GRU, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Slow reference: each sequence alone, cut to its length, through the bidirectional GRU; zeros after."""
    out = torch.zeros(x.size(0), x.size(1), 2 * gru.hidden_size)
    for b, n in enumerate(lengths.tolist()):
        out[b, :n] = gru(x[b : b + 1, :n])[0][0]
    return out


def test_reverse_index_reverses_within_length() -> None:
    idx = reverse_index(torch.tensor([3, 1, 4]), 4)
    assert idx.tolist() == [[2, 1, 0, 3], [0, 1, 2, 3], [3, 2, 1, 0]]


def test_dense_bigru_matches_packed_and_loop_outputs_and_grads() -> None:
    torch.manual_seed(0)
    gru = nn.GRU(5, 4, batch_first=True, bidirectional=True)
    lengths = torch.tensor([7, 1, 3, 7, 2, 5])
    x = torch.randn(6, 7, 5)
    outs, grads = [], []
    for fn in (dense_bigru, packed_bigru, loop_bigru):
        gru.zero_grad()
        xi = x.clone().requires_grad_()
        out = fn(gru, xi, lengths)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        outs.append(out.detach())
        grads.append([xi.grad] + [p.grad.clone() for p in gru.parameters()])
    for other in (1, 2):
        assert torch.allclose(outs[0], outs[other], atol=1e-6)
        for a, b in zip(grads[0], grads[other], strict=True):
            assert torch.allclose(a, b, atol=1e-5)
    assert outs[0][1, 1:].abs().max() == 0  # zero past the length, as pad_packed_sequence leaves it


def test_text_encoder_dense_equals_packed_with_the_same_state_dict() -> None:
    torch.manual_seed(1)
    enc = BiGRUTextEncoder(30, 8, 6, GPO())
    keys = set(enc.state_dict())
    assert {"rnn.weight_ih_l0", "rnn.weight_hh_l0_reverse", "rnn.bias_hh_l0_reverse"} <= keys
    tokens = torch.randint(1, 30, (5, 9))
    lengths = torch.tensor([9, 4, 1, 6, 9])
    results = []
    for path in ("dense", "packed"):
        enc.zero_grad()
        enc.rnn_path = path
        emb, weights = enc(tokens, lengths)
        (emb * torch.arange(6.0)).sum().backward()
        results.append((emb.detach(), weights.detach(), {n: p.grad.clone() for n, p in enc.named_parameters()}))
    assert set(enc.state_dict()) == keys
    assert torch.allclose(results[0][0], results[1][0], atol=1e-6)
    assert torch.allclose(results[0][1], results[1][1], atol=1e-6)
    for name, g in results[0][2].items():
        assert torch.allclose(g, results[1][2][name], atol=1e-5), name


@pytest.mark.parametrize("cls", [GPO, IndexBiGRUGPO])
def test_gpo_forward_direction_once_matches_packed(cls: type) -> None:
    torch.manual_seed(2)
    pool = cls()
    lengths = torch.tensor([36, 20, 3, 1, 29, 36])
    fast = pool.scores(lengths, 36)
    x = pool.generator_input(lengths, 36)
    out = packed_bigru(pool.gru, x, lengths)
    slow = pool.scorer((out[..., :32] + out[..., 32:]) / 2)
    assert torch.allclose(fast, slow, atol=1e-6)
    gf = torch.autograd.grad(fast.sum(), list(pool.gru.parameters()))
    gs = torch.autograd.grad(slow.sum(), list(pool.gru.parameters()))
    for a, b in zip(gf, gs, strict=True):
        assert torch.allclose(a, b, atol=1e-5)


def test_fused_adamw_matches_for_loop() -> None:
    torch.manual_seed(3)
    base = [torch.randn(7, 5), torch.randn(5), torch.randn(3, 2)]
    grads = [[torch.randn_like(p) for p in base] for _ in range(4)]
    finals = []
    for fused in (False, True):
        params = [nn.Parameter(p.clone()) for p in base]
        opt = create_adamw([{"params": params[:2], "lr": 1e-2}, {"params": params[2:], "lr": 1e-3}], lr=1e-2,
                           weight_decay=0.1, fused=fused)
        assert bool(opt.param_groups[0]["fused"]) is fused
        for step in grads:
            for p, g in zip(params, step, strict=True):
                p.grad = g.clone()
            opt.step()
        finals.append([p.detach() for p in params])
    for a, b in zip(*finals, strict=True):
        assert torch.allclose(a, b, atol=1e-6)


def test_optimizer_state_from_a_for_loop_run_resumes_fused() -> None:
    p = nn.Parameter(torch.ones(3))
    old = create_adamw([{"params": [p]}], lr=0.1, weight_decay=0.0, fused=False)
    p.grad = torch.ones(3)
    old.step()
    new = create_adamw([{"params": [p]}], lr=0.1, weight_decay=0.0)
    load_optimizer_state(new, old.state_dict())
    assert new.param_groups[0]["fused"] is True
    assert float(new.state[p]["step"]) == 1.0
    p.grad = torch.ones(3)
    new.step()


def test_precision_auto_follows_the_device(caplog: pytest.LogCaptureFixture) -> None:
    cpu = torch.device("cpu")
    with caplog.at_level(logging.INFO, logger="vsectl.runtime"):
        amx = resolve_precision("auto", cpu, flags={"avx512f", "amx_bf16", "avx512_bf16"})
    assert amx.name == "bf16" and amx.describe()["precision_requested"] == "auto"
    assert sum("precision bf16 (auto" in r.message for r in caplog.records) == 1
    assert resolve_precision("auto", cpu, flags={"avx2", "fma"}).name == "fp32"
    assert resolve_precision("fp32", cpu, flags={"amx_bf16"}).name == "fp32"
    assert bf16_pays(torch.device("mps"))[0] is False
    with pytest.raises(ConfigError, match="unknown precision"):
        resolve_precision("fp8", cpu)


def test_explicit_bf16_without_units_warns_once(caplog: pytest.LogCaptureFixture,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    import vsectl.runtime as rt

    monkeypatch.setattr(rt, "_warned", set())
    with caplog.at_level(logging.WARNING, logger="vsectl.runtime"):
        for _ in range(3):
            assert resolve_precision("bf16", torch.device("cpu"), flags={"avx2"}).name == "bf16"
        resolve_precision("bf16", torch.device("cpu"), flags={"avx512_bf16"})
    assert sum("no bf16 units" in r.message for r in caplog.records) == 1


# ------------------------------------------------------------------------------------- frozen body, shared caches

REPO = __import__("pathlib").Path(__file__).resolve().parent.parent
TINY = REPO / "recipes" / "tiny.yaml"


def frozen_overrides(root, bert, *extra: str) -> list[str]:
    return [f"data.root={root}", "train.deterministic=true", "train.precision=fp32", "model.text.encoder=transformers",
            f"model.text.pretrained={bert}", "model.text.freeze_body=true", "model.text.cache_states=true", *extra]


def test_frozen_body_is_stored_once_per_run_and_resume_and_eval_still_work(toy_root, tiny_bert_dir, tmp_path):
    import json

    from safetensors import safe_open

    from vsectl.builders import load_run
    from vsectl.checkpoint import FROZEN_FILE, CheckpointError, load_checkpoint
    from vsectl.config import load_recipe
    from vsectl.training import train

    run = train(load_recipe(TINY, frozen_overrides(toy_root, tiny_bert_dir, "name=f", "train.epochs=1",
                                                   "train.max_steps_per_epoch=2")), tmp_path, device="cpu")
    frozen = run / FROZEN_FILE
    assert frozen.is_file()
    for which in ("best", "last"):
        with safe_open(str(run / "checkpoints" / which / "model.safetensors"), framework="pt") as fh:
            assert fh.keys() and not any(k.startswith("text.body.") for k in fh.keys())
            assert json.loads(fh.metadata()["frozen"])["file"].endswith("frozen_body.safetensors")
    run = train(load_recipe(TINY, frozen_overrides(toy_root, tiny_bert_dir, "name=f", "train.epochs=2",
                                                   "train.max_steps_per_epoch=2")), tmp_path, device="cpu",
                resume=True)
    assert json.loads((run / "checkpoints/last/trainer_state.json").read_text())["epoch"] == 2
    _, model, _ = load_run(run)
    body = {f"text.body.{k}": v for k, v in model.text.body.state_dict().items()}
    from safetensors.torch import load_file

    stored = load_file(str(frozen))
    assert body.keys() == stored.keys() and all(torch.equal(body[k], stored[k]) for k in body)
    frozen.write_bytes(frozen.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(CheckpointError, match="sha256 differs"):
        load_checkpoint(run / "checkpoints" / "best")


def test_runs_sharing_a_cache_folder_compute_the_text_states_once(toy_root, tiny_bert_dir, tmp_path):
    from vsectl.config import load_recipe
    from vsectl.training import train

    shared = tmp_path / "text_cache"
    stamps = []
    for seed in (0, 1):
        cfg = load_recipe(TINY, frozen_overrides(toy_root, tiny_bert_dir, f"name=s{seed}", f"seed={seed}",
                                                 "train.epochs=1", "train.max_steps_per_epoch=1"))
        run = train(cfg, tmp_path / "runs", device="cpu", text_cache_dir=shared)
        assert not (run / "text_cache").exists()
        stamps.append({p.name: p.stat().st_mtime_ns for p in shared.glob("*.h5")})
    assert len(stamps[0]) == 2 and stamps[0] == stamps[1]  # train + val, written by the first run only


def test_precision_auto_on_avx512_bf16_without_amx_picks_bf16() -> None:
    cpu = torch.device("cpu")
    p = resolve_precision("auto", cpu, flags={"avx512f", "avx512_bf16"})
    assert p.name == "bf16" and "avx512_bf16" in p.reason


def test_usable_cpus_follow_the_affinity_mask(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    from vsectl.runtime import env_info, usable_cpus

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {3}, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    assert usable_cpus() == 1
    assert env_info()["usable_cpus"] == 1


def test_the_rnn_path_is_decided_by_the_device_and_set_on_the_model() -> None:
    from vsectl.models.rnn import rnn_path_for, set_rnn_path

    cpu = torch.device("cpu")
    assert rnn_path_for(cpu) == "stepped" and rnn_path_for(torch.device("cuda")) == "packed"
    model = nn.ModuleDict({"text": BiGRUTextEncoder(10, 4, 4, GPO()), "other": nn.Linear(2, 2)})
    set_rnn_path(model, rnn_path_for(cpu))
    assert model["text"].rnn_path == "stepped"


def test_the_runs_of_a_sweep_store_one_frozen_body_and_old_runs_still_load(toy_root, tiny_bert_dir, tmp_path):
    """A sweep wrote the frozen text body into every cell (90 MB of MiniLM each): now once, named by its digest."""
    import json
    import shutil

    from safetensors import safe_open

    from vsectl.builders import load_run
    from vsectl.checkpoint import FROZEN_FILE
    from vsectl.config import load_recipe
    from vsectl.training import train

    shared = tmp_path / "sweep" / "text_cache"
    runs = []
    for seed in (0, 1):
        cfg = load_recipe(TINY, frozen_overrides(toy_root, tiny_bert_dir, f"name=s{seed}", f"seed={seed}",
                                                 "train.epochs=1", "train.max_steps_per_epoch=1"))
        runs.append(train(cfg, tmp_path / "sweep" / "runs", device="cpu", text_cache_dir=shared))
    bodies = list(shared.glob("frozen-body-*.safetensors"))
    assert len(bodies) == 1 and not any((run / FROZEN_FILE).exists() for run in runs)
    for run in runs:
        with safe_open(str(run / "checkpoints" / "best" / "model.safetensors"), framework="pt") as fh:
            ref = json.loads(fh.metadata()["frozen"])
        assert (run / "checkpoints" / "last" / ref["file"]).resolve() == bodies[0].resolve()
        _, model, _ = load_run(run)  # eval, embed and export load it through the reference
        assert model.text.body is not None
    moved = shutil.copytree(tmp_path / "sweep", tmp_path / "elsewhere" / "sweep")  # the sweep moves as a whole
    load_run(moved / "runs" / "s0")
    single = train(load_recipe(TINY, frozen_overrides(toy_root, tiny_bert_dir, "name=one", "train.epochs=1",
                                                      "train.max_steps_per_epoch=1")), tmp_path / "runs", device="cpu")
    assert (single / FROZEN_FILE).is_file()  # a run on its own keeps its body (the layout older runs have)
    load_run(single)
