"""Loss terms against independent references: naive loops, hand-worked cases, the raw libraries."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from pytorch_metric_learning.losses import SupConLoss

from cxrlib.losses import BCETerm, ClipTerm, CrossModalSupCon, MultiTaskLoss
from cxrlib.train import TrainConfig, synthetic_splits, train_projector

REPO = Path(__file__).resolve().parents[1]


def _norm(x):
    return F.normalize(torch.as_tensor(x, dtype=torch.float64), dim=1)


def supcon_reference(anchors, refs, a_labels, r_labels, tau: float) -> float:
    """SupCon L_out written as loops: anchor i's positives are refs with its label (the pair included);
    anchors without positives are left out of the mean; no positive or no negative pair at all -> 0."""
    a, r = _norm(anchors).tolist(), _norm(refs).tolist()
    a_labels, r_labels = [int(v) for v in a_labels], [int(v) for v in r_labels]
    pairs = [(i, j) for i in range(len(a)) for j in range(len(r))]
    if not any(a_labels[i] == r_labels[j] for i, j in pairs) or not any(a_labels[i] != r_labels[j] for i, j in pairs):
        return 0.0
    losses = []
    for i in range(len(a)):
        sims = [sum(p * q for p, q in zip(a[i], r[j])) / tau for j in range(len(r))]
        log_den = math.log(sum(math.exp(s) for s in sims))
        pos = [j for j in range(len(r)) if r_labels[j] == a_labels[i]]
        if pos:
            losses.append(-sum(sims[j] - log_den for j in pos) / len(pos))
    return sum(losses) / len(losses)


def cross_modal_reference(img, txt, labels, tau):
    return (supcon_reference(img, txt, labels, labels, tau) + supcon_reference(txt, img, labels, labels, tau)) / 2


def clip_reference(img, txt, scale: float) -> float:
    """Symmetric InfoNCE on the diagonal, as loops."""
    i, t = _norm(img).tolist(), _norm(txt).tolist()
    n = len(i)

    def ce(q, g):
        total = 0.0
        for a in range(n):
            logits = [scale * sum(x * y for x, y in zip(q[a], g[b])) for b in range(n)]
            total += math.log(sum(math.exp(v) for v in logits)) - logits[a]
        return total / n

    return (ce(i, t) + ce(t, i)) / 2


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(12, 8, generator=g), dim=1)
    txt = F.normalize(torch.randn(12, 8, generator=g), dim=1)
    labels = torch.tensor([0, 1, 1, 0, 1, 1, 1, 0, 0, 1, 0, 1])
    return img, txt, labels


def test_supcon_matches_loop_reference(batch):
    img, txt, labels = batch
    got = CrossModalSupCon(temperature=0.1)(img, txt, labels)
    assert float(got) == pytest.approx(cross_modal_reference(img, txt, labels, 0.1), rel=1e-5)


def test_supcon_hand_worked_two_pairs():
    # orthogonal classes, each image identical to its report: every anchor has one positive (sim 1) and
    # one negative (sim 0), so each term is log(1 + exp(-1/tau))
    e = torch.eye(2)
    got = CrossModalSupCon(temperature=0.5)(e, e.clone(), torch.tensor([0, 1]))
    assert float(got) == pytest.approx(math.log(1 + math.exp(-2.0)), rel=1e-6)


def test_supcon_counts_the_paired_report_as_positive():
    """The PML pitfall: the same label object as ref_labels drops the pair; our module must not."""
    img = F.normalize(torch.randn(6, 5, generator=torch.Generator().manual_seed(1)), dim=1)
    txt = F.normalize(img + 0.1 * torch.randn(6, 5, generator=torch.Generator().manual_seed(2)), dim=1)
    labels = torch.tensor([0, 0, 0, 1, 1, 2])  # label 2: the pair is the only positive
    ours = float(CrossModalSupCon(0.1)(img, txt, labels))
    assert ours == pytest.approx(cross_modal_reference(img, txt, labels, 0.1), rel=1e-5)
    pitfall = SupConLoss(temperature=0.1)
    wrong = (float(pitfall(img, labels, ref_emb=txt, ref_labels=labels)) +
             float(pitfall(txt, labels, ref_emb=img, ref_labels=labels))) / 2
    assert abs(wrong - ours) > 1e-3


def test_supcon_one_class_batch_is_zero_with_finite_grad():
    img = F.normalize(torch.randn(5, 4), dim=1).requires_grad_()
    txt = F.normalize(torch.randn(5, 4), dim=1)
    loss = CrossModalSupCon(0.1)(img, txt, torch.ones(5, dtype=torch.long))
    assert float(loss.detach()) == 0.0 == cross_modal_reference(img.detach(), txt, [1] * 5, 0.1)
    loss.backward()
    assert torch.isfinite(img.grad).all()


def test_supcon_anchor_without_positive_is_left_out():
    """PML's SupConLoss (as our module calls it) averages over anchors that have positives only."""
    g = torch.Generator().manual_seed(3)
    a, r = F.normalize(torch.randn(4, 6, generator=g), dim=1), F.normalize(torch.randn(5, 6, generator=g), dim=1)
    a_lab, r_lab = torch.tensor([0, 1, 1, 2]), torch.tensor([0, 0, 1, 1, 1])  # anchor 3 has no positive
    got = float(SupConLoss(temperature=0.2)(a, a_lab, ref_emb=r, ref_labels=r_lab))
    assert got == pytest.approx(supcon_reference(a, r, a_lab, r_lab, 0.2), rel=1e-5)
    with_anchor3_as_zero = supcon_reference(a[:3], r, a_lab[:3], r_lab, 0.2)
    assert got == pytest.approx(with_anchor3_as_zero, rel=1e-5)


