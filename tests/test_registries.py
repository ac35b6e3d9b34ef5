"""Backbone and data-set registries: lookups, a registered test entry, local folders, adapted names."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from cxrlib import backbones, datasets
from cxrlib.backbones import load_backbone
from cxrlib.datasets import registry


@pytest.fixture
def scratch_backbones(monkeypatch):
    """A private copy of the backbone registry, so a test's entries never leak."""
    monkeypatch.setattr(backbones, "_REGISTRY", dict(backbones._REGISTRY))
    return backbones


@pytest.fixture
def scratch_datasets(monkeypatch):
    registry.registered_datasets()  # load the package's entries before copying
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    return registry


# ---- backbones ----------------------------------------------------------------------------------

def test_every_registered_backbone_validates_and_the_error_lists_them():
    names = list(backbones.registered_backbones())
    assert names, "no backbone registered"
    for name in names:
        assert backbones.validate_backbone_name(name) == name
        assert backbones.validate_backbone_name(name + backbones.ADAPTED_SUFFIX) == name + backbones.ADAPTED_SUFFIX
        entry = backbones.backbone_entry(name)
        assert entry.summary and entry.local_env == name.upper().replace("-", "_") + "_DIR"
    with pytest.raises(ValueError, match="unknown backbone") as err:
        backbones.validate_backbone_name("resnet-from-nowhere")
    for name in names:
        assert name in str(err.value)
    for bad in ("open_clip:ViT-B-16", "open_clip::openai", "local-dir:", "nowhere-adapted", "-adapted"):
        with pytest.raises(ValueError, match="unknown backbone"):
            backbones.validate_backbone_name(bad)
    assert backbones.validate_backbone_name("open_clip:ViT-B-16:/w/a:b.bin") == "open_clip:ViT-B-16:/w/a:b.bin"


def test_a_registered_test_backbone_loads_and_gets_a_local_folder_option(scratch_backbones, tmp_path, monkeypatch):
    seen = []

    @backbones.register_backbone("my-test")
    def my_test(entry):
        """The tiny config under another name (a test entry)."""
        seen.append(entry.name)
        folder = entry.local_dir() or backbones.models_config_dir() / "tiny"
        return {"cfg": backbones.read_open_clip_config(folder), "weights": backbones._find_weights(folder)}

    assert "my-test" in backbones.registered_backbones()
    b = load_backbone("my-test")
    assert b.name == "my-test" and b.embed_dim == 32 and seen == ["my-test"]
    assert b.fingerprint == load_backbone("tiny").fingerprint  # same config, same seeded init
    with pytest.raises(ValueError, match="taken or reserved"):
        backbones.register_backbone("my-test")(my_test)
    # the local-folder variable is derived from the entry's name
    monkeypatch.setenv("MY_TEST_DIR", str(tmp_path))
    assert backbones.backbone_entry("my-test").local_dir() == tmp_path


def test_named_backbones_each_have_a_local_folder(tmp_path, monkeypatch):
    """``<NAME>_DIR`` replaces the main source of every named backbone; a folder without weights says so."""
    tiny = load_backbone("tiny")
    for name, entry in backbones.registered_backbones().items():
        empty = tmp_path / f"empty-{name}"
        empty.mkdir()
        monkeypatch.setenv(entry.local_env, str(empty))
        with pytest.raises(FileNotFoundError, match=entry.local_env + ".*weights"):
            backbones.build_spec(name)
        monkeypatch.delenv(entry.local_env)
    # TINY_DIR with weights: those weights are loaded
    folder = tmp_path / "tiny-dir"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps(tiny.config))
    state = {k: v + 0.5 if v.is_floating_point() else v for k, v in tiny.model.state_dict().items()}
    torch.save(state, folder / "open_clip_pytorch_model.bin")
    monkeypatch.setenv("TINY_DIR", str(folder))
    assert torch.equal(load_backbone("tiny").model.visual.proj, state["visual.proj"])
    # CLIP_DIR: a weights file, no config needed (open_clip's own ViT-B-16 config)
    clip_dir = tmp_path / "clip-dir"
    clip_dir.mkdir()
    (clip_dir / "open_clip_pytorch_model.bin").write_bytes(b"")
    monkeypatch.setenv("CLIP_DIR", str(clip_dir))
    spec = backbones.build_spec("clip")
    assert spec["pretrained"] == str(clip_dir / "open_clip_pytorch_model.bin") and spec["tag"] == "openai"


