"""Every shared setting, defined once: name, default, validator, the nodes that take it, its make variable.

Three readers resolve a setting the same way: ``make`` (``python -m cxrlib.dag makevars`` validates
make variables with :func:`check` and writes each node's params file), papermill (which receives those
files) and a person in JupyterLab (the notebook's ``parameters`` cell restates these defaults literally;
``tests/test_settings.py`` asserts they are equal). A profile (``configs/<profile>.yaml``) overrides
settings and never restates a default.

Groups: ``common`` (every node that declares it), ``recipe`` (the projector run: the fields of
:class:`cxrlib.train.TrainConfig`, whose defaults come from here), ``adapt`` (notebook 00), ``extract``
(the embed node), ``eval`` (03-05). A setting is looked up by ``(node, name)``: ``batch_size`` of
``02_train`` (the projector's) is another setting than ``batch_size`` of ``embed`` (the extractor's), so
``BATCH_SIZE`` changes only the projector.

Loss weights are derived from the terms registered in :mod:`cxrlib.losses` (``@register_term(name,
default=, label=, help=)``; :data:`cxrlib.losses.TERMS` is term -> default weight): one ``w_<term>`` recipe
setting and ``W_<TERM>`` make variable per term, one ``adapt_w_<term>`` (notebook 00) and ``lora_w_<term>``
(notebook 06) per term (:data:`WEIGHT_PREFIX`); :func:`weights_from` collects a notebook's weights into the
mapping the library takes, :func:`check_weights` is their one validator. The choice lists
of torch-importing modules (projector kinds, activations, loss terms, datasets) are read from those
modules' source with :mod:`ast`, so ``make`` validates without importing torch.

Node-local parameters that a single notebook declares and no make variable sets (e.g. 01's ``anon``,
04's ``perplexity``) are defined in that notebook's ``parameters`` cell alone.
"""

from __future__ import annotations

import ast
import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

_PKG = Path(__file__).resolve().parent

#: ``nodes`` value of a setting that every node declaring the parameter takes
ALL = ("*",)
TRAIN, ADAPT, EMBED, EVAL, VIZ, ABLATION, DATA = ("02_train", "00_adapt_backbone", "embed", "03_retrieval_eval",
                                                  "04_embedding_viz", "05_loss_ablation", "01_data_prep")
TEXT = "06_text_encoder"
#: node -> the prefix of its loss-weight settings (one ``<prefix><term>`` per term of cxrlib.losses)
WEIGHT_PREFIX = {TRAIN: "w_", ADAPT: "adapt_w_", TEXT: "lora_w_"}


class SettingError(ValueError):
    """A setting value that cannot be used; the message names the setting (and the make variable)."""


@cache
def module_names(module: str, name: str) -> tuple[str, ...]:
    """The string elements (or dict keys) of the literal ``name = ...`` in ``cxrlib/<module>.py``, unimported."""
    tree = ast.parse((_PKG / f"{module.replace('.', '/')}.py").read_text())
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        if any(isinstance(t, ast.Name) and t.id == name for t in targets) and node.value is not None:
            value = node.value
            items = value.keys if isinstance(value, ast.Dict) else getattr(value, "elts", None)
            if items is None:
                break
            return tuple(ast.literal_eval(i) for i in items)
    raise LookupError(f"cxrlib/{module}.py has no literal {name} (a tuple, list or dict of names)")


@cache
def loss_term_info() -> dict[str, dict[str, Any]]:
    """Every ``@register_term(name, default=, label=, help=)`` of :mod:`cxrlib.losses`, read from the source in
    registration order: ``{name: {"default", "label", "help"}}``."""
    tree = ast.parse((_PKG / "losses.py").read_text())
    out: dict[str, dict[str, Any]] = {}
    for node in tree.body:
        for d in getattr(node, "decorator_list", []):
            if isinstance(d, ast.Call) and getattr(d.func, "id", getattr(d.func, "attr", None)) == "register_term":
                name, kw = ast.literal_eval(d.args[0]), {k.arg: ast.literal_eval(k.value) for k in d.keywords}
                out[name] = {"default": float(kw["default"]), "label": kw.get("label", name),
                             "help": kw.get("help", f"the {name} loss term")}
    if not out:
        raise LookupError("cxrlib/losses.py has no @register_term(name, default=..., label=..., help=...)")
    return out