def test_duplicate_reports_in_one_batch(batch):
    img, txt, labels = batch
    txt = txt.clone()
    txt[4] = txt[1]  # two studies with the same report text (same label 1)
    scale = torch.tensor(10.0)
    assert float(ClipTerm()(img, txt, scale)) == pytest.approx(clip_reference(img, txt, 10.0), rel=1e-5)
    assert float(CrossModalSupCon(0.1)(img, txt, labels)) == pytest.approx(
        cross_modal_reference(img, txt, labels, 0.1), rel=1e-5)


def test_clip_matches_loop_reference_and_hand_worked(batch):
    img, txt, _ = batch
    assert float(ClipTerm()(img, txt, torch.tensor(14.3))) == pytest.approx(clip_reference(img, txt, 14.3), rel=1e-5)
    e = torch.eye(2)  # each direction: log(1 + exp(-s)) per row
    assert float(ClipTerm()(e, e, torch.tensor(3.0))) == pytest.approx(math.log(1 + math.exp(-3.0)), rel=1e-6)


def test_bce_matches_formula_with_pos_weight():
    logits, y = torch.tensor([2.0, -1.0, 0.5, -3.0]), torch.tensor([1, 0, 0, 1])
    sig = lambda v: 1 / (1 + math.exp(-v))  # noqa: E731
    for pw in (None, 2.5):
        w = pw or 1.0
        ref = -sum(w * yi * math.log(sig(x)) + (1 - yi) * math.log(1 - sig(x))
                   for x, yi in zip(logits.tolist(), y.tolist())) / 4
        assert float(BCETerm(pw)(logits, y)) == pytest.approx(ref, rel=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs_are_upcast(batch, dtype):
    img, txt, labels = batch
    out = {"image": img.to(dtype), "text": txt.to(dtype), "logit_scale": torch.tensor(14.0, dtype=dtype),
           "image_logits": img[:, 0].to(dtype), "text_logits": txt[:, 0].to(dtype)}
    got = MultiTaskLoss()(out, labels)
    ref = MultiTaskLoss()({k: v.float() for k, v in out.items()}, labels)
    for k in ("clip", "supcon", "bce", "total"):
        assert got[k].dtype == torch.float32 and torch.isfinite(got[k])
        assert float(got[k]) == pytest.approx(float(ref[k]), rel=1e-6)
    # and close to the full-precision inputs
    full = MultiTaskLoss()({"image": img, "text": txt, "logit_scale": torch.tensor(14.0),
                            "image_logits": img[:, 0], "text_logits": txt[:, 0]}, labels)
    assert float(got["total"]) == pytest.approx(float(full["total"]), rel=2e-2)


def test_multitask_total_and_skipped_terms(batch, monkeypatch):
    img, txt, labels = batch
    out = {"image": img, "text": txt, "logit_scale": torch.tensor(10.0),
           "image_logits": img[:, 0], "text_logits": txt[:, 1]}
    full = MultiTaskLoss({"bce": 0.5, "supcon": 2.0, "clip": 1.5})(out, labels)
    assert float(full["total"]) == pytest.approx(
        0.5 * float(full["bce"]) + 2.0 * float(full["supcon"]) + 1.5 * float(full["clip"]), rel=1e-6)
    bce_both = (float(BCETerm()(img[:, 0], labels)) + float(BCETerm()(txt[:, 1], labels))) / 2
    assert float(full["bce"]) == pytest.approx(bce_both, rel=1e-6)
    assert float(MultiTaskLoss(bce_on="image")(out, labels)["bce"]) == pytest.approx(
        float(BCETerm()(img[:, 0], labels)), rel=1e-6)

    loss = MultiTaskLoss({"bce": 1.0, "supcon": 0.0, "clip": 0.0})

    def boom(*a, **k):
        raise AssertionError("a term with weight 0 was computed")

    monkeypatch.setattr(loss.terms["supcon"], "forward", boom)
    monkeypatch.setattr(loss.terms["clip"], "forward", boom)
    terms = loss({k: v for k, v in out.items()}, labels)
    assert set(terms) == {"bce", "total"} and float(terms["total"]) == pytest.approx(float(terms["bce"]))
    no_logits = {"image": img, "text": txt, "logit_scale": torch.tensor(10.0)}
    assert set(MultiTaskLoss({"bce": 0})(no_logits, labels)) == {"clip", "supcon", "total"}
    with pytest.raises(ValueError, match="classifier logits"):
        MultiTaskLoss({"bce": 1})(no_logits, labels)


@pytest.mark.parametrize("kwargs, match", [
    ({"weights": {"bce": -1}}, "w_bce must be a number >= 0"),
    ({"weights": {"supcon": float("nan")}}, "w_supcon must be a number >= 0"),
    ({"weights": {"bce": 0, "supcon": 0, "clip": 0}}, "all loss weights are 0"),
    ({"weights": {"focal": 1.0}}, "unknown loss terms"),
    ({"temperature": 0.1}, "unknown loss options"),
    ({"bce_on": "report"}, "bce_on"),
    ({"supcon_temperature": 0}, "temperature"),
    ({"pos_weight": -2.0}, "pos_weight"),
])
def test_bad_settings_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MultiTaskLoss(**kwargs)


def _toy_batch():
    g = torch.Generator().manual_seed(7)
    return torch.randn(8, 6, generator=g), torch.randn(8, 6, generator=g), torch.tensor([0, 1, 1, 0, 1, 0, 0, 1])


def _toy_loss(img_raw, txt_raw, labels, loss_fn):
    torch.manual_seed(0)
    head_i, head_t, clf = torch.nn.Linear(6, 4), torch.nn.Linear(6, 4), torch.nn.Linear(4, 1)
    zi, zt = F.normalize(head_i(img_raw), dim=1), F.normalize(head_t(txt_raw), dim=1)
    out = {"image": zi, "text": zt, "logit_scale": torch.tensor(10.0),
           "image_logits": clf(zi).squeeze(-1), "text_logits": clf(zt).squeeze(-1)}
    terms = loss_fn(out, labels)
    terms["total"].backward()
    params = [*head_i.parameters(), *head_t.parameters(), *clf.parameters()]
    return {k: float(v.detach()) for k, v in terms.items()}, [p.grad for p in params]


def _toy_splits():
    s = synthetic_splits(64, 16, dim=8, seed=0, nuisance_rank=4)
    return s["train"], s["val"]


_TOY_CFG = TrainConfig(width=8, batch_size=64, epochs=2, dropout=0.0, lr=1e-2, warmup_epochs=0)


def _rank_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)  # two ranks on a 2-core machine: one thread each
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        img, txt, labels = _toy_batch()
        part = slice(rank * 4, (rank + 1) * 4)
        terms, grads = _toy_loss(img[part], txt[part], labels[part], MultiTaskLoss())  # rank/world from the group
        for g in grads:  # what DDP does: average gradients over ranks
            dist.all_reduce(g)
            g /= world
        run = train_projector(*_toy_splits(), _TOY_CFG, progress=False)  # DDP path of the trainer
        torch.save({"terms": terms, "grads": grads, "history": run.history, "state": run.model.state_dict()},
                   f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_equal_one_process_with_the_whole_batch(tmp_path):
    """Under torch.distributed both contrastive terms gather all ranks' features: two ranks with half a
    batch each give the loss and the (averaged) gradients of one process holding the whole batch."""
    # The ranks are forked (they start at once) from a fresh interpreter, not from this pytest process: a fork
    # inherits its parent's autograd state, and after some other test's torch.compile'd backward a forked
    # child's backward fails ("autograd's threading"); spawning instead fails in an xdist worker (no __main__
    # spec).
    driver = ("import sys, torch.multiprocessing as mp; sys.path.insert(0, sys.argv[1]); import test_losses as t; "
              "mp.start_processes(t._rank_worker, args=(2, sys.argv[2] + '/init', sys.argv[2]), nprocs=2, "
              "join=True, start_method='fork')")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, "-c", driver, str(REPO / "tests"), str(tmp_path)], env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]  # our own files
    img, txt, labels = _toy_batch()
    terms, grads = _toy_loss(img, txt, labels, MultiTaskLoss(rank=0, world_size=1))
    for k in ("clip", "supcon", "bce", "total"):
        assert sum(r["terms"][k] for r in ranks) / 2 == pytest.approx(terms[k], rel=1e-5), k
    for g_dist, g_ref in zip(ranks[0]["grads"], grads):
        torch.testing.assert_close(g_dist, g_ref, rtol=1e-4, atol=1e-6)
    # the trainer under two ranks (one global batch of 64 = 2 x 32) equals one process on the whole batch
    single = train_projector(*_toy_splits(), _TOY_CFG, progress=False)
    cols = ["train_clip", "train_supcon", "train_bce", "train_total", "val_p5"]
    for r in ranks:
        pd.testing.assert_frame_equal(r["history"][cols], single.history[cols], rtol=1e-4)
        for k, v in single.model.state_dict().items():
            torch.testing.assert_close(r["state"][k], v, rtol=1e-4, atol=1e-6)
    local_only = _toy_loss(img[:4], txt[:4], labels[:4], MultiTaskLoss(rank=0, world_size=1))[0]
    assert abs(local_only["supcon"] - ranks[0]["terms"]["supcon"]) > 1e-4  # rank 0 did see rank 1's features


