"""Trainer: determinism, early stopping, best-epoch weights, schedule, bad input, run folder, notebook 02."""

from __future__ import annotations

import dataclasses
import json
import math
import os

import nbformat
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import REPO
from nbexec import run_notebook

from cxrlib import paths
from cxrlib.embstore import Embeddings, save_embeddings
from cxrlib.losses import TERMS
from cxrlib.projector import load_projector
from cxrlib.train import (
    TrainConfig,
    label_precision,
    load_splits,
    resolve_pos_weight,
    save_run,
    synthetic_splits,
    train_projector,
    warmup_cosine,
)

SMALL = dict(width=32, batch_size=64, epochs=3)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matrices: one thread is faster, and immune to OpenMP oversubscription on a shared CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def splits():
    return synthetic_splits(256, 96, dim=24, seed=0)


def test_seeded_runs_are_identical(splits):
    cfg = TrainConfig(**SMALL, seed=3)
    a = train_projector(splits["train"], splits["val"], cfg, progress=False)
    b = train_projector(splits["train"], splits["val"], cfg, progress=False)
    pd.testing.assert_frame_equal(a.history.drop(columns="seconds"), b.history.drop(columns="seconds"))
    for (k, v), w in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(v, w), k
    c = train_projector(splits["train"], splits["val"], dataclasses.replace(cfg, seed=4), progress=False)
    assert not c.history["train_total"].iloc[1:].equals(a.history["train_total"].iloc[1:])


def test_history_columns_and_best_weights_returned(splits):
    r = train_projector(splits["train"], splits["val"], TrainConfig(**SMALL), progress=False)
    h = r.history
    assert list(h["epoch"]) == [0, 1, 2, 3]
    for col in ("lr", "logit_scale", "train_clip", "train_supcon", "train_bce", "train_total", "val_total",
                "val_p5_i2t", "val_p5_t2i", "val_p5"):
        assert col in h, col
    assert h.loc[1:, "train_total"].notna().all() and np.isnan(h.loc[0, "train_total"])
    assert r.best_epoch == int(h.loc[1:, "val_p5"].idxmax()) and r.best_metric == h.loc[r.best_epoch, "val_p5"]
    assert label_precision(splits["val"], r.model)["mean"] == pytest.approx(r.best_metric)
    assert r.config["w_bce"] == 1.0 and not r.model.training


def test_weight_zero_terms_absent_from_history(splits):
    r = train_projector(splits["train"], splits["val"], TrainConfig(**SMALL, weights={"bce": 0.0}), progress=False)
    assert "train_bce" not in r.history and "val_bce" not in r.history and "train_clip" in r.history


def test_fixed_or_learned_temperature_and_balanced_bce(splits):
    fixed = train_projector(splits["train"], splits["val"],
                            TrainConfig(**SMALL, learn_temperature=False, pos_weight="balanced"), progress=False)
    assert fixed.history["logit_scale"].tolist() == pytest.approx([1 / 0.07] * 4)
    learned = train_projector(splits["train"], splits["val"], TrainConfig(**SMALL, lr=1e-2), progress=False)
    assert learned.history["logit_scale"].iloc[-1] != pytest.approx(1 / 0.07)
    assert fixed.history.loc[1:, "train_bce"].notna().all()
    assert resolve_pos_weight("balanced", np.array([1, 1, 1, 0])) == pytest.approx(1 / 3)
    assert resolve_pos_weight(2.0, np.array([1, 0])) == 2.0 and resolve_pos_weight(None, np.array([1])) is None


def test_early_stopping_after_patience(splits):
    # a learning rate too small to change any ranking: no improvement after epoch 1
    cfg = TrainConfig(width=32, batch_size=64, epochs=30, lr=1e-12, patience=2)
    r = train_projector(splits["train"], splits["val"], cfg, progress=False)
    assert r.best_epoch == 1 and list(r.history["epoch"]) == [0, 1, 2, 3]