def loss_terms() -> dict[str, float]:
    """:data:`cxrlib.losses.TERMS` (term -> default weight, registration order), read from the source."""
    return {t: i["default"] for t, i in loss_term_info().items()}


def weights_from(namespace: dict[str, Any], prefix: str = "w_") -> dict[str, float]:
    """``{term: namespace[<prefix><term>]}`` for every loss term (e.g. a notebook's ``adapt_w_<term>``
    parameters); a term without its parameter is an error naming it."""
    missing = [prefix + t for t in loss_terms() if prefix + t not in namespace]
    if missing:
        raise SettingError(f"no parameter {', '.join(missing)} (one weight per loss term of cxrlib.losses)")
    return {t: namespace[prefix + t] for t in loss_terms()}


def flat_weights(weights: dict[str, float], prefix: str = "w_") -> dict[str, float]:
    """``{<prefix><term>: weight}``: a weights mapping as the flat settings that make and papermill set."""
    return {f"{prefix}{t}": w for t, w in weights.items()}


# ---- validators: value -> (coerced value); raise SettingError(reason) -------------------------------

Check = Callable[[Any], Any]


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def number(lo: float | None = None, hi: float | None = None, lo_open: bool = False,
           integer: bool = False) -> Check:
    """A finite number in ``[lo, hi]`` (``(lo, hi]`` with ``lo_open``); ``integer`` also forbids fractions."""
    what = "an integer" if integer else "a number"
    rng = (f" > {lo:g}" if lo_open else f" >= {lo:g}") if lo is not None else ""
    rng += f"{' and' if rng else ''} <= {hi:g}" if hi is not None else ""

    def check(v: Any) -> Any:
        ok = _is_num(v) and math.isfinite(v) and (not integer or float(v).is_integer())
        ok = ok and (lo is None or (v > lo if lo_open else v >= lo)) and (hi is None or v <= hi)
        if not ok:
            raise SettingError(f"must be {what}{rng}, got {v!r}")
        return int(v) if integer else float(v)

    check.__doc__ = f"{what}{rng}"
    return check


def integer(lo: int | None = None) -> Check:
    return number(lo, integer=True)


def boolean(v: Any) -> bool:
    if not isinstance(v, bool):
        raise SettingError(f"must be true or false, got {v!r}")
    return v


def choice(values: Iterable[str] | Callable[[], Iterable[str]]) -> Check:
    def check(v: Any) -> Any:
        allowed = tuple(values() if callable(values) else values)
        if v not in allowed:
            raise SettingError(f"must be one of {', '.join(map(str, allowed))}, got {v!r}")
        return v

    return check


def text(v: Any) -> str:
    if not isinstance(v, str) or not v.strip():
        raise SettingError(f"must be a non-empty string, got {v!r}")
    return v


def optional(inner: Check) -> Check:
    def check(v: Any) -> Any:
        return None if v is None else inner(v)

    return check


def either(*checks: Check) -> Check:
    def check(v: Any) -> Any:
        reasons = []
        for c in checks:
            try:
                return c(v)
            except SettingError as exc:
                reasons.append(str(exc).removeprefix("must be "))
        raise SettingError("must be " + " or ".join(dict.fromkeys(r.split(", got")[0] for r in reasons)) + f", got {v!r}")

    return check


