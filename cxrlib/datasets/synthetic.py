"""Synthetic chest radiographs whose visible content follows a study's findings, and templated reports.

Three uses: images for the real Open-I reports when the Open-I images are not at hand (the
``openi_synth`` data set of the offline profile, :func:`render_openi_images`), fully synthetic
studies for tests and the smoke profile (:func:`make_synthetic_studies`), and the demo.

* :func:`render_radiograph` draws one frontal (PA) or lateral image from a set of findings
  (:data:`RENDER_FINDINGS`: cardiomegaly, effusion, opacity, nodule, mass, atelectasis,
  pneumothorax, edema, hyperinflation, hypoinflation, pacemaker, central_line, ett, sternotomy,
  fracture, granuloma, scoliosis, tortuous_aorta, spine_degenerative), optionally with per-finding
  ``side`` (patient's right/left/bilateral), ``zone`` (upper/middle/lower) and ``severity`` (0-1).
  Anatomy (size, position, rotation), exposure and noise vary per image.
* :data:`MESH_RENDER_RULES` maps Open-I MeSH major terms (``Opacity/lung/base/left``,
  ``Cardiomegaly/mild``, ``Lung/hyperdistention``, ...) to those findings; :func:`mesh_to_render`
  applies it, reading sides, zones and severities from the qualifiers. Terms with no visible
  counterpart (e.g. ``Hernia, Hiatal``) are not drawn and are returned as ``unmapped``.
* Determinism: each image's generator is seeded by ``(seed, image_id)`` (a stable hash), so an image
  is the same whichever subset, order or number of workers renders it.
* Files are keyed by what drew them: each PNG carries a :func:`render_key` (the renderer's source
  digest, seed, image id, view, size and the fully resolved findings) in a text chunk, and a file
  whose key differs (another seed, other findings, a changed renderer) is redrawn, never reused. Choices not fixed by the
  findings (a side, a zone) are seeded by the *study*, so frontal and lateral views of one study agree.

The images are stand-ins: plausible CXR-like geometry and grey levels, not real anatomy; every
result computed on them must say so (the offline profile's label does).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, PngImagePlugin
from tqdm.auto import tqdm

from cxrlib.datasets import _synth_render
from cxrlib.datasets._synth_render import RENDER_FINDINGS, SIDES, ZONES, render
from cxrlib.datasets.labels import FINDING_LABELS, mesh_findings, mesh_is_abnormal, split_mesh
from cxrlib.images import verify_image
from cxrlib.io import atomic_path

__all__ = ["FINDING_ALIASES", "MESH_RENDER_RULES", "RENDER_FINDINGS", "make_synthetic_studies",
           "mesh_to_render", "render_openi_images", "render_radiograph", "stable_seed"]

VIEWS = ("frontal", "lateral")

#: words a caller may use for a finding -> the renderer's key
FINDING_ALIASES: dict[str, str] = {
    "enlarged heart": "cardiomegaly", "pleural effusion": "effusion", "consolidation": "opacity",
    "airspace opacity": "opacity", "airspace disease": "opacity", "lung opacity": "opacity", "pneumonia": "opacity",
    "infiltrate": "opacity", "lung lesion": "nodule", "pulmonary edema": "edema", "emphysema": "hyperinflation",
    "calcified granuloma": "granuloma", "support devices": "central_line", "catheter": "central_line",
    "endotracheal tube": "ett", "tube": "ett", "sternotomy wires": "sternotomy", "rib fracture": "fracture",
}

_Q = frozenset
#: MeSH heading (lower case) -> [(render key, qualifiers one of which must appear, or None = any)]
MESH_RENDER_RULES: dict[str, list[tuple[str, frozenset[str] | None]]] = {
    "cardiomegaly": [("cardiomegaly", None)],
    "cardiac shadow": [("cardiomegaly", _Q({"enlarged", "prominent"}))],
    "heart": [("cardiomegaly", _Q({"enlarged"}))],
    "mediastinum": [("tortuous_aorta", _Q({"enlarged", "widened", "prominent"}))],
    "opacity": [("opacity", None)],
    "airspace disease": [("opacity", None)],
    "consolidation": [("opacity", None)],
    "pneumonia": [("opacity", None)],
    "infiltrate": [("opacity", None)],
    "density": [("opacity", _Q({"lung", "retrocardiac"}))],
    "pulmonary fibrosis": [("opacity", None)],
    "lung diseases, interstitial": [("edema", None)],
    "markings": [("edema", _Q({"prominent", "increased", "interstitial"}))],
    "pulmonary edema": [("edema", None)],
    "pulmonary congestion": [("edema", None)],
    "heart failure": [("edema", None), ("cardiomegaly", None)],
    "pleural effusion": [("effusion", None)],
    "costophrenic angle": [("effusion", _Q({"blunted"}))],
    "hemothorax": [("effusion", None)],
    "hydropneumothorax": [("effusion", None), ("pneumothorax", None)],
    "hemopneumothorax": [("effusion", None), ("pneumothorax", None)],
    "pneumothorax": [("pneumothorax", None)],
    "pulmonary atelectasis": [("atelectasis", None)],
    "volume loss": [("atelectasis", None)],
    "cicatrix": [("atelectasis", _Q({"lung", "pleura", "base"}))],
    "nodule": [("nodule", None)],
    "mass": [("mass", None)],
    "cavitation": [("mass", None)],
    "calcified granuloma": [("granuloma", None)],
    "granuloma": [("granuloma", None)],
    "granulomatous disease": [("granuloma", None)],
    "calcinosis": [("granuloma", _Q({"lung", "lymph nodes", "hilum"})),
                   ("tortuous_aorta", _Q({"aorta", "aorta, thoracic"}))],
    "lung": [("hyperinflation", _Q({"hyperdistention"})), ("hypoinflation", _Q({"hypoinflation"}))],
    "pulmonary emphysema": [("hyperinflation", None)],
    "emphysema": [("hyperinflation", None)],
    "pulmonary disease, chronic obstructive": [("hyperinflation", None)],
    "lung, hyperlucent": [("hyperinflation", None)],
    "diaphragm": [("hyperinflation", _Q({"flattened"})), ("hypoinflation", _Q({"elevated"}))],
    "catheters, indwelling": [("central_line", None)],
    "stents": [("central_line", None)],
    "tube, inserted": [("ett", None)],
    "implanted medical device": [("pacemaker", None)],
    "medical device": [("pacemaker", None)],
    "surgical instruments": [("sternotomy", None)],
    "sutures": [("sternotomy", None)],
    "fractures, bone": [("fracture", None)],
    "spine": [("spine_degenerative", _Q({"degenerative"}))],
    "thoracic vertebrae": [("spine_degenerative", _Q({"degenerative"}))],
    "osteophyte": [("spine_degenerative", None)],
    "spondylosis": [("spine_degenerative", None)],
    "scoliosis": [("scoliosis", None)],
    "aorta": [("tortuous_aorta", None)],
    "aorta, thoracic": [("tortuous_aorta", None)],
    "atherosclerosis": [("tortuous_aorta", None)],
}

_SEVERITY_WORDS = {"minimal": 0.2, "borderline": 0.25, "mild": 0.35, "small": 0.35, "moderate": 0.6,
                   "large": 0.9, "severe": 0.95, "extensive": 0.95, "multiple": 0.6}
_ZONE_WORDS = {"apex": "upper", "upper lobe": "upper", "middle lobe": "middle", "lingula": "middle",
               "hilum": "middle", "base": "lower", "lower lobe": "lower", "retrocardiac": "lower",
               "costophrenic angle": "lower"}


def stable_seed(*parts: object) -> int:
    """A 63-bit integer from ``parts`` that is the same on every machine and Python run (not ``hash``)."""
    h = hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") >> 1


def _as_rng(rng_or_seed) -> np.random.Generator:
    if isinstance(rng_or_seed, np.random.Generator):
        return rng_or_seed
    if isinstance(rng_or_seed, (int, np.integer)) or isinstance(rng_or_seed, np.random.SeedSequence):
        return np.random.default_rng(rng_or_seed)
    raise TypeError(f"rng_or_seed must be a numpy Generator, SeedSequence or int, got {type(rng_or_seed).__name__}")


def canonical_findings(findings: Iterable[str] | dict | None) -> dict[str, dict]:
    """Findings as ``{render key: params}``; aliases resolved; an unknown name raises, naming it."""
    if findings is None:
        return {}
    items = findings.items() if isinstance(findings, dict) else ((k, {}) for k in findings)
    out: dict[str, dict] = {}
    for name, params in items:
        key = str(name).strip().lower().replace(" ", "_") if str(name).lower() not in FINDING_ALIASES \
            else FINDING_ALIASES[str(name).lower()]
        if key not in RENDER_FINDINGS:
            raise ValueError(f"unknown finding {name!r}: use one of {list(RENDER_FINDINGS)} "
                             f"or an alias in FINDING_ALIASES")
        merged = {**out.get(key, {}), **dict(params or {})}
        for field, allowed in (("side", SIDES), ("zone", ZONES)):
            if merged.get(field) is not None and merged[field] not in allowed:
                raise ValueError(f"finding {name!r}: {field} must be one of {allowed}, got {merged[field]!r}")
        out[key] = merged
    return out


def render_radiograph(findings: set[str] | dict | None, view: str, size: int, rng_or_seed) -> Image.Image:
    """One synthetic 8-bit grayscale radiograph (``size`` x ``size``) showing ``findings``.

    ``findings``: render keys or aliases, as a set, or a dict ``{key: {"side", "zone", "severity",
    "count"}}`` (all optional; missing ones are drawn from the generator). ``view``: frontal|lateral.
    """
    return render(canonical_findings(findings), view, size, _as_rng(rng_or_seed))


# ---- MeSH -> findings -------------------------------------------------------------------------

def mesh_to_render(mesh: str | Iterable[str] | None) -> tuple[dict[str, dict], list[str]]:
    """``(findings, unmapped terms)`` of a study's MeSH major terms (``;``-joined or a list).

    ``normal`` gives no finding. Qualifiers set ``side`` (left/right/bilateral), ``zone`` and
    ``severity`` when they say so (``Pleural Effusion/left/small``).
    """
    terms = split_mesh(mesh) if mesh is None or isinstance(mesh, (str, float)) else list(mesh)
    out: dict[str, dict] = {}
    unmapped: list[str] = []
    for term in terms:
        parts = [p.strip().lower() for p in term.split("/")]
        head, quals = parts[0], set(parts[1:])
        if head in ("normal", "no indexing"):
            continue
        hit = False
        for key, required in MESH_RENDER_RULES.get(head, []):
            if required is not None and not (required & quals):
                continue
            hit = True
            spec = out.setdefault(key, {})
            sides = quals & {"left", "right", "bilateral"}
            if sides:
                new = "bilateral" if len(sides) > 1 or "bilateral" in sides else sides.pop()
                old = spec.get("side")
                spec["side"] = new if old in (None, new) else "bilateral"
            zones = [z for q, z in _ZONE_WORDS.items() if q in quals]
            if zones and "zone" not in spec:
                spec["zone"] = zones[0]
            sev = [v for q, v in _SEVERITY_WORDS.items() if q in quals]
            if sev:
                spec["severity"] = max(sev + [spec.get("severity", 0.0)])
            if head == "granulomatous disease" or "multiple" in quals:
                spec["count"] = max(3, spec.get("count", 0))
        if not hit:
            unmapped.append(term)
    return out, unmapped


# ---- rendering to files (parallel, atomic, resumable) ---------------------------------------------

def _study_key(image_id: str) -> str:
    """Open-I image ids ``CXR<n>_<k>_IM-...`` share their study prefix ``CXR<n>``."""
    return image_id.split("_", 1)[0] if image_id.startswith("CXR") else image_id


def _fix_params(findings: dict[str, dict], seed: int, study: str) -> dict[str, dict]:
    """Draw the side/zone/severity a finding leaves open from the *study's* generator (views agree)."""
    rng = np.random.default_rng(stable_seed(seed, "study", study))
    out = {}
    for key in sorted(findings):
        spec = dict(findings[key])
        if key in ("effusion", "opacity", "nodule", "mass", "atelectasis", "pneumothorax"):
            if spec.get("side") is None:
                p_bi = {"effusion": 0.35, "opacity": 0.3, "atelectasis": 0.2}.get(key, 0.0)
                spec["side"] = str(rng.choice(SIDES, p=[(1 - p_bi) / 2, (1 - p_bi) / 2, p_bi]))
            if spec.get("zone") is None and key in ("opacity", "nodule", "mass"):
                spec["zone"] = str(rng.choice(ZONES, p=[0.25, 0.3, 0.45]))
        if spec.get("severity") is None:
            spec["severity"] = float(rng.uniform(0.45, 1.0))
        out[key] = spec
    return out


