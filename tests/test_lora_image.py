"""LoRA on the image tower (optional switch): target checks per tower kind, training from images moves the
image adapters, a checkpoint of adapters + projection + config that reloads into fresh towers with the
same embeddings, and refusals (another image tower's weights, a text-only loader)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from cxrlib import lora, lora_image
from cxrlib.backbones import load_backbone

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py

TEXTS = ["No acute cardiopulmonary abnormality.", "Small left pleural effusion.", "Mild cardiomegaly.",
         "Right lower lobe consolidation.", "No pneumothorax.", "Moderate pulmonary edema."]
LABELS = np.array([0, 1, 1, 1, 0, 1])


def _images(folder, n=len(TEXTS)):
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        p = folder / f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, (72, 80), dtype=np.uint8), mode="L").save(p)
        paths.append(str(p))
    return paths


def _cfg(epochs=2):
    return lora.LoraTrainConfig(lora=lora.LoraSettings(r=4, alpha=8, dropout=0.0), epochs=epochs, lr=1e-2,
                                batch_size=6)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    folder = tmp_path_factory.mktemp("imgs")
    paths = _images(folder)
    model, tok, pre, info = lora_image.train_image_lora("tiny-llama", "tiny", paths, TEXTS, LABELS, _cfg(),
                                                        lora.LoraSettings(r=2, alpha=4, dropout=0.0), progress=False)
    return model, tok, pre, info, paths


def test_default_targets_by_tower_kind_and_absent_ones_named():
    visual = load_backbone("tiny").model.visual
    assert lora_image.tower_kind(visual) == "open_clip.VisionTransformer"
    assert lora_image.resolve_image_targets(visual, lora.LoraSettings()) == ("c_fc", "c_proj")
    with pytest.raises(ValueError, match=r"\['qkv'\] do not exist.*c_fc"):
        lora_image.resolve_image_targets(visual, lora.LoraSettings(target_modules=("c_fc", "qkv")))
    with pytest.raises(ValueError, match="out_proj of nn.MultiheadAttention"):
        lora_image.resolve_image_targets(visual, lora.LoraSettings(target_modules=("out_proj",)))


def test_timm_towers_have_default_targets():
    import timm

    with torch.random.fork_rng(devices=[]):
        eff = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0)
        vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, depth=1)
    assert lora_image.tower_kind(eff) == "timm.EfficientNet"
    assert lora_image.resolve_image_targets(eff, lora.LoraSettings()) == ("conv_pw", "conv_pwl")
    assert lora_image.tower_kind(vit) == "timm.VisionTransformer"
    lora_image.add_image_lora(vit, lora.LoraSettings(r=2))
    wrapped = {n.rsplit(".lora_A", 1)[0] for n, _ in vit.named_parameters() if ".lora_A." in n}
    assert wrapped == {"blocks.0.attn.qkv", "blocks.0.attn.proj"}  # not patch_embed.proj
    assert all(("lora_" in n) == p.requires_grad for n, p in vit.named_parameters())


def test_training_moves_the_image_adapters(trained):
    model, _, _, info, _ = trained
    hist = info["history"]
    assert len(hist) == 2 and np.isfinite(hist[-1]["total"])
    b = [p for n, p in model.visual.named_parameters() if "lora_B" in n]
    assert b and any(p.abs().max() > 0 for p in b)  # LoRA's B starts at 0: training moved it
    base = [n for n, p in model.visual.named_parameters() if p.requires_grad and "lora_" not in n]
    assert not base


def test_checkpoint_holds_adapters_only_and_reloads_with_the_same_embeddings(trained, tmp_path):
    model, tok, pre, _, paths = trained
    path = lora_image.save_image_lora(tmp_path / "il.pt", model, {"note": "x"})
    saved = lora.read_lora(path)
    image_keys = [k for k in saved["state"] if k.startswith("image.")]
    assert image_keys and all("lora_" in k for k in image_keys)
    assert all(k.startswith(("adapters.", "params.", "image.")) for k in saved["state"])
    assert saved["config"]["image_lora"]["backbone"] == "tiny" and saved["config"]["note"] == "x"
    again, tok2, pre2, _ = lora_image.load_image_lora(path)
    model.eval()
    pixels = lora_image.ImageRows(paths, pre)(list(range(len(paths))))
    with torch.no_grad():
        assert torch.allclose(model.encode_image(pixels), again.encode_image(pixels), atol=1e-6)
        assert torch.allclose(model.encode_text(tok(TEXTS)), again.encode_text(tok2(TEXTS)), atol=1e-6)
        fresh = load_backbone("tiny").model.visual
        assert not torch.allclose(fresh(pixels), again.encode_image(pixels), atol=1e-4)  # the adapters matter
    bb = lora_image.image_lora_backbone(again, tok2, pre2, "il")
    assert bb.embed_dim == model.out_dim
    assert bb.fingerprint == lora_image.image_lora_backbone(model, tok, pre, "il").fingerprint
    with pytest.raises(ValueError, match="image-tower adapters too.*load_image_lora"):
        lora.load_lora(path)


def test_image_adapters_from_other_weights_are_refused(trained, tmp_path):
    model, *_ = trained
    path = lora_image.save_image_lora(tmp_path / "il.pt", model)
    obj = torch.load(path, weights_only=True)
    obj["config"]["image_lora"]["base_fingerprint"] = "0" * 16
    torch.save(obj, path)
    with pytest.raises(ValueError, match="image adapters were trained on backbone 'tiny'"):
        lora_image.load_image_lora(path)


def test_bad_inputs_are_named(tmp_path):
    with pytest.raises(ValueError, match="2 images, 6 texts"):
        lora_image.train_image_lora("tiny-llama", "tiny", ["a", "b"], TEXTS, LABELS, _cfg())
    with pytest.raises(ValueError, match="no image tower"):
        lora_image.train_image_lora("tiny-llama", "text:tiny-llama", _images(tmp_path), TEXTS, LABELS, _cfg())


def test_offline_efficientnet_tower_conv_adapters_keep_batch_norm_statistics(tmp_path):
    """Conv LoRA in the offline EfficientNet-Lite0 tower: its batch-norm statistics stay the loaded ones
    (the base runs in eval mode; they are not in the checkpoint), so the reload gives the same embeddings."""
    paths = _images(tmp_path)
    model, tok, pre, _ = lora_image.train_image_lora("tiny-llama", "offline", paths, TEXTS, LABELS, _cfg(epochs=1),
                                                     lora.LoraSettings(r=2, alpha=4, dropout=0.0), progress=False)
    fresh = load_backbone("offline").model.visual
    bn = {k: v for k, v in fresh.state_dict().items() if "running_" in k}
    got = {k.replace(".base_layer", ""): v for k, v in model.visual.state_dict().items() if "running_" in k}
    assert bn and all(torch.equal(bn[k], got[k]) for k in bn)
    assert any(".conv_pwl.lora_A" in n for n, _ in model.visual.named_parameters())
    path = lora_image.save_image_lora(tmp_path / "eff.pt", model)
    again, *_ = lora_image.load_image_lora(path)
    pixels = lora_image.ImageRows(paths, pre)(list(range(len(paths))))
    with torch.no_grad():
        assert torch.allclose(model.encode_image(pixels), again.encode_image(pixels), atol=1e-5)


def test_adapted_towers_through_the_embedding_cache(trained, tmp_path):
    import pandas as pd

    from cxrlib.embed import extract_embeddings
    from cxrlib.embstore import load_embeddings

    model, tok, pre, _, paths = trained
    bb = lora_image.image_lora_backbone(model.eval(), tok, pre, "tiny+tiny-llama-lora")
    table = pd.DataFrame({"image_id": [f"i{i}" for i in range(len(paths))], "image_path": paths,
                          "study_id": [f"s{i}" for i in range(len(paths))], "report": TEXTS})
    out = extract_embeddings(table, bb, tmp_path / "emb", batch_size=4, num_workers=0, device="cpu",
                             precision="fp32", progress=False)
    img, txt = load_embeddings(out["image"]), load_embeddings(out["text"])
    with torch.no_grad():
        ref_img = model.encode_image(lora_image.ImageRows(paths, pre)(list(range(len(paths)))), normalize=True)
        ref_txt = model.encode_text(tok(TEXTS), normalize=True)
    np.testing.assert_allclose(img.emb, ref_img.numpy(), atol=1e-5)
    np.testing.assert_allclose(txt.emb, ref_txt.numpy(), atol=1e-5)