def test_supcon_is_the_mean_over_all_anchors_including_a_zero_loss_anchor():
    """A class with one member at a low temperature: that anchor's float32 loss is exactly 0, and it still
    counts in the mean (PML's default AvgNonZeroReducer left it out, so the term was not the anchor mean)."""
    g = torch.Generator().manual_seed(5)
    base = torch.zeros(5, 6)
    base[:4, :5] = torch.randn(4, 5, generator=g)
    base[4, 5] = 1.0  # orthogonal to every other item
    img = F.normalize(base, dim=1)
    txt = F.normalize(base + 0.3 * torch.cat([torch.randn(4, 6, generator=g), torch.zeros(1, 6)]) * (base != 0), dim=1)
    labels = torch.tensor([0, 0, 1, 1, 2])  # class 2 has one member
    tau = 0.01
    pml = SupConLoss(temperature=tau, reducer=__import__("pytorch_metric_learning.reducers",
                                                          fromlist=["DoNothingReducer"]).DoNothingReducer())
    per_anchor = pml(img, labels, ref_emb=txt, ref_labels=labels.clone())["loss"]["losses"]
    assert per_anchor[4] == 0.0 and (per_anchor[:4] > 0).all()  # the case really arises in float32
    got = float(CrossModalSupCon(temperature=tau)(img, txt, labels))
    assert got == pytest.approx(cross_modal_reference(img, txt, labels, tau), rel=1e-5)
    assert got == pytest.approx(float((per_anchor.mean() + pml(txt, labels, ref_emb=img, ref_labels=labels.clone())
                                       ["loss"]["losses"].mean()) / 2), rel=1e-6)