def test_hub_repos_match_what_the_loads_read():
    """The registry's repo ids are the ones open_clip / the released config actually name."""
    import open_clip

    clip_repo = backbones.backbone_entry("clip").repos[0]
    assert clip_repo.repo_id == open_clip.get_pretrained_cfg("ViT-B-16", "openai")["hf_hub"].strip("/")
    biomed = backbones.backbone_entry("biomedclip")
    released = backbones.read_open_clip_config(backbones.models_config_dir() / "biomedclip")
    assert biomed.repos[0].repo_id.endswith("BiomedCLIP-PubMedBERT_256-vit_base_patch16_224")
    assert biomed.repos[1].repo_id == released["model_cfg"]["text_cfg"]["hf_model_name"]
    assert biomed.repo_env(biomed.repos[1]) == "BIOMEDBERT_DIR" and biomed.repo_env(biomed.repos[0]) == "BIOMEDCLIP_DIR"
    assert biomed.repos[0].missing_in(backbones.models_config_dir() / "biomedclip") == [
        "|".join(backbones.OPEN_CLIP_WEIGHTS)]


def test_adapted_names_resolve_to_base_and_checkpoint(workdir, tmp_path):
    """A projector config records ``tiny-adapted``: it loads as ``tiny`` + the dataset's adapted checkpoint."""
    adapted = load_backbone("tiny")
    with torch.no_grad():
        adapted.model.visual.proj.add_(0.25)
    path = backbones.adapted_checkpoint("fixture", "tiny")
    assert path == workdir / "data" / "models" / "fixture" / "tiny-adapted.pt"
    path.parent.mkdir(parents=True)
    backbones.save_adapted(path, adapted)
    assert backbones.resolve_backbone("tiny-adapted", dataset="fixture") == ("tiny", path)
    assert backbones.resolve_backbone("tiny") == ("tiny", None)
    b = load_backbone("tiny-adapted", dataset="fixture")
    assert b.name == "tiny-adapted" and torch.equal(b.model.visual.proj, adapted.model.visual.proj)
    with pytest.raises(ValueError, match="pass dataset="):
        load_backbone("tiny-adapted")


def test_importing_backbones_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, cxrlib.backbones as b; b.validate_backbone_name('clip'); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


# ---- data sets ----------------------------------------------------------------------------------

def test_dataset_registry_lookups():
    names = datasets.dataset_names()
    assert names and len(set(names)) == len(names)
    for name in names:
        entry = datasets.get_dataset(name)
        assert entry.name == name and entry.summary and callable(entry.build)
        kw = datasets.build.notebook_params(name, seed=3, max_studies=5)
        assert kw["seed"] == 3 and kw["max_studies"] == 5
    with pytest.raises(ValueError, match="unknown dataset 'nope'") as err:
        datasets.build_study_table("nope")
    for name in names:
        assert name in str(err.value)
    assert not hasattr(datasets, "DATASETS")  # no name list besides the registry


def test_a_registered_test_dataset_is_built_through_the_one_entry_point(scratch_datasets):
    calls = []

    def params(common, nb):
        return {**common, "size": nb["image_size"]}

    def check(reachable):
        if not reachable("https://example.invalid"):
            raise datasets.DatasetUnavailable("toy needs the network")

    @datasets.register_dataset("toy", params, check)
    def build_toy(**kw):
        """A toy data set (test entry)."""
        calls.append(kw)
        return pd.DataFrame({"study_id": ["s1"]}), pd.DataFrame()

    assert "toy" in datasets.dataset_names()
    kw = datasets.build.notebook_params("toy", image_size=7)
    assert kw["size"] == 7
    table, _ = datasets.build_study_table("toy", **kw)
    assert calls == [kw] and table["study_id"].tolist() == ["s1"]
    with pytest.raises(datasets.DatasetUnavailable):
        datasets.get_dataset("toy").check(lambda url: False)
    with pytest.raises(ValueError, match="registered twice"):
        datasets.register_dataset("toy", params)(build_toy)
