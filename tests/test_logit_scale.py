"""The CLIP logit scale is clamped as a parameter (in place, after the step), so it can come back from the bound."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from cxrlib.projector import (
    MAX_LOGIT_SCALE,
    build_projector,
    clamp_logit_scale_,
    load_projector,
    save_projector,
)

BOUND = math.log(MAX_LOGIT_SCALE)


def test_scale_at_the_bound_still_gets_a_gradient_and_comes_back():
    """Push the scale up past the bound for a while, then down: it must leave the bound again.

    With the value clamped in the forward pass (the old code) the parameter drifted past log(100), its
    gradient was 0 and the second phase could not move it."""
    model = build_projector("linear", 4, 4, init_temperature=0.05)
    opt = torch.optim.SGD([model.logit_scale], lr=0.05)
    for _ in range(200):  # a loss that wants a larger scale
        opt.zero_grad()
        (-model.scale()).backward()
        opt.step()
        model.clamp_logit_scale_()
    assert float(model.logit_scale.detach()) == pytest.approx(BOUND) and float(model.scale().detach()) == pytest.approx(100.0)
    opt.zero_grad()
    model.scale().backward()
    assert float(model.logit_scale.grad) == pytest.approx(100.0)  # d exp(s)/ds at the bound, not 0
    for _ in range(5):  # now a loss that wants a smaller scale
        opt.zero_grad()
        model.scale().backward()
        opt.step()
        model.clamp_logit_scale_()
    assert float(model.scale().detach()) < 99.0


def test_clamp_is_in_place_and_records_no_gradient():
    p = torch.nn.Parameter(torch.tensor(7.0))
    assert clamp_logit_scale_(p) is p and float(p.detach()) == pytest.approx(BOUND) and p.grad_fn is None
    p = torch.nn.Parameter(torch.tensor(-1.0))
    assert float(clamp_logit_scale_(p).detach()) == 0.0
    with pytest.raises(ValueError, match="init_temperature"):
        build_projector("linear", 4, 4, init_temperature=0.001)


def test_training_keeps_the_parameter_within_the_bound(monkeypatch):
    """``train_projector`` clamps the parameter after each step: exact pairs make the CLIP loss want an ever larger
    scale, and every forward pass must see the *parameter* (not only its clamped value) at most log(100)."""
    import numpy as np

    from cxrlib.projector import ProjectorModel
    from cxrlib.train import TrainConfig, synthetic_splits, train_projector

    rng = np.random.default_rng(0)

    def exact_pairs(split):  # a low dimension: pairs are not trivially separated, so the gradient is not 0
        x = rng.standard_normal((len(split), 4)).astype(np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        return dataclasses.replace(split, img=x, txt=x.copy())

    seen: list[float] = []
    original = ProjectorModel.scale

    def spy(self):
        seen.append(float(self.logit_scale.detach()))
        return original(self)

    monkeypatch.setattr(ProjectorModel, "scale", spy)
    torch.set_num_threads(1)
    splits = {k: exact_pairs(v) for k, v in synthetic_splits(128, 48, dim=16, seed=0).items()}
    cfg = TrainConfig(kind="identity", batch_size=64, epochs=3, lr=0.1, weights={"bce": 0.0, "supcon": 0.0, "clip": 1.0},
                      clip_temperature=0.0125, learn_temperature=True)
    r = train_projector(splits["train"], splits["val"], cfg, progress=False)
    assert max(seen) == pytest.approx(BOUND)  # it reached the bound ...
    assert max(seen) <= BOUND + 1e-6          # ... and never went past it
    assert float(r.history["logit_scale"].max()) <= MAX_LOGIT_SCALE * (1 + 1e-5)


def test_loading_an_old_checkpoint_clamps_it(tmp_path):
    model = build_projector("linear", 4, 4)
    with torch.no_grad():
        model.logit_scale.fill_(9.0)  # as a checkpoint trained under the value clamp could hold
    save_projector(tmp_path / "p.pt", model, {})
    back, _ = load_projector(tmp_path / "p.pt")
    assert float(back.logit_scale.detach()) == pytest.approx(BOUND)


def test_settings_bound_equals_the_projector_bound():
    """The settings schema rejects a clip_temperature the projector would refuse (up front, not in node 02)."""
    from cxrlib import settings

    check = settings.lookup("02_train", "clip_temperature").check
    assert check(1.0 / MAX_LOGIT_SCALE) == pytest.approx(1.0 / MAX_LOGIT_SCALE)
    with pytest.raises(settings.SettingError):
        check(0.5 / MAX_LOGIT_SCALE)
    build_projector("linear", 4, 4, init_temperature=1.0 / MAX_LOGIT_SCALE)  # the bound itself is accepted


def test_lora_tower_gets_a_gradient_at_the_bound_and_its_trainer_clamps(monkeypatch):
    """The LoRA text-tower trainer follows the same rule: at the bound its forward still passes a gradient to
    ``logit_scale`` (``exp().clamp(max=100)`` gave 0 there: exp(log 100) rounds above 100 in float32), and
    training brings a parameter past the bound back to it."""
    import numpy as np

    from cxrlib import lora
    from cxrlib import text_towers as tt

    tower, tok = tt.build_text_tower("tiny-llama")
    model = lora.ProjectedTower(tower, 16)
    with torch.no_grad():
        model.logit_scale.fill_(BOUND)
    out = model(torch.randn(2, 16), tok(["a b", "c d"]))
    out["logit_scale"].backward()
    assert float(model.logit_scale.grad) == pytest.approx(100.0, rel=1e-4)

    original = lora.ProjectedTower.__init__

    def past_the_bound(self, *a, **k):  # a tower whose parameter starts past the bound
        original(self, *a, **k)
        with torch.no_grad():
            self.logit_scale.fill_(BOUND + 1.0)

    monkeypatch.setattr(lora.ProjectedTower, "__init__", past_the_bound)
    texts = ["no acute disease", "small left effusion", "heart enlarged", "clear lungs", "normal", "edema"]
    img = np.random.default_rng(0).standard_normal((len(texts), 16)).astype(np.float32)
    cfg = lora.LoraTrainConfig(lora=lora.LoraSettings(r=4, alpha=8, dropout=0.0), epochs=2, lr=1e-2, batch_size=6)
    trained, _, _ = lora.train_lora("tiny-llama", texts, img, np.array([0, 1, 1, 1, 0, 1]), cfg, progress=False)
    assert float(trained.logit_scale.detach()) <= BOUND + 1e-6


def test_adaptation_forward_passes_a_gradient_at_the_bound():
    """Backbone adaptation: a pretrained CLIP's logit scale sits at log(100) (4.6051702 in float32, just above the
    float64 bound), where ``clamp(max=log(100))`` gave it no gradient from the first step."""
    from cxrlib.adapt import AdaptModel
    from cxrlib.backbones import load_backbone

    b = load_backbone("tiny")
    with torch.no_grad():
        b.model.logit_scale.fill_(BOUND)
    net = AdaptModel(b.model, b.embed_dim, text_is_features=True)
    out = net(torch.randn(2, 3, 64, 64), torch.nn.functional.normalize(torch.randn(2, b.embed_dim), dim=1))
    out["logit_scale"].backward()
    assert float(b.model.logit_scale.grad) == pytest.approx(100.0, rel=1e-4)