def _pml_mean_supcon(anchor, labels, ref, ref_labels, tau):
    from pytorch_metric_learning.reducers import MeanReducer

    return SupConLoss(temperature=tau, reducer=MeanReducer())(anchor, labels, ref_emb=ref, ref_labels=ref_labels.clone())


@pytest.mark.parametrize("seed", range(8))
def test_supcon_equals_pml_supcon_loss_bit_for_bit(seed):
    """losses.supcon is PML's SupConLoss with its MeanReducer on the same inputs: the same float32 value and the
    same gradients, bit for bit, over random batch sizes, reference sets, label counts and temperatures."""
    from cxrlib.losses import supcon

    g = torch.Generator().manual_seed(seed)
    for _ in range(6):
        b = int(torch.randint(2, 80, (), generator=g))
        r = b * int(torch.randint(1, 3, (), generator=g))
        d, n_cls = int(torch.randint(2, 40, (), generator=g)), int(torch.randint(1, 4, (), generator=g))
        tau = float(torch.empty(()).uniform_(0.02, 1.0, generator=g))
        a, ref = torch.randn(b, d, generator=g, requires_grad=True), torch.randn(r, d, generator=g, requires_grad=True)
        la = torch.randint(0, n_cls, (b,), generator=g)
        lr = torch.cat([la, torch.randint(0, n_cls, (r - b,), generator=g)])
        want = _pml_mean_supcon(a, la, ref, lr, tau)
        got = supcon(a, la, ref, lr, tau)
        assert torch.equal(got.detach(), want.detach())
        for x, y in zip(torch.autograd.grad(got, (a, ref)), torch.autograd.grad(want, (a, ref), allow_unused=True)):
            assert torch.equal(x, torch.zeros_like(x) if y is None else y)