#: the PNG text chunk that holds a file's :func:`render_key`
KEY_CHUNK = "cxrlib-render-key"
#: digest of the drawing code: a changed renderer changes every key, so old files are redrawn
RENDERER_DIGEST = hashlib.sha256(Path(_synth_render.__file__).read_bytes()).hexdigest()[:16]


def render_key(image_id: str, findings: dict[str, dict], view: str, size: int, seed: int) -> str:
    """What draws one image: renderer digest, seed, image id (its generator), view, size, resolved findings."""
    spec = {"renderer": RENDERER_DIGEST, "seed": int(seed), "image_id": str(image_id), "view": view,
            "size": int(size), "findings": {k: findings[k] for k in sorted(findings)}}
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=float).encode()).hexdigest()[:32]


def _write_png(im: Image.Image, path: Path, key: str) -> None:
    info = PngImagePlugin.PngInfo()
    info.add_text(KEY_CHUNK, key)
    with atomic_path(path, suffix=".tmp.png") as tmp:
        im.save(tmp, format="PNG", compress_level=1, pnginfo=info)


def _render_batch(jobs: list[tuple[str, str, dict, str, int, int]]) -> list[tuple[str, str, float]]:
    """Worker: for each ``(path, image_id, findings, view, size, seed)`` keep an existing file drawn from the
    same :func:`render_key` or render and write it; returns ``(image_id, status, cpu seconds)`` per job
    (status ``existing``, ``rendered``, or ``redrawn`` for a file drawn from something else)."""
    done = []
    for path, image_id, findings, view, size, seed in jobs:
        t0 = time.process_time()
        key = render_key(image_id, findings, view, size, seed)
        found = _existing_key(Path(path), size)
        if found == key:
            status = "existing"
        else:
            im = render(findings, view, size, np.random.default_rng(stable_seed(seed, "image", image_id)))
            _write_png(im, Path(path), key)
            status = "rendered" if found is None else "redrawn"
        done.append((image_id, status, time.process_time() - t0))
    return done


