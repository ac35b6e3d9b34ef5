"""Loss terms are generic: a new term is its class and ``@register_term`` line in cxrlib/losses.py (plus its test
and the notebooks' parameter defaults); the loss, the trainer's config, the settings, the make variables, the run
names and the ablation grid pick it up, and no other module names a term."""

from __future__ import annotations

import io
import json
import re
import shutil
import tokenize
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from cxrlib import ablation, config, dag, losses, paths, settings
from cxrlib.train import TrainConfig, synthetic_splits, train_projector

#: a fourth term as a newcomer would add it to cxrlib/losses.py (the source the settings read)
FOURTH = '''

@register_term("l2pair", default=0.5, label="L2", help="the paired squared-distance term")
class PairDistance(Term):
    """Mean squared distance between each image and its own report."""

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        return ((image.float() - text.float()) ** 2).sum(dim=1).mean()

    def compute(self, out: dict[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        return self(out["image"], out["text"])
'''


@pytest.fixture
def fourth_term(monkeypatch):
    """``l2pair`` registered for one test only (the registry and TERMS are copies, restored after)."""
    monkeypatch.setattr(losses, "REGISTRY", dict(losses.REGISTRY))
    monkeypatch.setattr(losses, "TERMS", dict(losses.TERMS))
    ns: dict = {}
    exec(compile("from cxrlib.losses import *\nfrom cxrlib.losses import Term, register_term\nimport torch\n" + FOURTH,
                 "<fourth term>", "exec"), ns)
    return ns["PairDistance"]


def _clear_settings_caches() -> None:
    for f in list(vars(settings).values()):
        if callable(getattr(f, "cache_clear", None)):
            f.cache_clear()


@pytest.fixture
def fourth_term_source(tmp_path):
    """The settings read from a copy of the package whose losses.py has the fourth term appended."""
    pkg = tmp_path / "cxrlib"
    shutil.copytree(settings._PKG, pkg, ignore=shutil.ignore_patterns("__pycache__"))
    (pkg / "losses.py").write_text((pkg / "losses.py").read_text() + FOURTH)
    real = settings._PKG
    settings._PKG = pkg
    _clear_settings_caches()
    try:
        yield
    finally:
        settings._PKG = real
        _clear_settings_caches()