def test_projector_beats_frozen_space():
    s = synthetic_splits(600, 200, dim=128, seed=1, signal=0.3)
    frozen = label_precision(s["val"])["mean"]
    cfg = TrainConfig(width=128, batch_size=128, epochs=8, lr=3e-3, warmup_epochs=1)
    r = train_projector(s["train"], s["val"], cfg, progress=False)
    assert r.best_metric > frozen + 0.05, (frozen, r.best_metric)
    assert r.history.loc[0, "val_p5"] == pytest.approx(frozen)  # residual start = the frozen space


def test_warmup_cosine_schedule():
    f = warmup_cosine(4, 14)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == 1.0 and f(9) == pytest.approx(0.5) and f(14) == pytest.approx(0.0)
    assert f(6) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.2)))
    assert warmup_cosine(0, 10)(0) == 1.0


@pytest.mark.parametrize("change, match", [
    (dict(weights={"supcon": -0.5}), "w_supcon must be a number >= 0"),
    (dict(weights=dict.fromkeys(TERMS, 0)), "all loss weights are 0"),
    (dict(weights={"focal": 1.0}), "unknown loss terms"),
    (dict(kind="deep"), "kind must be one of"),
    (dict(pos_weight="auto"), "pos_weight"),
    (dict(batch_size=1), "batch_size"),
])
def test_bad_config_raises_before_training(splits, change, match):
    with pytest.raises(ValueError, match=match):
        train_projector(splits["train"], splits["val"], TrainConfig(**{**SMALL, **change}), progress=False)


def test_bad_inputs_raise_naming_rows(splits):
    tr = splits["train"]
    img = tr.img.copy()
    img[7, 3] = np.nan
    with pytest.raises(ValueError, match=r"non-finite image embeddings, e.g. study_ids \['s7'\]"):
        train_projector(dataclasses.replace(tr, img=img), splits["val"], TrainConfig(**SMALL), progress=False)
    labels = tr.labels.copy()
    labels[[2, 5]] = -1
    with pytest.raises(ValueError, match=r"2 rows have no 0/1 .*\['s2', 's5'\]"):
        train_projector(dataclasses.replace(tr, labels=labels), splits["val"], TrainConfig(**SMALL), progress=False)


def test_divergence_stops_with_step_and_batch_named(splits):
    with pytest.raises(FloatingPointError, match=r"non-finite loss at epoch 1, step \d+ .*study_ids \['s"):
        train_projector(splits["train"], splits["val"],
                        TrainConfig(**SMALL, kind="mlp", lr=1e30, warmup_epochs=0, weight_decay=0), progress=False)


def test_save_run_writes_the_run_folder(tmp_path, splits):
    r = train_projector(splits["train"], splits["val"], TrainConfig(**SMALL), progress=False)
    files = save_run(tmp_path / "main", r, {"backbone": "tiny"}, {"frozen_val_p5": 0.5})
    assert {p.name for p in (tmp_path / "main").iterdir()} == {"projector.pt", "history.csv", "config.json",
                                                               "metrics.json"}
    model, cfg = load_projector(files["projector"])
    assert cfg["backbone"] == "tiny" and cfg["kind"] == "residual_mlp"
    assert label_precision(splits["val"], model)["mean"] == pytest.approx(r.best_metric)
    metrics = json.loads(files["metrics"].read_text())
    assert metrics["best_epoch"] == r.best_epoch and metrics["frozen_val_p5"] == 0.5
    assert len(pd.read_csv(files["history"])) == len(r.history)


def write_fixture_dataset(dataset: str = "fixture", backbone: str = "tiny", n_train: int = 160, n_val: int = 64,
                          dim: int = 16, seed: int = 0) -> None:
    """A tiny study table + embedding cache under the current CXR_WORKDIR (for load_splits and notebook 02)."""
    s = synthetic_splits(n_train, n_val, dim=dim, seed=seed)
    table = pd.concat([s["train"].table, s["val"].table], ignore_index=True)
    table["report"] = np.where(table["label_abnormal"] == 1, "Cardiomegaly.", "No acute disease.")
    table_path = paths.study_table_path(dataset)
    table_path.parent.mkdir(parents=True, exist_ok=True)
    table.to_parquet(table_path)
    out = paths.embeddings_dir() / dataset / backbone
    for modality, key, arr in (("image", "image_id", "img"), ("text", "study_id", "txt")):
        emb = np.concatenate([getattr(s["train"], arr), getattr(s["val"], arr)])
        save_embeddings(out / f"{modality}.npz", Embeddings(table[key], emb, {
            "backbone": backbone, "fingerprint": "test", "modality": modality, "dim": dim}))
    # the extractor's stamp (a projector run records the cache keys it was trained on)
    (out / "done.json").write_text(json.dumps({"modalities": {m: {"key": f"test-{m}"} for m in ("image", "text")}}))