def _existing_key(path: Path, size: int) -> str | None:
    """The render key of a valid existing file (``""`` when it has none), or None when there is no valid file."""
    if not path.is_file() or verify_image(path) is not None:
        return None
    with Image.open(path) as im:
        if im.size != (size, size) or im.mode != "L":
            return None
        return str(getattr(im, "text", {}).get(KEY_CHUNK, ""))


#: fewer jobs than this run in the calling process
_MIN_PARALLEL = 200


def _run_jobs(jobs: list[tuple], n_jobs: int, desc: str) -> dict[str, tuple[str, float]]:
    """Run ``jobs`` in batches over ``n_jobs`` processes (joblib/loky) with a progress bar;
    returns ``{image_id: (status, cpu seconds)}``."""
    results: dict[str, tuple[str, float]] = {}
    if not jobs:
        return results
    batch = max(8, min(64, math.ceil(len(jobs) / (4 * max(1, n_jobs)))))
    batches = [jobs[i:i + batch] for i in range(0, len(jobs), batch)]
    bar = tqdm(total=len(jobs), desc=desc, unit="img")
    if n_jobs == 1 or len(jobs) < _MIN_PARALLEL:  # starting worker processes costs more than it saves
        for b in batches:
            done = _render_batch(b)
            results.update({i: (st, t) for i, st, t in done})
            bar.update(len(done))
    else:
        from joblib import Parallel, delayed

        par = Parallel(n_jobs=n_jobs, return_as="generator_unordered")
        for done in par(delayed(_render_batch)(b) for b in batches):
            results.update({i: (st, t) for i, st, t in done})
            bar.update(len(done))
    bar.close()
    return results