def _out(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    img, txt = F.normalize(torch.randn(8, 6, generator=g), dim=1), F.normalize(torch.randn(8, 6, generator=g), dim=1)
    out = {"image": img, "text": txt, "logit_scale": torch.tensor(10.0), "image_logits": img[:, 0],
           "text_logits": txt[:, 1]}
    return out, torch.tensor([0, 1, 1, 0, 1, 0, 0, 1])


def test_settings_read_the_registry_as_it_is_at_run_time():
    assert settings.loss_term_info() == {n: {"default": losses.TERMS[n], "label": c.label, "help": c.help}
                                         for n, c in losses.REGISTRY.items()}
    assert list(losses.TERMS) == list(settings.loss_terms())


def test_a_registered_term_joins_the_loss(fourth_term):
    out, labels = _out()
    got = losses.MultiTaskLoss({"bce": 0.5, "supcon": 2.0, "clip": 1.5})(out, labels)  # l2pair: its default 0.5
    ref = float(((out["image"] - out["text"]) ** 2).sum(1).mean())  # by hand
    assert set(got) == {"bce", "supcon", "clip", "l2pair", "total"}
    assert float(got["l2pair"]) == pytest.approx(ref, rel=1e-6)
    assert float(got["total"]) == pytest.approx(0.5 * float(got["bce"]) + 2 * float(got["supcon"])
                                                + 1.5 * float(got["clip"]) + 0.5 * ref, rel=1e-6)
    alone = losses.MultiTaskLoss({"bce": 0, "supcon": 0, "clip": 0, "l2pair": 2.0})
    assert not (alone.needs_labels or alone.needs_logits or alone.needs_logit_scale)  # read from its class
    assert float(alone(out, labels)["total"]) == pytest.approx(2 * ref, rel=1e-6)
    assert "l2pair" not in losses.MultiTaskLoss({"l2pair": 0})(out, labels)
    with pytest.raises(ValueError, match="w_l2pair must be a number >= 0"):
        losses.MultiTaskLoss({"l2pair": -1})


def test_a_registered_term_trains_through_train_config(fourth_term):
    cfg = TrainConfig(width=8, batch_size=64, epochs=2, dropout=0.0, lr=1e-2, warmup_epochs=0,
                      weights={"l2pair": 1.0})
    assert cfg.weights == {"bce": 1.0, "supcon": 1.0, "clip": 1.0, "l2pair": 1.0}
    assert cfg.to_dict()["w_l2pair"] == 1.0 and TrainConfig.from_dict(cfg.to_dict()) == cfg
    s = synthetic_splits(64, 16, dim=8, seed=0, nuisance_rank=4)
    history = train_projector(s["train"], s["val"], cfg, progress=False).history
    assert {"train_l2pair", "val_l2pair"} <= set(history) and history["train_l2pair"].iloc[1:].notna().all()


def test_the_settings_derive_every_weight_setting_from_the_register_term_lines(fourth_term_source):
    assert list(settings.loss_terms()) == ["bce", "supcon", "clip", "l2pair"]
    assert settings.defaults("recipe")["w_l2pair"] == 0.5
    assert settings.defaults("adapt")["adapt_w_l2pair"] == 0.0  # adaptation: the contrastive term only
    assert settings.defaults("lora")["lora_w_l2pair"] == 0.5
    assert settings.check_make_var("W_L2PAIR", "0.25")[0] == 0.25
    with pytest.raises(settings.SettingError, match="W_L2PAIR=-1: w_l2pair must be a number >= 0"):
        settings.check_make_var("W_L2PAIR", "-1")
    assert "paired squared-distance" in dict(settings.make_help())["W_L2PAIR"]
    zero = {f"w_{t}": 0.0 for t in ("bce", "supcon", "clip")}
    settings.validate(settings.TRAIN, {**zero, "w_l2pair": 1.0})  # one term on is enough
    with pytest.raises(settings.SettingError, match="W_L2PAIR"):
        settings.validate(settings.TRAIN, {**zero, "w_l2pair": 0.0})
    assert dag.run_id({"dataset": "x", "backbone": "b", "w_l2pair": 0.25}).startswith("bce1-supcon1-clip1-l2pair0.25-")
    assert {len(w) for w in ablation.default_grid()} == {4} and ablation.weights_name((1, 0, 0, 0.5)) == "BCE 1 + L2 0.5"
    # what is left to edit: the notebooks' parameter cells (the parameter defaults a person sees), nothing else
    missing = {(node, s.name) for s in settings.schema() for node in s.nodes if node in dag.NODES
               and dag.NODES[node].notebook is not None
               and s.name not in config.notebook_parameters(paths.repo_root() / "notebooks" / f"{node}.ipynb")}
    assert missing == {("02_train", "w_l2pair"), ("00_adapt_backbone", "adapt_w_l2pair"),
                       ("06_text_encoder", "lora_w_l2pair")}


# ---- hygiene: only losses.py and settings.py name a term -----------------------------------------------

#: string literals that equal a term's name but mean something else
NOT_A_TERM = {("backbones.py", "clip"): "the CLIP backbone's registry name",
              ("text_adapt.py", "supcon"): "the variant trainer's stage name in its history"}


def _named_terms(source: str) -> list[str]:
    """Names and strings in Python ``source`` that name a term: ``<prefix>w_<term>`` anywhere in a name or string
    (docstrings included), or a string literal that is exactly a term's name."""
    terms = list(settings.loss_terms())
    weight = re.compile(r"\b\w*w_(" + "|".join(map(re.escape, terms)) + r")\b")
    hits = []
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type in (tokenize.NAME, tokenize.STRING):
            literal = tok.string.strip("'\"") if tok.type == tokenize.STRING else None
            if weight.search(tok.string) or literal in terms:
                hits.append(tok.string[:60])
    return hits


def test_the_hygiene_check_sees_a_term_name():
    assert _named_terms('x = cfg.w_supcon\n"""adapt_w_clip"""\nd["bce"]\n# w_clip in a comment\nclip_temperature = 1\n') \
        == ["w_supcon", '"""adapt_w_clip"""', '"bce"']


def test_no_module_but_losses_and_settings_names_a_loss_term():
    root = Path(settings._PKG)
    found = {}
    for f in sorted(root.rglob("*.py")):
        if f.name in ("losses.py", "settings.py"):
            continue
        hits = [h for h in _named_terms(f.read_text()) if (f.name, h.strip("'\"")) not in NOT_A_TERM]
        if hits:
            found[str(f.relative_to(root))] = hits
    assert not found, f"modules that name loss terms (derive them from cxrlib.losses / cxrlib.settings): {found}"


def test_no_notebook_code_but_the_parameters_cell_names_a_loss_term():
    found = {}
    for nb in sorted((paths.repo_root() / "notebooks").glob("*.ipynb")):
        cells = json.loads(nb.read_text())["cells"]
        for i, c in enumerate(cells):
            if c["cell_type"] == "code" and "parameters" not in c["metadata"].get("tags", []):
                hits = _named_terms("".join(c["source"]))
                if hits:
                    found[f"{nb.name} cell {i}"] = hits
    assert not found, f"notebook code naming loss terms (use settings.weights_from / settings.recipe_from): {found}"