def device(v: Any) -> str:
    if not (isinstance(v, str) and re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", v)):
        raise SettingError(f"must be auto, cpu, cuda, cuda:<index> or mps, got {v!r}")
    return v


def int_list(v: Any) -> list[int]:
    if not (isinstance(v, (list, tuple)) and v and all(_is_num(x) and float(x).is_integer() and x >= 1 for x in v)):
        raise SettingError(f"must be a non-empty list of integers >= 1, got {v!r}")
    return [int(x) for x in v]


def grid(v: Any) -> Any:
    """``"default"`` or a non-empty list of weightings, each one weight per loss term (in TERMS order)."""
    n = len(loss_terms())
    if v == "default":
        return v
    w = number(0.0)
    if not (isinstance(v, (list, tuple)) and v and all(isinstance(r, (list, tuple)) and len(r) == n for r in v)):
        raise SettingError(f"must be 'default' or a list of [{', '.join('w_' + t for t in loss_terms())}], got {v!r}")
    out = [[w(x) for x in row] for row in v]
    if any(sum(row) == 0 for row in out):
        raise SettingError(f"has a weighting with every weight 0: {v!r}")
    return out


def protocol_list(v: Any) -> Any:
    """``"all"`` or a non-empty list of retrieval protocol names (``@register_protocol`` in cxrlib.protocols)."""
    names = registered_names("protocols", "register_protocol")
    if v == "all":
        return v
    if isinstance(v, str):
        v = [v]
    bad = [x for x in v if x not in names] if isinstance(v, (list, tuple)) and v else [v]
    if bad:
        raise SettingError(f"must be 'all' or a list of protocols from {', '.join(names)}, got {bad}")
    return list(v)


def profiles() -> list[str]:
    from cxrlib import paths

    return sorted(p.stem for p in paths.configs_dir().glob("*.yaml"))


@cache
def registered_names(module: str, register: str, arg: int = 0) -> tuple[str, ...]:
    """String argument ``arg`` of every ``register("name", ...)`` call (or decorator) in ``cxrlib/<module>.py``:
    a registry's names, read without importing the module."""
    tree = ast.parse((_PKG / f"{module.replace('.', '/')}.py").read_text())
    out = []
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) == register
                and len(node.args) > arg and isinstance(node.args[arg], ast.Constant)):
            out.append(node.args[arg].value)
    return tuple(out)


def datasets() -> tuple[str, ...]:
    """The registered data sets a model is trained on (``@register_dataset`` in :mod:`cxrlib.datasets.build`),
    less the peers' fixed evaluation sets (``cxrlib.evalsets.EVAL_SETS``: every row a test row; ``EVAL_SET``)."""
    evaluation_only = set(module_names("evalsets", "EVAL_SETS"))
    return tuple(n for n in registered_names("datasets.build", "register_dataset") if n not in evaluation_only)


def backbone(v: Any) -> str:
    """A name :func:`cxrlib.backbones.validate_backbone_name` accepts (that module imports without torch)."""
    from cxrlib import backbones

    try:
        return backbones.validate_backbone_name(text(v))
    except ValueError as exc:
        raise SettingError(str(exc).replace(f"unknown backbone {v!r}; valid", "must be a backbone name; valid")
                           + f", got {v!r}") from None


# ---- the schema ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Setting:
    """One setting: its default, validator (coerces and checks), the nodes that take it, make variable, help."""

    name: str
    default: Any
    check: Check
    help: str
    nodes: tuple[str, ...] = ALL
    group: str = "common"
    make_var: str | None = None

    def validate(self, value: Any, source: str = "") -> Any:
        """The checked (coerced) value; a bad one raises one line naming the setting and ``source``."""
        try:
            return self.check(value)
        except SettingError as exc:
            where = f" ({source})" if source else ""
            raise SettingError(f"{self.name}{where} {exc}") from None


def _weight_help(term: str) -> str:
    return loss_term_info()[term]["help"]