def _n_jobs(n_jobs: int | None) -> int:
    if n_jobs is None:
        n_jobs = int(os.environ.get("CXR_RENDER_JOBS", 0)) or min(2, os.cpu_count() or 1)
    return max(1, int(n_jobs))


def render_openi_images(images: pd.DataFrame, out_dir: Path, size: int = 256, seed: int = 0,
                        n_jobs: int | None = None) -> pd.DataFrame:
    """Render ``<out_dir>/<image_id>.png`` for each row of ``images`` (``image_id``, ``view``, ``mesh``).

    Files already present, decodable, of the right size and drawn from the same :func:`render_key` are kept
    (``status`` "existing"); the rest are drawn from their MeSH terms (:func:`mesh_to_render`) and written
    atomically ("rendered", or "redrawn" where a file drawn from another key stood).
    Returns ``image_id, image_path`` (absolute), ``status``, ``drawn`` (render keys, ``;``-joined)
    and ``unmapped`` (MeSH terms with no visible counterpart). ``n_jobs`` processes (default 2, or
    ``CXR_RENDER_JOBS``). A missing column, duplicate id or unknown view raises, naming the item.
    """
    missing = {"image_id", "view", "mesh"} - set(images.columns)
    if missing:
        raise ValueError(f"render_openi_images: images lacks column(s) {sorted(missing)}")
    ids = images["image_id"].astype(str)
    dup = ids[ids.duplicated()]
    if len(dup):
        raise ValueError(f"render_openi_images: duplicate image_id {dup.iloc[0]!r} ({len(dup)} duplicates)")
    bad = images.loc[~images["view"].isin(VIEWS)]
    if len(bad):
        raise ValueError(f"render_openi_images: image {bad['image_id'].iloc[0]!r} has view "
                         f"{bad['view'].iloc[0]!r}; expected one of {VIEWS} ({len(bad)} such rows)")
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    rows, jobs = [], []
    for image_id, view, mesh in zip(ids, images["view"], images["mesh"]):
        if not image_id or "/" in image_id or image_id in (".", ".."):
            raise ValueError(f"render_openi_images: image_id {image_id!r} is not a valid file name")
        findings, unmapped = mesh_to_render(mesh)
        findings = _fix_params(findings, seed, _study_key(image_id))
        path = out_dir / f"{image_id}.png"
        jobs.append((str(path), image_id, findings, view, int(size), int(seed)))
        rows.append({"image_id": image_id, "image_path": str(path),
                     "drawn": ";".join(sorted(findings)), "unmapped": ";".join(unmapped)})
    done = _run_jobs(jobs, _n_jobs(n_jobs), "synthetic radiographs")
    out = pd.DataFrame(rows)
    out.insert(2, "status", [done[i][0] for i in out["image_id"]])
    out.attrs["cpu_s"] = float(sum(t for _, t in done.values()))
    return out