def test_load_splits_checks_backbone_and_labels(workdir):
    write_fixture_dataset()
    s = load_splits("fixture", "tiny")
    assert len(s["train"]) == 160 and len(s["val"]) == 64
    os.rename(paths.embeddings_dir() / "fixture" / "tiny", paths.embeddings_dir() / "fixture" / "clip")
    with pytest.raises(ValueError, match="backbone 'tiny', not 'clip'"):
        load_splits("fixture", "clip")
    table = pd.read_parquet(paths.study_table_path("fixture"))
    table["label_abnormal"] = table["label_abnormal"].astype(float)
    table.loc[3, "label_abnormal"] = np.nan
    table.to_parquet(paths.study_table_path("fixture"))
    with pytest.raises(ValueError, match=r"1 rows .* no 0/1 label_abnormal, e.g. study_ids \['s3'\]"):
        load_splits("fixture", "clip")
    with pytest.raises(FileNotFoundError, match="notebook 01"):
        load_splits("absent", "clip")


@pytest.mark.slow
def test_notebook_02_runs_on_fixture(workdir):
    write_fixture_dataset()
    nb = REPO / "notebooks" / "02_train.ipynb"
    out = workdir / "02_train.out.ipynb"
    env = {"CXR_WORKDIR": str(workdir), "HF_HUB_OFFLINE": "1"}
    # "fixture" is no registered data set: the smoke parameters resolved first, the fixture's name set afterwards
    from cxrlib import config as cfg_mod

    resolved = {**cfg_mod.resolve_params("smoke", "02_train", {"backbone": "tiny", "epochs": 3, "batch_size": 32,
                                                                 "width": 32, "w_supcon": 0.5}), "dataset": "fixture"}
    run_notebook(nb.name, resolved, out, env)  # in this process (papermill runs 02 in the smoke DAG)
    runs = list((workdir / "results" / "smoke-fixture" / "models").glob("bce1-supcon0.5-clip1-*"))
    assert len(runs) == 1, runs
    run_dir = runs[0]
    assert {p.name for p in run_dir.iterdir()} >= {"projector.pt", "history.csv", "config.json", "metrics.json"}
    config = json.loads((run_dir / "config.json").read_text())
    assert config["w_supcon"] == 0.5 and config["backbone"] == "tiny" and config["dataset"] == "fixture"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert {"frozen_val_p5", "best_metric", "best_epoch"} <= set(metrics)
    assert (workdir / "figures" / "smoke-fixture" / f"loss_curves_{run_dir.name}.png").is_file()
    executed = nbformat.read(out, as_version=4)
    assert any("SMOKE TEST" in "".join(o.get("text", "")) for c in executed.cells for o in c.get("outputs", []))


def test_compile_runs_the_step_through_torch_compile(splits, monkeypatch):
    """``compile=True`` hands the step's forward + loss to torch.compile once per run (here its aot_eager
    backend, no code generation) and trains to the eager run's losses up to rounding; the default does not."""
    from cxrlib import accel

    compiled = []
    real = accel.maybe_compile

    def spy(fn, enabled, **kw):
        compiled.append(enabled)
        return real(fn, enabled, **({"backend": "aot_eager"} if enabled else {}), **kw)

    monkeypatch.setattr(accel, "maybe_compile", spy)
    cfg = dict(SMALL, dropout=0.0)
    eager = train_projector(splits["train"], splits["val"], TrainConfig(**cfg), progress=False)
    comp = train_projector(splits["train"], splits["val"], TrainConfig(**cfg), progress=False, compile=True)
    assert compiled == [False, True]
    np.testing.assert_allclose(comp.history["train_total"].iloc[1:], eager.history["train_total"].iloc[1:], rtol=1e-4)