def _build() -> list[Setting]:
    S = Setting
    w = number(0.0)
    out = [
        S("profile", "paper", choice(profiles), "settings profile: configs/<profile>.yaml"),
        S("dataset", "openi", choice(datasets), " | ".join(datasets()), make_var="DATASET"),
        S("backbone", "biomedclip", backbone, " | ".join(registered_names("backbones", "register_backbone")
                                                        + registered_names("backbones", "register_family", 1)),
          make_var="BACKBONE"),
        S("seed", 0, integer(0), "seed of every random step", make_var="SEED"),
        S("device", "auto", device, "auto | cpu | cuda | cuda:<i> | mps", make_var="DEVICE"),
        S("run", None, optional(text), "projector run (None: named from the recipe by cxrlib.dag.run_id)",
          nodes=(EVAL, VIZ, ABLATION)),
        # data prep: local copies
        S("openi_root", None, optional(text), "local Open-I copy (NLM NLMCXR_png + ecgen-radiology, or Kaggle "
          "layout); None: $OPENI_ROOT or data/raw/openi", nodes=(DATA,), group="data", make_var="OPENI_ROOT"),
        S("mimic_root", None, optional(text), "local MIMIC-CXR-JPG 2.x folder (credentialed; DATASET=mimic)",
          nodes=(DATA,), group="data", make_var="MIMIC_ROOT"),
        S("n_examples", 8, integer(0), "example studies shown", nodes=(DATA,), group="data"),
    ]
    R = dict(nodes=(TRAIN,), group="recipe")
    out += [
        S("kind", "residual_mlp", choice(lambda: module_names("projector", "KINDS")), "projector head kind", **R),
        S("out_dim", None, optional(integer(1)), "projected dimension (None: the backbone's own)", **R),
        S("width", 512, integer(1), "hidden units per head", **R),
        S("depth", 1, integer(0), "hidden layers per head", **R),
        S("dropout", 0.1, number(0.0, 0.99), "dropout in each head", **R),
        S("activation", "gelu", choice(lambda: module_names("projector", "ACTIVATIONS")), "head activation", **R),
        S("classifier_hidden", 0, integer(0), "hidden units of the classifier head (0: linear)", **R),
    ]
    out += [S(f"{WEIGHT_PREFIX[TRAIN]}{t}", d, w, f"weight of {_weight_help(t)} (>= 0)",
              make_var=f"W_{t.upper()}", **R) for t, d in loss_terms().items()]
    out += [
        S("clip_temperature", 0.07, number(0.01, 1.0), "initial CLIP temperature (>= 1/projector.MAX_LOGIT_SCALE)",
          **R),
        S("learn_temperature", True, boolean, "False: CLIP temperature fixed at clip_temperature", **R),
        S("supcon_temperature", 0.1, number(0.0, lo_open=True), "SupCon temperature", **R),
        S("pos_weight", None, optional(either(choice(["balanced"]), number(0.0, lo_open=True))),
          "BCE weight of the abnormal class: None | balanced | a number > 0", **R),
        S("bce_on", "both", choice(lambda: module_names("losses", "BCE_ON")),
          "projected embeddings that feed the classifier: image | text | both", **R),
        S("lr", 1e-3, number(0.0, lo_open=True), "projector learning rate (> 0)", make_var="LR", **R),
        S("weight_decay", 1e-4, number(0.0), "AdamW weight decay of weight matrices", **R),
        S("epochs", 50, integer(1), "projector training epochs (>= 1)", make_var="EPOCHS", **R),
        S("batch_size", 256, integer(2), "projector batch size (>= 2; not the extractor's)",
          make_var="BATCH_SIZE", **R),
        S("warmup_epochs", 2.0, number(0.0), "linear warm-up epochs before the cosine decay", **R),
        S("patience", 10, integer(1), "epochs without a better validation P@eval_k before stopping", **R),
        S("min_delta", 0.0, number(0.0), "smallest improvement that resets patience", **R),
        S("eval_k", 5, integer(1), "K of the validation label-match precision that picks the best epoch", **R),
    ]
    A = dict(nodes=(ADAPT,), group="adapt")
    adapt_w = {"clip": 1.0}  # a pretrained tower is only nudged along the image-report pairs: other terms 0
    out += [S(f"{WEIGHT_PREFIX[ADAPT]}{t}", adapt_w.get(t, 0.0), w, f"adaptation weight of {_weight_help(t)}", **A)
            for t in loss_terms()]
    out += [
        S("adapt_epochs", 5, integer(1), "adaptation epochs", **A),
        S("adapt_lr", 1e-5, number(0.0, lo_open=True), "adaptation learning rate (small: a pretrained tower "
          "is only nudged)", **A),
        S("adapt_batch_size", 64, integer(2), "adaptation batch size", **A),
        S("lock_text", True, boolean, "True: text tower frozen and its report features cached", **A),
        S("image_size", None, optional(integer(16)), "adaptation input size (None: the backbone's own)", **A),
        S("num_workers", "auto", either(choice(["auto"]), integer(0)), "DataLoader workers (auto: from the cores)",
          **A),
        S("cache_images", False, boolean, "decode + resize each image once, keep it in memory", **A),
        S("max_steps", None, optional(integer(1)), "None: every batch of every epoch", **A),
        S("patience", 2, integer(1), "epochs without improvement of monitor before stopping", **A),
        S("monitor", "val_loss", choice(lambda: module_names("adapt", "MONITORS")), "val_loss | val_recall", **A),
        S("precision", "fp32", choice(lambda: module_names("adapt", "PRECISIONS")), "fp32 | bf16 | fp16 autocast (fp16: GPUs, with a loss scaler)", **A),
    ]
    X = dict(nodes=(EMBED,), group="extract")
    out += [
        S("batch_size", 64, either(choice(["auto"]), integer(1)), "extraction batch size (auto: largest that fits)",
          **X),
        S("num_workers", "auto", either(choice(["auto"]), integer(0)), "image-reading workers (auto: from the cores)",
          **X),
        S("precision", "auto", choice(["auto", "fp32", "bf16", "fp16"]), "auto: bf16 on GPUs / AMX CPUs, else fp32",
          **X),
        S("decode", "auto", choice(["auto", "cpu", "device"]), "where JPEGs are decoded", **X),
        S("compile", False, boolean, "torch.compile the image forward", **X),
    ]
    out += [S(f"{WEIGHT_PREFIX[TEXT]}{t}", d, w, f"LoRA text-tower weight of {_weight_help(t)}",
              nodes=(TEXT,), group="lora") for t, d in loss_terms().items()]
    E = dict(group="eval")
    out += [
        S("split", "test", choice(["train", "val", "test"]), "split evaluated", nodes=(EVAL, VIZ, ABLATION), **E),
        S("ks", [1, 5, 10], int_list, "K of every @K metric", nodes=(EVAL, ABLATION), **E),
        S("n_boot", 1000, integer(10), "bootstrap resamples (patients) per confidence interval (>= 10)",
          nodes=(EVAL, ABLATION), make_var="N_BOOT", **E),
        S("n_perm", 10000, integer(10), "sign-flip permutations per paired test", nodes=(EVAL,), **E),
        S("n_examples", 1, integer(0), "example queries per class in the galleries", nodes=(EVAL,), **E),
        S("protocols", "all", protocol_list, "retrieval protocols reported side by side (cxrlib.protocols): all "
          "or a list", nodes=(EVAL,), make_var="PROTOCOLS", **E),
        S("eval_set", None, optional(choice(lambda: module_names("evalsets", "EVAL_SETS"))),
          "a peer's evaluation set instead of the data set's own split: mimic_5x200 | openi_cxrclip "
          "(built and embedded by make before 03)", nodes=(EVAL,), make_var="EVAL_SET", **E),
        S("grid", "default", grid, "loss-weight grid: default or a list of weightings", nodes=(ABLATION,), **E),
        # a DAG switch (no node takes it as a parameter): cxrlib.dag.Node(switch="text_encoders")
        S("text_encoders", False, boolean, "run notebook 06 (text towers: style robustness, error discrimination); "
          "on in the offline profile", nodes=(), make_var="TEXT_ENCODERS"),
    ]
    return out