# ---- fully synthetic studies with templated reports -------------------------------------------

# each entry: render key, prior weight among abnormal findings, MeSH term builder, findings and impression phrases
_NORMAL_IMPRESSIONS = (["No acute cardiopulmonary abnormality."] * 6
                       + ["No acute cardiopulmonary disease.", "Normal chest.", "No active disease.",
                          "No acute cardiopulmonary process.", "Negative chest x-ray."])
_SEV_WORD = {0: "mild", 1: "moderate", 2: "severe"}
_SIZE_WORD = {0: "small", 1: "moderate", 2: "large"}
#: (key, weight) of the abnormal findings a synthetic study can carry
_FINDING_PRIOR: tuple[tuple[str, float], ...] = (
    ("cardiomegaly", 0.16), ("opacity", 0.14), ("effusion", 0.11), ("atelectasis", 0.10), ("granuloma", 0.10),
    ("nodule", 0.06), ("mass", 0.025), ("pneumothorax", 0.04), ("edema", 0.05), ("hyperinflation", 0.06),
    ("central_line", 0.035), ("pacemaker", 0.03), ("ett", 0.015), ("sternotomy", 0.025), ("fracture", 0.04),
    ("spine_degenerative", 0.06), ("tortuous_aorta", 0.04),
)


def _sev_index(sev: float) -> int:
    return 0 if sev < 0.55 else (1 if sev < 0.8 else 2)


def _side_text(side: str) -> str:
    return {"right": "right", "left": "left", "bilateral": "bilateral"}[side]


