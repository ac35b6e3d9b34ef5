"""Ko et al.'s text-encoder recipe on the tiny Llama: variant views, SupCon lowers its loss, MNTP
predicts masked tokens, only adapters and pooling train, the result saves and reloads."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cxrlib import lora, text_adapt, variants

R = variants.Report
REPORTS = [R("There is a small left pleural effusion. No pneumothorax.", "Small left pleural effusion."),
           R("Mild cardiomegaly. Right lower lobe consolidation.", "Right lower lobe pneumonia."),
           R("Lungs are clear. No pleural effusion or pneumothorax.", "No acute cardiopulmonary abnormality."),
           R("PA and lateral views. There is a 1.2 cm nodule in the left upper lobe.", "Left upper lobe nodule.")]


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def _cfg(**kw):
    base = dict(lora=lora.LoraSettings(r=4, alpha=8, dropout=0.0), epochs=6, lr=1e-2, batch_size=4)
    return text_adapt.TextAdaptConfig(**{**base, **kw})


def test_variant_views_original_first_distinct_and_seeded():
    views = text_adapt.variant_views(REPORTS, ("abbreviated", "reordered"), seed=0)
    assert [v[0] for v in views] == [r.text() for r in REPORTS]
    assert all(len(v) == len(set(v)) >= 2 for v in views)
    assert views == text_adapt.variant_views(REPORTS, ("abbreviated", "reordered"), seed=0)


def test_supcon_on_variants_lowers_the_loss_and_saves(tmp_path):
    tower, tok, info = text_adapt.adapt_text_tower("tiny-llama", REPORTS * 2, np.array([0, 1, 2, 3] * 2), _cfg(),
                                                   progress=False)
    sup = [h["loss"] for h in info["history"] if h["stage"] == "supcon"]
    assert sup[-1] < sup[0]
    assert all("lora_" in n or n.startswith("pooling.") for n, p in tower.named_parameters() if p.requires_grad)
    path = lora.save_lora(tmp_path / "t.pt", tower, {"text_adapt": _cfg().to_dict()})
    again, tok2, cfg = lora.load_lora(path)
    texts = [r.text() for r in REPORTS]
    with torch.no_grad():
        assert torch.allclose(tower.encode_text(tok(texts)), again.encode_text(tok2(texts)), atol=1e-6)
    assert cfg["text_adapt"]["styles"] == list(variants.STYLES)


def test_mntp_lowers_the_masked_token_loss():
    _, _, info = text_adapt.adapt_text_tower("tiny-llama", REPORTS * 4, np.arange(16) % 4,
                                             _cfg(epochs=0, mntp_epochs=8, lr=2e-2, mntp_mask_rate=0.5),
                                             progress=False)
    mntp = [h["loss"] for h in info["history"] if h["stage"] == "mntp"]
    assert len(mntp) == 8 and mntp[-1] < mntp[0]


def test_config_validates():
    with pytest.raises(ValueError, match="unknown styles"):
        text_adapt.TextAdaptConfig(styles=("casual",))
    with pytest.raises(ValueError, match="mntp_mask_rate"):
        text_adapt.TextAdaptConfig(mntp_mask_rate=0.0)
    with pytest.raises(ValueError, match="group ids"):
        text_adapt.adapt_text_tower("tiny-llama", REPORTS, np.array([0]), _cfg(), progress=False)
