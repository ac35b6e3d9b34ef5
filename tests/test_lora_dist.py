"""LoRA training on 2 CPU ranks (gloo) trains the same adapters and projection as one process: for the text
tower on cached image embeddings under a real torchrun (the command line), and with image-tower LoRA and for
variant training (SupCon) on forked ranks that run the same entry points (:func:`cxrlib.lora_dist.main`,
:func:`cxrlib.text_adapt.adapt_text_tower` in :func:`cxrlib.runtime.process_group`) without starting torch again."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ranks import fork_ranks

from cxrlib import lora, lora_dist, text_adapt, text_towers, variants

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py

TEXTS = ["No acute cardiopulmonary abnormality.", "Small left pleural effusion.", "Mild cardiomegaly.",
         "Right lower lobe consolidation.", "No pneumothorax.", "Moderate pulmonary edema.",
         "Left basilar atelectasis.", "Normal heart size, clear lungs."]
LABELS = np.array([0, 1, 1, 1, 0, 1, 1, 0])


def _cfg(**kw):
    base = dict(lora=lora.LoraSettings(r=4, alpha=8, dropout=0.0), epochs=2, lr=5e-3, batch_size=4, seed=3)
    return lora.LoraTrainConfig(**{**base, **kw})


def _trained(obj) -> dict[str, torch.Tensor]:
    """The trained tensors, less the latent attention's key bias: it shifts every logit of a query alike,
    so its gradient is 0 up to rounding, which Adam scales up to steps of lr size (noise, either way)."""
    state = dict(obj["state"])
    for k in [k for k in state if k.endswith("pooling.attn.in_proj_bias")]:
        q, _, v = state[k].chunk(3)
        state[k] = torch.cat([q, v])
    return state


def _assert_same_state(a: dict, b: dict, atol: float):
    assert sorted(a) == sorted(b)
    worst = {k: float((a[k] - b[k]).abs().max()) for k in a}
    assert max(worst.values()) < atol, sorted(worst.items(), key=lambda kv: -kv[1])[:3]


def test_shard_rows_contiguous_equal_and_too_small_batches_skipped():
    rows = [7, 3, 9, 1, 4]
    assert lora.shard_rows(rows, 0, 1) == rows
    assert lora.shard_rows(rows, 0, 2) == [7, 3] and lora.shard_rows(rows, 1, 2) == [9, 1]  # 4 waits
    assert lora.shard_rows([5], 0, 1) is None and lora.shard_rows([5, 6, 7], 0, 4) is None


def test_launch_bad_inputs_are_named(tmp_path):
    with pytest.raises(ValueError, match="give image_paths"):
        lora_dist.launch("tiny-llama", TEXTS, LABELS, _cfg(), tmp_path / "x.pt", image_backbone="tiny")
    with pytest.raises(ValueError, match="one of them"):
        lora_dist.write_inputs(tmp_path / "i.pt", TEXTS, LABELS)
    with pytest.raises(ValueError, match=r"unknown fields \['width'\]"):
        lora_dist.config_from_dict({**_cfg().to_dict(), "width": 3})


def test_config_round_trips_through_the_command_line():
    cfg = _cfg(lora=lora.LoraSettings(r=2, alpha=4, dropout=0.0, target_modules=("q_proj", "v_proj")))
    again = lora_dist.config_from_dict(cfg.to_dict())
    assert again.to_dict() == cfg.to_dict() and again.lora.target_modules == ("q_proj", "v_proj")


@pytest.mark.slow
def test_torchrun_two_cpu_ranks_equal_one_process(tmp_path):
    """The adapters, latents, projection, logit scale and classifier after 2 epochs (4 steps): equal."""
    rng = np.random.default_rng(0)
    img = rng.standard_normal((len(TEXTS), 16)).astype(np.float32)
    cfg = _cfg()
    one = lora_dist.launch("tiny-llama", TEXTS, LABELS, cfg, tmp_path / "one.pt", nproc=1, image_emb=img,
                           progress=False)
    two = lora_dist.launch("tiny-llama", TEXTS, LABELS, cfg, tmp_path / "two.pt", nproc=2, image_emb=img,
                           extra={"recipe": {"note": "x"}})
    a, b = lora.read_lora(one), lora.read_lora(two)
    assert b["config"]["info"]["world_size"] == 2 and a["config"]["info"]["world_size"] == 1
    assert b["config"]["recipe"] == {"note": "x"} and b["config"]["train"] == cfg.to_dict()
    _assert_same_state(_trained(a), _trained(b), atol=1e-4)
    ha, hb = a["config"]["info"]["history"], b["config"]["info"]["history"]
    assert [round(h["total"], 4) for h in ha] == [round(h["total"], 4) for h in hb]
    assert a["config"]["info"]["truncation"] == b["config"]["info"]["truncation"]  # counts summed over ranks
    (ma, tok, _), (mb, _, _) = lora.load_lora(one), lora.load_lora(two)
    with torch.no_grad():  # and so are the embeddings
        assert torch.allclose(ma.encode_text(tok(TEXTS)), mb.encode_text(tok(TEXTS)), atol=1e-5)
    init = lora.train_lora("tiny-llama", TEXTS, img, LABELS, _cfg(epochs=0), progress=False)[0]
    moved = {k: v for k, v in lora.trainable_state(init).items() if "lora_B" in k}
    assert any(float((a["state"][k] - v).abs().max()) > 1e-3 for k, v in moved.items())  # it trained


@pytest.mark.slow
def test_two_cpu_ranks_with_image_tower_lora(tmp_path):
    """Forked ranks run the torchrun entry point, ``lora_dist.main`` with the arguments ``launch`` gives it."""
    from PIL import Image

    rng = np.random.default_rng(1)
    paths = []
    for i in range(len(TEXTS)):
        paths.append(str(tmp_path / f"i{i}.png"))
        Image.fromarray(rng.integers(0, 256, (64, 64), dtype=np.uint8), mode="L").save(paths[-1])
    cfg, il = _cfg(epochs=1), lora.LoraSettings(r=2, alpha=4, dropout=0.0)
    one = lora_dist.launch("tiny-llama", TEXTS, LABELS, cfg, tmp_path / "one.pt", nproc=1, image_paths=paths,
                           image_backbone="tiny", image_lora=il, progress=False)
    inputs = lora_dist.write_inputs(tmp_path / "inputs.pt", TEXTS, LABELS, image_paths=paths)
    cmd = lora_dist.torchrun_command(inputs, tmp_path / "two.pt", "tiny-llama", cfg, 2, "tiny", il)
    argv = cmd[cmd.index("cxrlib.lora_dist") + 1:]  # what torchrun hands each rank's main
    fork_ranks(lora_dist.main, argv)
    two = tmp_path / "two.pt"
    a, b = lora.read_lora(one), lora.read_lora(two)
    assert any(k.startswith("image.") for k in a["state"])
    assert b["config"]["info"]["world_size"] == 2 and a["config"]["info"]["world_size"] == 1
    _assert_same_state(_trained(a), _trained(b), atol=1e-4)


def _variant_run():
    """The variant-SupCon run both sides train: (reports, labels, config, tower spec)."""
    R = variants.Report
    reports = [R("There is a small left pleural effusion. No pneumothorax.", "Small left pleural effusion."),
               R("Mild cardiomegaly. Right lower lobe consolidation.", "Right lower lobe pneumonia."),
               R("Lungs are clear. No pleural effusion or pneumothorax.", "No acute cardiopulmonary abnormality."),
               R("PA and lateral views. There is a 1.2 cm nodule in the left upper lobe.", "Left upper lobe nodule.")]
    cfg = text_adapt.TextAdaptConfig(lora=lora.LoraSettings(r=4, alpha=8, dropout=0.0), epochs=2, lr=5e-3,
                                     batch_size=4, styles=("abbreviated", "reordered"))
    # mean pooling: the tiny tower's random latent attention maps every report to nearly one point, where
    # the loss is flat and Adam turns rounding noise into lr-sized steps
    spec = text_towers.text_tower_spec("tiny-llama", pooling="mean", pooling_kwargs={})
    return reports * 2, np.array([0, 1, 2, 3] * 2), cfg, spec


def _adapt_rank(out: str) -> None:
    """What a torchrun rank of variant training runs: adapt in the process group, rank 0 saves."""
    from cxrlib import runtime

    with runtime.process_group("cpu"):
        reports, labels, cfg, spec = _variant_run()
        tower, _, info = text_adapt.adapt_text_tower(spec, reports, labels, cfg, progress=False)
        if torch.distributed.get_rank() == 0:
            lora.save_lora(out, tower, {"info": info})


@pytest.mark.slow
def test_variant_supcon_two_cpu_ranks_equal_one_process(tmp_path):
    fork_ranks(_adapt_rank, str(tmp_path / "two.pt"))
    reports, labels, cfg, spec = _variant_run()
    tower, _, info = text_adapt.adapt_text_tower(spec, reports, labels, cfg, progress=False)
    one = lora.save_lora(tmp_path / "one.pt", tower, {"info": info})
    a, b = lora.read_lora(one), lora.read_lora(tmp_path / "two.pt")
    assert b["config"]["info"]["world_size"] == 2
    _assert_same_state(_trained(a), _trained(b), atol=1e-4)
    la = [h["loss"] for h in a["config"]["info"]["history"]]
    lb = [h["loss"] for h in b["config"]["info"]["history"]]
    assert np.allclose(la, lb, atol=1e-4)
