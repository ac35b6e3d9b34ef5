"""Projector factory, identity start, normalised outputs, checkpoint round trip."""

from __future__ import annotations

import pytest
import torch

from cxrlib.projector import KINDS, build_projector, load_projector, save_projector


@pytest.mark.parametrize("kind", KINDS)
def test_outputs_are_normalised_and_classify_gives_one_logit(kind):
    torch.manual_seed(0)
    m = build_projector(kind, 16, 16, width=32, depth=2)
    out = m(torch.randn(7, 16), torch.randn(7, 16))
    for key in ("image", "text"):
        assert out[key].shape == (7, 16)
        torch.testing.assert_close(out[key].norm(dim=1), torch.ones(7))
    assert out["image_logits"].shape == (7,) and m.classify(out["text"]).shape == (7,)
    assert "image_logits" not in m(torch.randn(2, 16), torch.randn(2, 16), classify=False)


@pytest.mark.parametrize("kind", ["identity", "linear", "residual_mlp"])
def test_identity_start_reproduces_the_backbone_space(kind):
    x = torch.randn(5, 12)
    m = build_projector(kind, 12, 12, width=24).train()  # dropout active: still exact at init
    torch.testing.assert_close(m.encode_image(x), torch.nn.functional.normalize(x, dim=1))
    torch.testing.assert_close(m.encode_text(x), torch.nn.functional.normalize(x, dim=1))


def test_mlp_shapes_and_different_dims():
    m = build_projector("mlp", 10, 6, out_dim=4, width=8, depth=3)
    linears = [layer for layer in m.image_head if isinstance(layer, torch.nn.Linear)]
    assert [(lin.in_features, lin.out_features) for lin in linears] == [(10, 8), (8, 8), (8, 8), (8, 4)]
    assert m.encode_text(torch.randn(3, 6)).shape == (3, 4)
    r = build_projector("residual_mlp", 10, 6, out_dim=4)
    assert r.encode_image(torch.randn(2, 10)).shape == (2, 4)


def test_logit_scale_is_clamped_at_100():
    m = build_projector("linear", 4, 4, init_temperature=0.07)
    assert float(m.scale().detach()) == pytest.approx(1 / 0.07, rel=1e-5)
    with torch.no_grad():
        m.logit_scale.fill_(10.0)
    m.clamp_logit_scale_()  # the parameter is clamped in place (after each step), not its forward value
    assert float(m.scale().detach()) == pytest.approx(100.0)


@pytest.mark.parametrize("kwargs, match", [
    (dict(kind="transformer"), "unknown projector kind"),
    (dict(kind="mlp", depth=0), "depth"),
    (dict(kind="mlp", activation="swishy"), "activation"),
    (dict(kind="mlp", dropout=1.0), "dropout"),
    (dict(kind="linear", in_dim_text=8), "dims differ"),
    (dict(kind="identity", out_dim=3), "identity"),
])
def test_bad_settings_raise(kwargs, match):
    args = dict(in_dim_image=4, in_dim_text=4) | kwargs
    with pytest.raises(ValueError, match=match):
        build_projector(args.pop("kind"), args.pop("in_dim_image"), args.pop("in_dim_text"), **args)


def test_save_load_round_trip(tmp_path):
    torch.manual_seed(1)
    m = build_projector("residual_mlp", 8, 8, width=16, depth=2, dropout=0.0, classifier_hidden=4)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    cfg = {"w_bce": 1.0, "backbone": "tiny", "nested": {"a": [1, 2]}}
    path = save_projector(tmp_path / "run" / "projector.pt", m, cfg)
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no temp file left behind
    m2, cfg2 = load_projector(path)
    assert cfg2 == cfg and not m2.training
    x, t = torch.randn(3, 8), torch.randn(3, 8)
    m.eval()
    for k, v in m(x, t).items():
        torch.testing.assert_close(m2(x, t)[k], v)


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="notebook 02"):
        load_projector(tmp_path / "missing.pt")
    torch.save({"weights": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a cxrlib projector"):
        load_projector(tmp_path / "other.pt")