def _describe(key: str, spec: dict, rng: np.random.Generator) -> tuple[str, str, str]:
    """(MeSH term, findings sentence, impression phrase) for one finding; wording varies."""
    side, zone, sev = spec.get("side"), spec.get("zone"), spec.get("severity", 0.7)
    si = _sev_index(sev)
    pick = lambda opts: opts[int(rng.integers(len(opts)))]  # noqa: E731
    zt = {"upper": "upper lobe", "middle": "lingula" if side == "left" else "middle lobe"}.get(zone, "lower lobe")
    if key == "cardiomegaly":
        w = pick(["mild", "borderline"]) if si == 0 else _SEV_WORD[si]
        return (f"Cardiomegaly/{w}", pick([f"The heart is {w}ly enlarged." if w != "borderline" else
                                           "Heart size is borderline enlarged.",
                                           f"There is {w} cardiomegaly.", f"{w.capitalize()} enlargement of the "
                                           "cardiac silhouette."]), f"{w.capitalize()} cardiomegaly.")
    if key == "opacity":
        noun = pick(["airspace opacity", "consolidation", "airspace disease", "opacity"])
        sd = "bilateral lower lobes" if side == "bilateral" else f"{side} {zt}"
        mesh = f"Opacity/lung/{'bilateral' if side == 'bilateral' else side}" if noun != "consolidation" \
            else f"Consolidation/{'bilateral' if side == 'bilateral' else side}"
        return (mesh, pick([f"There is {noun} in the {sd}.", f"Focal {noun} is seen in the {sd}.",
                            f"{noun.capitalize()} in the {sd}."]),
                pick([f"{sd.capitalize()} {noun}; follow-up recommended.", f"{sd.capitalize()} {noun}."]))
    if key == "effusion":
        w = _SIZE_WORD[si]
        sd = "bilateral" if side == "bilateral" else side
        eff = "effusions" if side == "bilateral" else "effusion"
        return (f"Pleural Effusion/{sd}/{w}", pick([f"There is a {w} {sd} pleural {eff}."
                                                   if side != "bilateral" else f"There are {w} bilateral pleural "
                                                   f"{eff}.", f"{w.capitalize()} {sd} pleural {eff}."]),
                f"{w.capitalize()} {sd} pleural {eff}.")
    if key == "atelectasis":
        sd = "bibasilar" if side == "bilateral" else f"{side} basilar"
        mesh = f"Pulmonary Atelectasis/{'bilateral' if side == 'bilateral' else side}/base"
        return (mesh, pick([f"There is {sd} atelectasis.", f"Streaky {sd} atelectasis.",
                            f"Mild {sd} atelectasis."]), f"{sd.capitalize()} atelectasis.")
    if key == "granuloma":
        w = pick(["calcified granuloma", "calcified granulomas"])
        return (f"Calcified Granuloma/lung/{pick(['right', 'left'])}",
                pick([f"A {w.removesuffix('s')} is noted." if not w.endswith("s") else f"Scattered {w} are noted.",
                      f"Stable {w}."]), pick([f"{w.capitalize()}, no acute process.", "Old granulomatous disease."]))
    if key in ("nodule", "mass"):
        size = f"{rng.uniform(0.6, 2.4):.1f} cm" if key == "nodule" else f"{rng.uniform(3.0, 6.5):.1f} cm"
        sd = f"{side} {zt}" if side != "bilateral" else zt
        return (f"{key.capitalize()}/lung/{side}", pick([f"There is a {size} {key} in the {sd}.",
                                                          f"A {size} {key} is present in the {sd}."]),
                pick([f"{sd.capitalize()} {key}; CT recommended.", f"{sd.capitalize()} pulmonary {key}."]))
    if key == "pneumothorax":
        w = _SIZE_WORD[si]
        return (f"Pneumothorax/{side}/{w}", pick([f"There is a {w} {side} pneumothorax.",
                                                  f"{w.capitalize()} {side} apical pneumothorax."]),
                f"{w.capitalize()} {side} pneumothorax.")
    if key == "edema":
        w = _SEV_WORD[si]
        return ("Pulmonary Edema", pick([f"There is {w} interstitial pulmonary edema.",
                                         f"Perihilar haziness consistent with {w} pulmonary edema."]),
                pick([f"{w.capitalize()} pulmonary edema.", "Findings consistent with pulmonary edema."]))
    if key == "hyperinflation":
        return (pick(["Lung/hyperdistention", "Pulmonary Emphysema"]),
                pick(["The lungs are hyperexpanded with flattened diaphragms.", "The lungs are hyperinflated.",
                      "Hyperexpanded lungs consistent with emphysema."]),
                pick(["Hyperinflation without acute process.", "Emphysema."]))
    if key == "central_line":
        return ("Catheters, Indwelling", pick(["A central venous catheter terminates in the SVC.",
                                               "Right-sided central line with tip in the lower SVC."
                                               ]), "Central venous catheter in place.")
    if key == "pacemaker":
        return ("Implanted Medical Device", pick(["A left-sided pacemaker is present with leads in the heart.",
                                                  "Dual-chamber pacemaker in place."]), "Pacemaker in place.")
    if key == "ett":
        return ("Tube, Inserted", pick(["An endotracheal tube terminates above the carina.",
                                        "Endotracheal tube in satisfactory position."]), "Endotracheal tube in place.")
    if key == "sternotomy":
        return ("Surgical Instruments", pick(["Median sternotomy wires are present.",
                                              "Postoperative sternotomy wires."]), "Post-sternotomy changes.")
    if key == "fracture":
        sd = pick(["right", "left"])
        return (f"Fractures, Bone/ribs/{sd}", pick([f"There is a healing {sd} rib fracture.",
                                                    f"Displaced {sd} rib fracture."]), f"{sd.capitalize()} rib fracture.")
    if key == "spine_degenerative":
        return ("Spine/degenerative", pick(["Degenerative changes of the thoracic spine.",
                                            "Mild degenerative changes of the spine."]), "Degenerative spine.")
    if key == "tortuous_aorta":
        return ("Aorta/tortuous", pick(["The thoracic aorta is tortuous.", "Tortuous aorta."]), "Tortuous aorta.")
    raise KeyError(key)  # pragma: no cover (every prior key is handled above)


