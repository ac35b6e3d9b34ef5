"""Backbones: names, the tiny/offline models, checkpoints, and the offline BiomedCLIP load path."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from cxrlib import backbones
from cxrlib.backbones import load_backbone


@pytest.fixture(scope="module")
def tiny():
    return load_backbone("tiny")


def test_unknown_name_lists_valid_ones():
    with pytest.raises(ValueError, match="valid names: biomedclip, clip, tiny, offline"):
        load_backbone("resnet-from-nowhere")
    for bad in ("open_clip:ViT-B-16", "open_clip::openai", "local-dir:"):
        with pytest.raises(ValueError, match="unknown backbone"):
            backbones.validate_backbone_name(bad)
    assert backbones.validate_backbone_name("open_clip:ViT-B-16:openai") == "open_clip:ViT-B-16:openai"


def test_tiny_contract(tiny):
    assert tiny.name == "tiny" and tiny.embed_dim == 32 and tiny.context_length == 32
    x = tiny.preprocess(Image.new("RGB", (300, 200), 128))
    assert x.shape == (3, 64, 64) and x.dtype == torch.float32
    tokens = tiny.tokenizer(["no acute disease", "small left effusion"])
    assert tokens.dtype == torch.long and tokens.shape == (2, 32)
    with torch.inference_mode():
        assert tiny.model.encode_image(x[None]).shape == (1, 32)
        assert tiny.model.encode_text(tokens).shape == (2, 32)
    assert not tiny.model.training


def test_random_init_is_deterministic_and_fingerprinted(tiny):
    again = load_backbone("tiny")
    assert again.fingerprint == tiny.fingerprint and len(tiny.fingerprint) == 16
    for (k, a), (_, b) in zip(tiny.model.state_dict().items(), again.model.state_dict().items()):
        assert torch.equal(a, b), k
    # the global RNG is untouched by the seeded init
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    load_backbone("tiny")
    assert torch.equal(torch.rand(3), expected)


def test_adapted_checkpoint_roundtrip_and_mismatch(tiny, tmp_path):
    adapted = load_backbone("tiny")
    with torch.no_grad():
        adapted.model.visual.proj.add_(0.5)
    path = backbones.save_adapted(tmp_path / "tiny-adapted.pt", adapted)
    back = load_backbone("tiny", checkpoint=path)
    assert back.fingerprint != tiny.fingerprint
    assert torch.equal(back.model.visual.proj, adapted.model.visual.proj)
    # a plain state dict works too
    torch.save(adapted.model.state_dict(), tmp_path / "plain.pt")
    assert load_backbone("tiny", checkpoint=tmp_path / "plain.pt").fingerprint == back.fingerprint
    # wrong backbone name recorded in the checkpoint
    obj = torch.load(path, weights_only=True)
    obj["backbone"] = "offline"
    torch.save(obj, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="saved from backbone 'offline'"):
        load_backbone("tiny", checkpoint=tmp_path / "other.pt")
    # a state dict whose shapes do not match the config
    state = dict(adapted.model.state_dict())
    state["visual.proj"] = torch.zeros(3, 3)
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="does not match"):
        load_backbone("tiny", checkpoint=tmp_path / "bad.pt")
    with pytest.raises(FileNotFoundError):
        load_backbone("tiny", checkpoint=tmp_path / "missing.pt")