@cache
def schema() -> tuple[Setting, ...]:
    out = tuple(_build())
    seen: dict[tuple[str, str], str] = {}
    for s in out:
        for n in s.nodes:
            if (n, s.name) in seen:
                raise AssertionError(f"setting {s.name} defined twice for node {n}")
            seen[(n, s.name)] = s.group
    return out


def lookup(node: str, name: str) -> Setting | None:
    """The setting ``name`` of ``node`` (a node-specific one before a common one), or None."""
    common = None
    for s in schema():
        if s.name == name:
            if node in s.nodes:
                return s
            if s.nodes == ALL:
                common = s
    return common


def group(name: str) -> dict[str, Setting]:
    """The settings of one group by name (e.g. ``group("recipe")``)."""
    return {s.name: s for s in schema() if s.group == name}


def defaults(name: str) -> dict[str, Any]:
    """``{setting: default}`` of one group (e.g. the projector recipe's defaults for TrainConfig)."""
    return {k: s.default for k, s in group(name).items()}


def make_vars() -> dict[str, list[Setting]]:
    """Make variable -> the settings it sets (e.g. ``W_SUPCON`` -> [w_supcon])."""
    out: dict[str, list[Setting]] = {}
    for s in schema():
        if s.make_var:
            out.setdefault(s.make_var, []).append(s)
    return out


