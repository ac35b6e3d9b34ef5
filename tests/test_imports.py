"""Heavy libraries stay out of the nodes that do not use them: each notebook's import cell, run in a fresh
process (a fork of one that has imported torch only), leaves open_clip / timm / transformers (and, where nothing trains, pytorch-metric-learning and
the map libraries) unimported; the CLIP term imports its library when built, and its
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


#: one interpreter that has imported torch (which every probe imports, and which imports none of the packages
#: checked: the server refuses a probe otherwise) forks a fresh child per probe; the child's output goes to files
_SERVER = r"""
import json, os, sys, traceback
import torch
for line in sys.stdin:
    req = json.loads(line)
    preloaded = sorted(n for n in req["names"] if n in sys.modules)
    if preloaded:
        print(json.dumps({"rc": -1, "error": f"the probe server itself imported {preloaded}"}), flush=True)
        continue
    pid = os.fork()
    if pid == 0:
        rc = 0
        with open(req["out"], "w") as out, open(req["err"], "w") as err:
            os.dup2(out.fileno(), 1)
            os.dup2(err.fileno(), 2)
            try:
                exec(compile(req["code"], "<probe>", "exec"), {"__name__": "__main__"})
            except SystemExit as exc:
                rc = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
            except BaseException:
                traceback.print_exc()
                rc = 1
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(rc)
    print(json.dumps({"rc": os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])}), flush=True)
"""


class _ProbeServer:
    """Runs code as a fresh interpreter with torch imported would (a forked child of :data:`_SERVER`)."""

    def __init__(self, tmp: Path):
        self.tmp, self.n = tmp, 0
        self.proc = subprocess.Popen([sys.executable, "-c", _SERVER], cwd=ROOT, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)

    def run(self, code: str, names: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
        self.n += 1
        out, err = self.tmp / f"probe{self.n}.out", self.tmp / f"probe{self.n}.err"
        self.proc.stdin.write(json.dumps({"code": code, "names": list(names), "out": str(out), "err": str(err)}) + "\n")
        self.proc.stdin.flush()
        reply = json.loads(self.proc.stdout.readline())
        assert reply["rc"] != -1, reply["error"]
        return subprocess.CompletedProcess(code, reply["rc"], out.read_text(), err.read_text())

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    server = _ProbeServer(tmp_path_factory.mktemp("probes"))
    yield server
    server.close()


def _loaded_after(probe: _ProbeServer, code: str, names: tuple[str, ...]) -> list[str]:
    """The top-level packages of ``names`` that ``code`` leaves in ``sys.modules`` of a fresh interpreter."""
    done = probe.run(code + f"\nimport sys\nprint(sorted(n for n in {names!r} if n in sys.modules))\n", names)
    assert done.returncode == 0, done.stderr[-3000:]
    return ast.literal_eval(done.stdout.strip().splitlines()[-1])


def test_the_probe_sees_what_its_code_imports(probe):
    """The check can fail: code importing a checked package is caught, and each probe starts without the
    previous probe's imports."""
    assert _loaded_after(probe, "import sklearn", ("sklearn", "umap")) == ["sklearn"]
    assert _loaded_after(probe, "x = 1", ("sklearn",)) == []
    assert probe.run("raise SystemExit(3)").returncode == 3


@pytest.mark.parametrize("stem", sorted(CELLS))
def test_import_cell_leaves_heavy_packages_unimported(stem, probe):
    assert _loaded_after(probe, _import_lines(stem), CELLS[stem]) == []


def test_the_notebook_runner_does_not_build_iri_parsers(probe):
    """Every node's runner imports papermill -> nbformat -> jsonschema; jsonschema 4.25+ there imports
    rfc3987-syntax (Lark parsers built on import, seconds per node): pyproject caps jsonschema below it."""
    assert _loaded_after(probe, "import papermill", ("rfc3987_syntax", "lark")) == []


def test_training_modules_register_terms_without_loss_libraries(probe):
    code = ("from cxrlib import ablation, losses, train\n"
            "assert list(losses.REGISTRY) == list(losses.TERMS) and {'bce', 'supcon', 'clip'} <= set(losses.TERMS)\n")
    assert _loaded_after(probe, code, NEVER + ("pytorch_metric_learning",)) == []


def test_built_terms_import_only_their_libraries(probe):
    """Building every term loads the CLIP term's stand-alone loss, and nothing else heavy: SupCon is cxrlib's
    own (pytorch-metric-learning is its test reference, and the text-tower trainer's loss)."""
    code = "from cxrlib import losses\nlosses.MultiTaskLoss({t: 1.0 for t in losses.TERMS})\n"
    assert _loaded_after(probe, code, NEVER + ("pytorch_metric_learning",)) == []


def test_stand_alone_clip_loss_equals_open_clip(probe):
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
    done = probe.run(code, ("open_clip",))
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
