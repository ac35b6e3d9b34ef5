"""Heavy libraries stay out of the nodes that do not use them: each notebook's import cell, run in a fresh
process, leaves open_clip / timm / transformers (and, where nothing trains, pytorch-metric-learning and
the map libraries) unimported; the contrastive terms import theirs when built, and the CLIP term's
stand-alone ``open_clip.loss`` computes what open_clip's own ``ClipLoss`` does."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"

#: never imported by an import cell: backbone / text-encoder libraries (only embedding and adaptation use them)
NEVER = ("open_clip", "timm", "transformers", "torchvision")
#: also absent where the node trains nothing (losses) or maps nothing (sklearn, umap)
NOT_TRAINING = ("pytorch_metric_learning", "umap", "pynndescent", "numba", "sklearn")
CELLS = {"02_train": NEVER + ("pytorch_metric_learning", "umap", "sklearn"),
         "03_retrieval_eval": NEVER + NOT_TRAINING,
         "04_embedding_viz": NEVER + NOT_TRAINING,
         "05_loss_ablation": NEVER + ("pytorch_metric_learning", "umap", "sklearn")}


def _import_lines(stem: str) -> str:
    """Every import statement of the notebook's first code cell after its ``parameters`` cell."""
    nb = json.loads((NOTEBOOKS / f"{stem}.ipynb").read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert "parameters" in code[0]["metadata"].get("tags", []), stem
    tree = ast.parse("".join(code[1]["source"]))
    lines = [ast.unparse(n) for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    assert any("cxrlib" in line for line in lines), f"{stem}: no cxrlib import in its import cell"
    return "\n".join(lines)


def _loaded_after(code: str, names: tuple[str, ...]) -> list[str]:
    """The top-level packages of ``names`` that ``code`` leaves in ``sys.modules`` of a fresh interpreter."""
    probe = code + f"\nimport sys\nprint(sorted(n for n in {names!r} if n in sys.modules))\n"
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return ast.literal_eval(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("stem", sorted(CELLS))
def test_import_cell_leaves_heavy_packages_unimported(stem):
    assert _loaded_after(_import_lines(stem), CELLS[stem]) == []



def test_the_notebook_runner_does_not_build_iri_parsers():
    """Every node's runner imports papermill -> nbformat -> jsonschema; jsonschema 4.25+ there imports
    rfc3987-syntax (Lark parsers built on import, seconds per node): pyproject caps jsonschema below it."""
    assert _loaded_after("import papermill", ("rfc3987_syntax", "lark")) == []

def test_training_modules_register_terms_without_loss_libraries():
    code = ("from cxrlib import ablation, losses, train\n"
            "assert list(losses.REGISTRY) == list(losses.TERMS) and {'bce', 'supcon', 'clip'} <= set(losses.TERMS)\n")
    assert _loaded_after(code, NEVER + ("pytorch_metric_learning",)) == []


def test_built_terms_import_only_their_libraries():
    code = "from cxrlib import losses\nlosses.MultiTaskLoss({t: 1.0 for t in losses.TERMS})\n"
    assert _loaded_after(code, NEVER + ("pytorch_metric_learning",)) == ["pytorch_metric_learning"]


def test_stand_alone_clip_loss_equals_open_clip():
    """The CLIP term built without the open_clip package gives open_clip's ClipLoss value and gradients."""
    code = """
import sys, torch
from cxrlib import losses
torch.manual_seed(0)
img, txt = torch.randn(7, 5, requires_grad=True), torch.randn(7, 5, requires_grad=True)
scale = torch.tensor(2.5)
term = losses.ClipTerm()
assert 'open_clip' not in sys.modules, sorted(m for m in sys.modules if m.startswith('open_clip'))
v = term(img, txt, scale); v.backward()
print(repr([float(v)] + img.grad.flatten().tolist() + txt.grad.flatten().tolist()))
"""
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    got = ast.literal_eval(done.stdout.strip().splitlines()[-1])

    import torch
    from open_clip.loss import ClipLoss

    torch.manual_seed(0)
    img, txt = torch.randn(7, 5, requires_grad=True), torch.randn(7, 5, requires_grad=True)
    v = ClipLoss()(img, txt, torch.tensor(2.5))
    v.backward()
    ref = [float(v.detach())] + img.grad.flatten().tolist() + txt.grad.flatten().tolist()
    assert got == pytest.approx(ref, rel=0, abs=0)
    # and open_clip's value is the symmetric cross-entropy of the scaled cosine logits (by hand)
    logits = 2.5 * img.detach() @ txt.detach().T
    target = torch.arange(7)
    hand = (torch.nn.functional.cross_entropy(logits, target) + torch.nn.functional.cross_entropy(logits.T, target)) / 2
    assert got[0] == pytest.approx(float(hand), rel=1e-6)