def validate(node: str, params: dict[str, Any], source: str = "") -> dict[str, Any]:
    """Check and coerce every schema setting in ``params`` as ``node`` takes it; cross-setting rules too."""
    out = dict(params)
    for k, v in params.items():
        s = lookup(node, k)
        if s is not None:
            out[k] = s.validate(v, source)
    prefix = WEIGHT_PREFIX.get(node)
    if prefix and all(prefix + t in out for t in loss_terms()):
        check_weights({t: out[prefix + t] for t in loss_terms()}, prefix, source)
    return out


def check_weights(weights: dict[str, Any], prefix: str = "w_", source: str = "") -> dict[str, float]:
    """Loss weights (term -> weight) checked as the settings ``<prefix><term>`` (each a number >= 0, not all
    0): the one weight validator (settings, make variables, MultiTaskLoss, the configs of every trainer)."""
    where = f" ({source})" if source else ""
    out = {t: Setting(prefix + t, None, number(0.0), "").validate(v, source) for t, v in weights.items()}
    if out and sum(out.values()) == 0:
        names = [prefix + t for t in out]
        what = {"w_": "", "adapt_w_": "adaptation ", "lora_w_": "LoRA "}.get(prefix, f"{prefix}* ")
        raise SettingError(f"all {what}loss weights are 0{where}: nothing to train "
                           f"(set {', '.join(n.upper() if prefix == 'w_' else n for n in names)} > 0)")
    return out


def validate_recipe(recipe: dict[str, Any]) -> dict[str, Any]:
    """The projector recipe (TrainConfig fields) checked against the schema, plus seed and device."""
    return validate(TRAIN, recipe)


def check_make_var(var: str, text_value: str) -> tuple[Any, list[Setting]]:
    """Parse ``VAR=value`` as YAML and validate it for every setting it sets: ``(value, settings)``."""
    import yaml

    known = make_vars()
    if var not in known:
        raise SettingError(f"unknown make variable {var}; settings variables are {', '.join(sorted(known))}")
    try:
        value = yaml.safe_load(text_value) if text_value.strip() != "" else None
    except yaml.YAMLError:
        value = text_value
    if value is None:
        return None, known[var]
    for s in known[var]:
        try:
            value = s.check(value)
        except SettingError as exc:
            raise SettingError(f"{var}={text_value}: {s.name} {exc}") from None
    return value, known[var]


def recipe_from(namespace: dict[str, Any]) -> dict[str, Any]:
    """The projector recipe's settings (TrainConfig fields except seed/device) picked from a notebook's names."""
    return {k: namespace[k] for k in group("recipe") if k in namespace}


def make_help() -> list[tuple[str, str]]:
    """``(VAR, help)`` of every settings make variable (what ``make help`` lists)."""
    out = []
    for var, ss in sorted(make_vars().items()):
        s = ss[0]
        default = "" if s.default is None or s.name in ("dataset", "backbone") else f" (default {s.default})"
        nodes = "" if s.nodes in (ALL, ()) else f" [{', '.join(n.split('_')[0] for n in s.nodes)}]"
        out.append((var, f"{s.help}{default}{nodes}"))
    return out


if __name__ == "__main__":
    import sys

    if sys.argv[1:] != ["make-help"]:
        sys.exit("usage: python -m cxrlib.settings make-help")
    for var, text_ in make_help():
        print(f"  {var:12s} {text_}" if len(var) <= 12 else f"  {var}\n  {'':12s} {text_}")