# (sentence, the render keys whose presence forbids it): normal statements that would contradict a finding
_NORMAL_SENTENCES: tuple[tuple[tuple[str, ...], frozenset[str]], ...] = (
    (("The heart is normal in size.", "Heart size is normal.", "The cardiomediastinal silhouette is normal.",
      "Normal heart size and mediastinal contours."), _Q({"cardiomegaly", "tortuous_aorta"})),
    (("The lungs are clear.", "Lungs are clear bilaterally.", "No focal airspace consolidation.",
      "No focal consolidation."), _Q({"opacity", "edema", "atelectasis", "nodule", "mass"})),
    (("No pleural effusion or pneumothorax.", "No pneumothorax or pleural effusion.",
      "There is no pleural effusion or pneumothorax."), _Q({"effusion", "pneumothorax"})),
    (("No pleural effusion.",), _Q({"effusion"})),
    (("No pneumothorax.",), _Q({"pneumothorax"})),
    (("The visualized osseous structures are unremarkable.", "No acute bony abnormality."),
     _Q({"fracture", "spine_degenerative"})),
)


def _write_report(found: dict[str, dict], rng: np.random.Generator) -> tuple[str, str, list[str]]:
    """(findings text, impression text, MeSH major terms) of one study."""
    pick = lambda opts: opts[int(rng.integers(len(opts)))]  # noqa: E731
    if not found:
        sents = [pick(o) for o, _ in (_NORMAL_SENTENCES[0], _NORMAL_SENTENCES[1], _NORMAL_SENTENCES[2])]
        if rng.random() < 0.5:
            sents.append(pick(_NORMAL_SENTENCES[5][0]))
        return " ".join(sents), pick(_NORMAL_IMPRESSIONS), ["normal"]
    mesh, fsents, imps = [], [], []
    for key in sorted(found, key=lambda k: [p for p, _ in _FINDING_PRIOR].index(k)):
        term, sent, imp = _describe(key, found[key], rng)
        mesh.append(term)
        fsents.append(sent)
        imps.append(imp)
    keys = set(found)
    for opts, forbidden in _NORMAL_SENTENCES:
        if not (forbidden & keys) and rng.random() < 0.7:
            # one pleural sentence only
            if opts[0].startswith("No pneumothorax") or opts[0] == "No pleural effusion.":
                if any(s.startswith(("No pleural", "No pneumothorax", "There is no pleural")) for s in fsents):
                    continue
            fsents.append(pick(opts))
    impression = " ".join(imps[:2]) if rng.random() < 0.8 else " ".join(imps)
    return " ".join(fsents), impression, mesh