@pytest.mark.parametrize("case", ["one class", "one anchor, two references", "one of each"])
def test_supcon_zero_cases_are_pmls(case):
    """PML's zero cases: no negative pair, or at most one positive and one negative pair (zero gradient too)."""
    from cxrlib.losses import supcon

    g = torch.Generator().manual_seed(1)
    la, lr = {"one class": ([1, 1, 1], [1, 1, 1]), "one anchor, two references": ([0], [0, 1]),
              "one of each": ([0], [0])}[case]
    a = torch.randn(len(la), 5, generator=g, requires_grad=True)
    ref = torch.randn(len(lr), 5, generator=g, requires_grad=True)
    la, lr = torch.tensor(la), torch.tensor(lr)
    got = supcon(a, la, ref, lr, 0.1)
    assert float(got.detach()) == 0.0 == float(_pml_mean_supcon(a, la, ref, lr, 0.1).detach())
    assert torch.equal(torch.autograd.grad(got, a)[0], torch.zeros_like(a))


def test_the_loss_forward_reads_nothing_back_to_the_host(batch):
    """No term's forward asks for a value on the host (``.item()``, ``bool()``, ``nonzero``, one-argument
    ``where``...): on a GPU each such call waits for the device, and a step could not be queued ahead. PML's
    SupConLoss made about ten such calls a step."""
    img, txt, labels = batch
    seen = []

    class Watch(torch.overrides.TorchFunctionMode):
        HOST = {"item", "__bool__", "nonzero", "tolist", "__int__", "__float__", "__index__", "argwhere",
                "masked_select", "unique"}

        def __torch_function__(self, func, types, args=(), kwargs=None):
            name = getattr(func, "__name__", str(func))
            if name in self.HOST or (name == "where" and len(args) == 1 and not kwargs):
                seen.append(name)
            return func(*args, **(kwargs or {}))

    loss = MultiTaskLoss({t: 1.0 for t in ("bce", "supcon", "clip")}, pos_weight=2.0)
    out = {"image": img, "text": txt, "logit_scale": torch.tensor(1 / 0.07),
           "image_logits": img[:, 0], "text_logits": txt[:, 0]}
    with Watch():
        loss(out, labels)
    assert seen == []
    with Watch():  # the watch does see such calls
        bool(labels.any())
    assert seen == ["__bool__"]


def test_bce_pos_weight_tensor_is_made_once_per_device(batch):
    """The class weight is one tensor per device, reused by every step (no host-to-device copy per step)."""
    img, _, labels = batch
    term = BCETerm(pos_weight=2.5)
    first = term(img[:, 0], labels)
    assert torch.equal(term(img[:, 0], labels), first) and len(term._pos_weight_on) == 1
    want = F.binary_cross_entropy_with_logits(img[:, 0], labels.float(), pos_weight=torch.tensor(2.5))
    assert torch.equal(first, want)