def _sample_findings(rng: np.random.Generator) -> dict[str, dict]:
    keys = [k for k, _ in _FINDING_PRIOR]
    p = np.array([w for _, w in _FINDING_PRIOR])
    n = int(rng.choice([1, 1, 1, 2, 2, 3]))
    chosen = rng.choice(keys, size=n, replace=False, p=p / p.sum())
    out = {}
    for key in chosen:
        spec: dict = {"severity": float(rng.uniform(0.45, 1.0))}
        if key in ("effusion", "opacity", "atelectasis"):
            spec["side"] = str(rng.choice(SIDES, p=[0.35, 0.35, 0.3]))
        elif key in ("nodule", "mass", "pneumothorax"):
            spec["side"] = str(rng.choice(["right", "left"]))
        if key in ("opacity", "nodule", "mass"):
            spec["zone"] = str(rng.choice(ZONES, p=[0.25, 0.3, 0.45]))
        out[str(key)] = spec
    return out


def make_synthetic_studies(n_studies: int, out_dir: Path, seed: int = 0, size: int = 256,
                           views: Sequence[str] = ("frontal",), normal_frac: float = 0.37,
                           n_jobs: int | None = None) -> pd.DataFrame:
    """Fully synthetic studies: templated reports and their rendered radiographs (one row per image).

    Columns: ``study_id, patient_id, image_id, image_path, view, findings, impression, mesh,
    label_abnormal``, the 14 :data:`FINDING_LABELS` (from the MeSH terms through
    :func:`cxrlib.datasets.labels.mesh_findings`, as for Open-I) and ``drawn`` (the render keys).
    About a quarter of patients have several studies; ``normal_frac`` of studies are normal and their
    impressions often repeat verbatim, as in Open-I. Images go to ``<out_dir>/<image_id>.png``; one already
    there is kept only when drawn from the same :func:`render_key` (so ``n_studies=12`` after ``10`` in the
    same folder redraws the images whose findings changed).
    """
    if n_studies < 1:
        raise ValueError(f"n_studies must be >= 1, got {n_studies}")
    bad = [v for v in views if v not in VIEWS]
    if bad or not views:
        raise ValueError(f"views must be a non-empty subset of {VIEWS}, got {list(views)}")
    rng = np.random.default_rng(stable_seed(seed, "studies"))
    n_patients = max(1, int(round(n_studies * 0.75)))
    # every patient gets one study, the rest go to random patients (some have several)
    owner = np.concatenate([np.arange(min(n_patients, n_studies)),
                            rng.integers(0, n_patients, max(0, n_studies - n_patients))])
    rng.shuffle(owner)
    out_dir = Path(out_dir).resolve()
    rows, jobs = [], []
    for i in range(n_studies):
        study_id, patient_id = f"syn{seed}-s{i:05d}", f"syn{seed}-p{int(owner[i]):05d}"
        found = {} if rng.random() < normal_frac else _sample_findings(rng)
        findings_text, impression, mesh = _write_report(found, rng)
        labels = mesh_findings(mesh)
        abnormal = mesh_is_abnormal(mesh)
        for view in views:
            image_id = f"{study_id}-{view}"
            path = out_dir / f"{image_id}.png"
            jobs.append((str(path), image_id, found, view, int(size), int(seed)))
            rows.append({"study_id": study_id, "patient_id": patient_id, "image_id": image_id,
                         "image_path": str(path), "view": view, "findings": findings_text,
                         "impression": impression, "mesh": ";".join(mesh), "label_abnormal": int(abnormal),
                         **{k: np.float32(labels[k]) for k in FINDING_LABELS}, "drawn": ";".join(sorted(found))})
    out_dir.mkdir(parents=True, exist_ok=True)
    _run_jobs(jobs, _n_jobs(n_jobs), "rendering synthetic studies")
    return pd.DataFrame(rows)
