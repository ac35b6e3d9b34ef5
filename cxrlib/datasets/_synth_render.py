"""The radiograph renderer behind :mod:`cxrlib.datasets.synthetic` (analytic anatomy + findings).

A radiograph is drawn as a *density* map (higher = more attenuating = brighter) on a pixel grid
whose anatomical coordinates ``(X, Y)`` in [-1, 1] are a random similarity transform of the image
grid (per-image scale, shift and rotation). Soft tissue, lungs, mediastinum, heart, diaphragm,
ribs, clavicles, spine and branching vessels make the normal chest; each finding adds or removes
density where it belongs; exposure (window, gamma), blur and quantum noise finish the image.

Conventions: frontal images are PA-like, so the patient's right is the image's left
(``side = "right"`` -> ``X < 0``). Lateral images face left: anterior is ``X < 0``, the spine is
at ``X > 0``. Everything is vectorised numpy on ``size x size`` float32 arrays plus a few PIL
line drawings, about 10-20 ms per 256 px image on one core.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw
from scipy.ndimage import gaussian_filter

#: the findings the renderer draws (canonical keys; see ``synthetic.FINDING_ALIASES`` for words)
RENDER_FINDINGS: tuple[str, ...] = (
    "cardiomegaly", "effusion", "opacity", "nodule", "mass", "atelectasis", "pneumothorax", "edema",
    "hyperinflation", "hypoinflation", "pacemaker", "central_line", "ett", "sternotomy", "fracture",
    "granuloma", "scoliosis", "tortuous_aorta", "spine_degenerative",
)
SIDES = ("right", "left", "bilateral")
#: images larger than this are drawn at half resolution and upsampled (4x faster; the blur hides it)
INTERNAL_MAX = 160
ZONES = ("upper", "middle", "lower")


def _sig(x: np.ndarray, width: float) -> np.ndarray:
    """Step 0 -> 1 over about ``2 * width`` (a linear ramp: a soft edge, cheap; the final blur smooths it)."""
    return np.clip(x * (0.5 / max(width, 1e-6)) + 0.5, 0.0, 1.0)


def _blob(X, Y, cx, cy, rx, ry, edge=0.25):
    """Soft ellipse: 1 inside, 0 outside, edge softness relative to the radius."""
    r = np.sqrt(((X - cx) / rx) ** 2 + ((Y - cy) / ry) ** 2)
    return _sig(1.0 - r, edge)


@dataclass
class _Anatomy:
    """Per-image anatomical and acquisition variation (drawn once from the image's generator)."""

    scale: float
    tx: float
    ty: float
    rot: float
    heart_w: float
    heart_x: float
    dome: float
    lung_w: float
    exposure: float
    gamma: float
    noise: float
    blur: float
    tissue: float


def _draw_anatomy(rng: np.random.Generator) -> _Anatomy:
    return _Anatomy(
        scale=rng.uniform(0.9, 1.06), tx=rng.uniform(-0.05, 0.05), ty=rng.uniform(-0.05, 0.06),
        rot=math.radians(rng.uniform(-4, 4)), heart_w=rng.uniform(0.28, 0.33), heart_x=rng.uniform(0.10, 0.15),
        dome=rng.uniform(0.40, 0.50), lung_w=rng.uniform(0.92, 1.05), exposure=rng.uniform(-0.08, 0.08),
        gamma=rng.uniform(0.85, 1.2), noise=rng.uniform(0.012, 0.035), blur=rng.uniform(0.5, 1.1),
        tissue=rng.uniform(0.85, 1.2),
    )


class _Canvas:
    """The anatomical coordinate grid of one image and a converter to pixel coordinates."""

    def __init__(self, size: int, a: _Anatomy):
        self.size, self.a = size, a
        v = (np.arange(size, dtype=np.float32) + 0.5) / size * 2 - 1
        U, V = np.meshgrid(v, v)
        c, s = math.cos(a.rot), math.sin(a.rot)
        self.X = ((c * (U - a.tx) + s * (V - a.ty)) / a.scale).astype(np.float32)
        self.Y = ((-s * (U - a.tx) + c * (V - a.ty)) / a.scale).astype(np.float32)
        self.px = 2.0 / size / a.scale  # one pixel in anatomical units

    def to_px(self, x: float, y: float) -> tuple[float, float]:
        a = self.a
        c, s = math.cos(a.rot), math.sin(a.rot)
        u = a.scale * (c * x - s * y) + a.tx
        v = a.scale * (s * x + c * y) + a.ty
        return (u + 1) / 2 * self.size, (v + 1) / 2 * self.size

    def layer(self) -> tuple[Image.Image, ImageDraw.ImageDraw]:
        im = Image.new("F", (self.size, self.size), 0.0)
        return im, ImageDraw.Draw(im)

    def lw(self, width: float) -> int:
        """A line width in pixels for an anatomical width (at least one pixel)."""
        return max(1, int(round(width / self.px)))


def _norm_findings(findings) -> dict[str, dict]:
    if findings is None:
        return {}
    if isinstance(findings, dict):
        out = {k: dict(v or {}) for k, v in findings.items()}
    else:
        out = {k: {} for k in findings}
    unknown = sorted(set(out) - set(RENDER_FINDINGS))
    if unknown:
        raise ValueError(f"unknown finding(s) {unknown}; the renderer knows {list(RENDER_FINDINGS)}")
    return out


def _sides(spec: dict, rng: np.random.Generator, p_bilateral: float = 0.25) -> list[int]:
    """Image-side signs (-1 = patient right = image left in PA) of a finding."""
    side = spec.get("side") or rng.choice(SIDES, p=[(1 - p_bilateral) / 2, (1 - p_bilateral) / 2, p_bilateral])
    if side not in SIDES:
        raise ValueError(f"side must be one of {SIDES}, got {side!r}")
    return {"right": [-1], "left": [1], "bilateral": [-1, 1]}[side]


def _zone_y(spec: dict, rng: np.random.Generator, dome: float) -> float:
    zone = spec.get("zone") or rng.choice(ZONES, p=[0.25, 0.3, 0.45])
    if zone not in ZONES:
        raise ValueError(f"zone must be one of {ZONES}, got {zone!r}")
    lo, hi = {"upper": (-0.55, -0.25), "middle": (-0.2, 0.1), "lower": (0.12, dome - 0.05)}[zone]
    return float(rng.uniform(lo, hi))


def _severity(spec: dict, rng: np.random.Generator) -> float:
    sev = spec.get("severity")
    return float(rng.uniform(0.45, 1.0) if sev is None else np.clip(sev, 0.1, 1.0))


def _vessels(cv: _Canvas, rng: np.random.Generator, hila: list[tuple[float, float, int]], n: int, reach: float):
    """Branching pulmonary vessels drawn from each hilum outwards (a density layer)."""
    im, dr = cv.layer()
    for hx, hy, side in hila:
        for _ in range(n):
            ang = math.radians(rng.uniform(-80, 95))  # 0 = lateral, +90 = down
            x, y, w = hx, hy, rng.uniform(0.014, 0.024)
            length = reach * rng.uniform(0.5, 1.0)
            steps = 7
            for _k in range(steps):
                ang += rng.normal(0, 0.25)
                nx = x + side * math.cos(ang) * length / steps
                ny = y + math.sin(ang) * length / steps
                dr.line([cv.to_px(x, y), cv.to_px(nx, ny)], fill=1.0, width=cv.lw(w))
                if rng.random() < 0.35:  # a side branch
                    bang = ang + rng.choice([-1, 1]) * rng.uniform(0.4, 0.9)
                    bl = length / steps * rng.uniform(1.0, 2.0)
                    dr.line([cv.to_px(nx, ny), cv.to_px(nx + side * math.cos(bang) * bl, ny + math.sin(bang) * bl)],
                            fill=0.7, width=cv.lw(w * 0.6))
                x, y, w = nx, ny, w * 0.8
    return np.asarray(im, dtype=np.float32)


def _finish(D: np.ndarray, a: _Anatomy, rng: np.random.Generator, size: int) -> Image.Image:
    """Density -> 8-bit image: (upsample), blur, window, gamma, quantum noise."""
    n = D.shape[0]
    sig = a.blur * n / 256
    if sig > 0.3:
        D = gaussian_filter(D, sig)
    if n != size:
        D = np.asarray(Image.fromarray(D, mode="F").resize((size, size), Image.BICUBIC), dtype=np.float32)
    # film-like response: linear at low density, a soft shoulder at high density so metal stays
    # brighter than the mediastinum instead of clipping with it
    img = np.clip((1 - np.exp(-1.3 * np.clip(D + a.exposure, 0, None))) / (1 - math.exp(-1.3 * 1.35)), 0, 1) ** a.gamma
    noise = rng.standard_normal((size, size), dtype=np.float32)
    noise = gaussian_filter(noise, 0.6) * 1.6
    img = img + a.noise * noise * (0.6 + 0.6 * img)
    return Image.fromarray((np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8), mode="L")


# ---- frontal ----------------------------------------------------------------------------------

def _frontal(size: int, f: dict[str, dict], rng: np.random.Generator, a: _Anatomy,
             ra: np.random.Generator) -> np.ndarray:
    """Density map of a PA view; ``rng`` draws finding details, ``ra`` anatomy texture."""
    cv = _Canvas(size, a)
    X, Y = cv.X, cv.Y
    AX = np.abs(X)
    dome = a.dome
    if "hyperinflation" in f:
        dome += 0.13 * _severity(f["hyperinflation"], rng)
    if "hypoinflation" in f:
        dome -= 0.12 * _severity(f["hypoinflation"], rng)
    scol = 0.0
    if "scoliosis" in f:
        scol = rng.choice([-1, 1]) * rng.uniform(0.05, 0.10) * _severity(f["scoliosis"], rng)
    spine_x = scol * np.cos(np.pi * Y / 1.6)

    # body: soft tissue thickest in the middle; shoulders and neck at the top
    bw = 0.97 + 0.05 * _sig(-0.7 - Y, 0.1)
    body = _sig(bw - AX, 0.03)
    thick = np.sqrt(np.clip(1 - (X / 1.02) ** 2, 0, 1))
    D = (0.45 + 0.25 * thick) * a.tissue * body
    D += 0.10 * _sig(-0.62 - Y, 0.06) * _sig(AX - 0.55, 0.08) * body  # shoulders / humeral heads

    # diaphragm domes (right higher) and abdomen below
    lat = AX
    side_off = np.where(X < 0, -0.035, 0.0).astype(np.float32)
    dome_y = dome + side_off - 0.22 * np.clip(1 - ((lat - 0.45) / 0.42) ** 2, 0, 1)
    if "atelectasis" in f and f["atelectasis"].get("_sides") is None:
        f["atelectasis"]["_sides"] = _sides(f["atelectasis"], rng, 0.2)
    if "atelectasis" in f:  # volume loss lifts the hemidiaphragm on that side
        for sd in f["atelectasis"]["_sides"]:
            dome_y = dome_y - 0.05 * (np.sign(X) == sd)
    below = _sig(Y - dome_y, 0.02)

    # lungs: rounded superellipses per side, cut by the domes and the mediastinum
    lw = 0.36 * a.lung_w
    cx = 0.47
    sup = (np.abs((AX - cx) / lw) ** 2.6 + np.abs((Y + 0.08) / 0.72) ** 2.2)
    lung = _sig(1 - sup, 0.08) * (1 - below) * _sig(AX - 0.1 - 0.05 * _sig(Y + 0.3, 0.1), 0.02)

    # heart: ellipse left of the midline, widened in cardiomegaly
    hw = a.heart_w
    if "cardiomegaly" in f:
        hw *= 1.3 + 0.35 * _severity(f["cardiomegaly"], rng)
    heart = _blob(X, Y, a.heart_x + 0.45 * (hw - a.heart_w), dome - 0.16, hw, 0.40, 0.08) * _sig(dome + 0.02 - Y, 0.03)
    # mediastinum and aortic knob
    med_w = 0.11 + 0.02 * _sig(Y + 0.3, 0.1)
    medi = _sig(med_w - np.abs(X - spine_x * 0.5 - 0.01), 0.02) * _sig(Y + 0.85, 0.05) * _sig(dome - Y, 0.03)
    knob_r = 0.065
    knob_x = 0.13
    if "tortuous_aorta" in f:
        knob_r, knob_x = 0.085, 0.17
    knob = _blob(X, Y, knob_x, -0.33, knob_r, knob_r * 0.9, 0.2)
    # descending aorta edge
    desc = _sig(0.07 - np.abs(X - knob_x + 0.03 - (0.04 * (Y + 0.3) if "tortuous_aorta" in f else 0)), 0.02) \
        * _sig(Y + 0.33, 0.03) * _sig(dome - Y, 0.03)
    opaque = np.maximum.reduce([heart, medi, knob, desc * 0.5])
    lung = lung * (1 - opaque)
    D += 0.22 * opaque * body * (1 - below) + 0.20 * below * body * thick

    # stomach bubble under the left dome
    D -= 0.12 * _blob(X, Y, 0.40, dome + 0.12, 0.10, 0.06, 0.3) * below

    # lung air: darker lungs; emphysema darker and with fewer vessels
    air = 0.36 if "hyperinflation" not in f else 0.46
    D -= air * lung * (0.75 + 0.25 * thick) * (1 - 0.25 * _sig(Y - dome + 0.25, 0.15))

    # trachea and main bronchi (air column)
    trach = _sig(0.032 - np.abs(X - spine_x), 0.01) * _sig(-0.22 - Y, 0.02) * _sig(Y + 0.95, 0.03)
    D -= 0.10 * trach

    # spine: vertebral bodies and discs, seen through the mediastinum
    sp = _sig(0.065 - np.abs(X - spine_x), 0.01) * body
    discs = 0.5 + 0.5 * np.cos(2 * np.pi * (Y + 1) / 0.105)
    D += sp * (0.04 + 0.03 * discs)
    if "spine_degenerative" in f:  # osteophytes: bright spurs at the disc levels
        D += 0.12 * sp * _sig(np.abs(X - spine_x) - 0.05, 0.008) * (discs > 0.85) \
            + 0.10 * _sig(0.085 - np.abs(X - spine_x), 0.008) * (discs > 0.92) * body

    # ribs: posterior ribs arching laterally-down from the spine, fainter anterior ribs
    ribs = np.zeros_like(D)
    frac = f.get("fracture")
    if frac is not None:
        frac.setdefault("_rib", int(rng.integers(3, 8)))
        frac.setdefault("_sign", int(rng.choice([-1, 1])))
        frac.setdefault("_at", float(rng.uniform(0.45, 0.7)))
    rib_step = 0.118 * (dome + 0.75) / 1.2
    jitter = ra.normal(0, 0.012, 10)
    for k in range(10):
        y0 = -0.78 + k * rib_step + jitter[k]
        cy = y0 - 0.02 * AX + 0.55 * np.clip(AX - 0.12, 0, None) ** 2
        d = np.abs(Y - cy)
        band = _sig(0.024 - d, 0.006) * _sig(0.9 - AX, 0.03) * _sig(AX - 0.13, 0.03)
        if frac is not None and k == frac["_rib"]:
            side_mask = np.sign(X) == frac["_sign"]
            gap = _sig(np.abs(AX - frac["_at"]) - 0.018, 0.004)
            shift = np.where(AX > frac["_at"], 0.03, 0.0)
            band2 = _sig(0.024 - np.abs(Y - cy - shift), 0.006) * _sig(0.9 - AX, 0.03) * _sig(AX - 0.07, 0.02) * gap
            callus = _blob(AX, Y, frac["_at"], float(y0 - 0.02 * frac["_at"] + 0.55 * (frac["_at"] - 0.12) ** 2) + 0.01,
                           0.03, 0.03, 0.3)
            band = np.where(side_mask, band2, band)
            D += 0.16 * callus * side_mask  # healing callus: a bright lump on the broken rib
        ribs = np.maximum(ribs, band * (0.8 + 0.2 * _sig(d - 0.016, 0.004)))  # cortex brighter
        ya = y0 + 0.22 + 0.30 * np.clip(AX - 0.15, 0, None) - 0.25 * np.clip(AX - 0.15, 0, None) ** 2
        ribs = np.maximum(ribs, 0.45 * _sig(0.028 - np.abs(Y - ya), 0.008) * _sig(0.8 - AX, 0.05) * _sig(AX - 0.25, 0.05))
    D += 0.085 * ribs * (1 - below * 0.7)
    # clavicles
    cl_y = -0.74 - 0.10 * np.clip(AX - 0.1, 0, None) + 0.12 * np.clip(AX - 0.1, 0, None) ** 2
    D += 0.13 * _sig(0.03 - np.abs(Y - cl_y), 0.007) * _sig(0.72 - AX, 0.03) * _sig(AX - 0.05, 0.02)

    # vessels: branching markings from the hila, faded at the periphery
    n_vessels = 9 if "hyperinflation" not in f else 5
    vess = _vessels(cv, ra, [(-0.16, -0.05, -1), (0.18, -0.07, 1)], n_vessels, 0.62)
    vess = gaussian_filter(vess, max(0.8, 1.4 * size / 256))
    hilum = np.exp(-((AX - 0.2) ** 2 / 0.06 + (Y + 0.06) ** 2 / 0.05))
    D += 0.20 * vess * lung + 0.12 * hilum * lung
    # parenchymal texture
    tex = gaussian_filter(ra.standard_normal((size, size), dtype=np.float32), 2.0 * size / 256)
    D += 0.07 * tex * lung

    # ---- findings ----
    if "edema" in f:
        sev = _severity(f["edema"], rng)
        bat = np.exp(-((AX - 0.22) ** 2 / 0.05 + (Y + 0.0) ** 2 / 0.09))
        haze = gaussian_filter(rng.standard_normal((size, size), dtype=np.float32), 3.0 * size / 256)
        D += (0.20 + 0.12 * sev) * bat * lung * (0.8 + 0.4 * haze) + 0.05 * sev * lung
        kerley = _sig(0.008 - np.abs(np.mod(Y * 28, 1.0) - 0.5) / 28, 0.003) * _sig(AX - 0.72, 0.02) * _sig(Y - 0.1, 0.05)
        D += 0.06 * kerley * lung
    if "opacity" in f:
        spec = f["opacity"]
        sev = _severity(spec, rng)
        for sd in _sides(spec, rng, 0.3):
            cy = _zone_y(spec, rng, dome)
            cx_ = sd * rng.uniform(0.32, 0.6)
            r = rng.uniform(0.14, 0.22) * (0.7 + 0.5 * sev)
            patch = _blob(X, Y, cx_, cy, r * rng.uniform(0.8, 1.3), r, 0.5)
            mottle = gaussian_filter(rng.standard_normal((size, size), dtype=np.float32), 2.5 * size / 256)
            D += (0.30 + 0.18 * sev) * patch * lung * np.clip(0.8 + 0.6 * mottle, 0.2, 1.6)
    if "atelectasis" in f:
        for sd in f["atelectasis"]["_sides"]:
            by = dome - rng.uniform(0.12, 0.22)
            slope = rng.uniform(-0.12, 0.12)
            plate = _sig(0.025 - np.abs(Y - by - slope * (AX - 0.45)), 0.01) * (np.sign(X) == sd) \
                * _sig(0.25 - np.abs(AX - 0.48), 0.05)
            D += 0.32 * plate * (lung + 0.2)
            D += 0.24 * _blob(X, Y, sd * 0.45, dome - 0.1, 0.28, 0.14, 0.5) * lung
    if "effusion" in f:
        spec = f["effusion"]
        sev = _severity(spec, rng)
        for sd in _sides(spec, rng, 0.35):
            level = dome - 0.16 - 0.42 * sev * rng.uniform(0.7, 1.0)
            men = level - 0.45 * np.clip(AX - 0.3, 0, None) ** 1.5  # meniscus rises laterally
            fluid = _sig(Y - men, 0.06) * (np.sign(X) == sd) * _sig(0.95 - AX, 0.03) * _sig(AX - 0.08, 0.04)
            fluid = fluid * _sig(dome + 0.1 - Y, 0.05) * (0.75 + 0.25 * _sig(Y - men - 0.1, 0.1))
            D += 0.40 * fluid * (lung + 0.1)
    if "pneumothorax" in f:
        spec = f["pneumothorax"]
        sev = _severity(spec, rng)
        sd = _sides(spec, rng, 0.0)[0]
        # collapsed lung edge: a shrunken copy of the lung outline; outside it air without vessels
        shrink = 0.78 - 0.25 * sev
        sup2 = (np.abs((AX - cx + 0.02) / (lw * shrink)) ** 2.6 + np.abs((Y + 0.02) / (0.72 * (shrink + 0.15))) ** 2.2)
        inside = _sig(1 - sup2, 0.03)
        ptx = lung * (1 - inside) * (np.sign(X) == sd)
        D -= ptx * (0.07 * vess + 0.08 * hilum + 0.05 * tex + 0.07)
        edge = np.exp(-((sup2 - 1.0) / 0.05) ** 2) * lung * (np.sign(X) == sd)
        D += 0.08 * edge
    for kind, rr in (("nodule", (0.03, 0.05)), ("mass", (0.08, 0.13))):
        if kind in f:
            spec = f[kind]
            for sd in _sides(spec, rng, 0.0):
                count = int(spec.get("count", 1 if kind == "mass" else rng.choice([1, 1, 2])))
                for _ in range(count):
                    r = rng.uniform(*rr)
                    ncx, ncy = sd * rng.uniform(0.28, 0.62), _zone_y(spec, rng, dome - 0.05)
                    D += 0.32 * _blob(X, Y, ncx, ncy, r, r * rng.uniform(0.85, 1.15), 0.25) * (lung + 0.6)
    if "granuloma" in f:
        spec = f["granuloma"]
        count = int(spec.get("count", rng.choice([1, 1, 2, 3])))
        for _ in range(count):
            sd = rng.choice([-1, 1])
            r = rng.uniform(0.012, 0.02)
            gx, gy = sd * rng.uniform(0.25, 0.65), rng.uniform(-0.5, dome - 0.15)
            D += 0.55 * _blob(X, Y, gx, gy, r, r, 0.15)

    # ---- devices (drawn as lines and shapes in pixel space) ----
    dev, dr = cv.layer()
    if "central_line" in f:
        sd = rng.choice([-1, 1])
        pts = [(sd * 0.55, -0.80), (sd * 0.32, -0.70), (sd * 0.10, -0.55), (0.03 * sd, -0.30),
               (-0.02, rng.uniform(-0.15, 0.0))]
        dr.line([cv.to_px(*p) for p in pts], fill=1.0, width=cv.lw(0.012), joint="curve")
    if "pacemaker" in f:
        px, py = rng.uniform(0.42, 0.6), rng.uniform(-0.72, -0.6)
        box = [cv.to_px(px - 0.09, py - 0.06), cv.to_px(px + 0.09, py + 0.06)]
        dr.rounded_rectangle([min(box[0][0], box[1][0]), min(box[0][1], box[1][1]),
                              max(box[0][0], box[1][0]), max(box[0][1], box[1][1])], radius=cv.lw(0.03), fill=1.6)
        leads = [(px, py), (px - 0.15, py + 0.05), (0.06, -0.35), (-0.02, 0.0), (0.02, 0.2), (0.15, 0.3)]
        dr.line([cv.to_px(*p) for p in leads], fill=1.2, width=cv.lw(0.014), joint="curve")
    if "ett" in f:
        tip = rng.uniform(-0.45, -0.32)
        for off in (-0.022, 0.022):
            dr.line([cv.to_px(off, -1.05), cv.to_px(off, tip)], fill=0.8, width=cv.lw(0.009))
        dr.line([cv.to_px(0.0, -1.05), cv.to_px(0.0, tip)], fill=0.6, width=cv.lw(0.006))
    if "sternotomy" in f:
        for k in range(int(rng.integers(4, 7))):
            wy = -0.45 + k * 0.11
            c = cv.to_px(0.0, wy)
            r = max(1.5, 0.028 / cv.px)
            dr.ellipse([c[0] - r, c[1] - r * 0.6, c[0] + r, c[1] + r * 0.6], outline=1.5, width=cv.lw(0.01))
    D += 0.55 * np.asarray(dev, dtype=np.float32)
    return D


# ---- lateral ----------------------------------------------------------------------------------

def _lateral(size: int, f: dict[str, dict], rng: np.random.Generator, a: _Anatomy,
             ra: np.random.Generator) -> np.ndarray:
    """Density map of a left lateral view (anterior to the image left)."""
    cv = _Canvas(size, a)
    X, Y = cv.X, cv.Y
    dome = a.dome + 0.05
    if "hyperinflation" in f:
        dome += 0.12 * _severity(f["hyperinflation"], rng)
    if "hypoinflation" in f:
        dome -= 0.10 * _severity(f["hypoinflation"], rng)

    body = _blob(X, Y, 0.02, 0.15, 1.12, 1.6, 0.04)
    thick = np.sqrt(np.clip(1 - ((X - 0.02) / 1.15) ** 2, 0, 1))
    D = (0.5 + 0.2 * thick) * a.tissue * body
    D += 0.12 * _sig(-0.55 - Y, 0.08) * _sig(-0.1 - X, 0.1) * body  # arms / shoulders projected anteriorly
    # diaphragm: domes sloping down posteriorly into the deep posterior sulcus
    dome_y = dome - 0.12 * np.clip(1 - ((X + 0.05) / 0.6) ** 2, 0, 1) + 0.10 * np.clip(X - 0.2, 0, None)
    below = _sig(Y - dome_y, 0.02)
    lung = _blob(X, Y, 0.0, -0.08, 0.64, 0.78, 0.1) * (1 - below)
    # heart anterior-inferior, bigger in cardiomegaly (extends posteriorly)
    hw = 0.30 * (1.0 if "cardiomegaly" not in f else 1.25 + 0.3 * _severity(f["cardiomegaly"], rng))
    heart = _blob(X, Y, -0.28 + 0.5 * (hw - 0.30), 0.27, hw, 0.28, 0.3)
    lung = lung * (1 - 0.7 * heart)
    D += 0.08 * heart + 0.15 * below * body
    retro = 0.30 if "hyperinflation" not in f else 0.42
    D -= retro * lung
    # spine: vertebral bodies with discs, posterior
    spx = 0.62 - 0.05 * Y
    vert = _sig(0.10 - np.abs(X - spx), 0.01) * body
    discs = 0.5 + 0.5 * np.cos(2 * np.pi * (Y + 1) / 0.12)
    D += vert * (0.08 + 0.05 * (discs < 0.8))
    if "fracture" in f:  # a wedged (compressed) vertebra
        vy = rng.uniform(-0.1, 0.35)
        D += 0.18 * _blob(X, Y, float(spx.mean()) - 0.04, vy, 0.09, 0.04, 0.2)
    if "spine_degenerative" in f:
        D += 0.10 * _sig(0.02 - np.abs(X - spx + 0.11), 0.006) * (discs > 0.85) * body
    # sternum anteriorly, posterior rib arcs
    D += 0.10 * _sig(0.025 - np.abs(X + 0.70 - 0.08 * (Y + 0.6)), 0.008) * _sig(Y + 0.65, 0.03) * _sig(0.2 - Y, 0.03)
    for k in range(9):
        cy = -0.7 + k * 0.13 + 0.25 * (X - 0.6) ** 2
        D += 0.05 * _sig(0.02 - np.abs(Y - cy), 0.006) * _sig(X + 0.1, 0.1) * lung
    # trachea and hilum
    D -= 0.10 * _sig(0.035 - np.abs(X - 0.08 + 0.15 * (Y + 0.2)), 0.01) * _sig(-0.15 - Y, 0.03) * body
    vess = gaussian_filter(_vessels(cv, ra, [(0.05, -0.05, -1), (0.05, -0.05, 1)], 7, 0.5),
                           max(0.8, 1.4 * size / 256))
    D += 0.12 * vess * lung + 0.10 * np.exp(-((X - 0.05) ** 2 / 0.03 + (Y + 0.05) ** 2 / 0.03)) * lung
    tex = gaussian_filter(ra.standard_normal((size, size), dtype=np.float32), 2.0 * size / 256)
    D += 0.04 * tex * lung

    # findings: projected to the lateral geometry (lower zones posterior, upper zones superior)
    if "edema" in f:
        sev = _severity(f["edema"], rng)
        D += (0.15 + 0.1 * sev) * np.exp(-((X - 0.05) ** 2 / 0.12 + Y ** 2 / 0.12)) * lung
    if "opacity" in f:
        spec = f["opacity"]
        sev = _severity(spec, rng)
        cy = _zone_y(spec, rng, dome)
        r = rng.uniform(0.16, 0.24) * (0.7 + 0.5 * sev)
        D += (0.20 + 0.12 * sev) * _blob(X, Y, rng.uniform(-0.2, 0.35), cy, r, r * 0.8, 0.5) * lung
    if "effusion" in f:
        sev = _severity(f["effusion"], rng)
        level = dome - 0.05 - 0.35 * sev
        men = level - 0.25 * np.clip(X - 0.0, 0, None)
        D += 0.38 * _sig(Y - men, 0.025) * _sig(X + 0.1, 0.05) * (lung + 0.1)
    if "atelectasis" in f:
        D += 0.15 * _sig(0.03 - np.abs(Y - dome + 0.2 - 0.2 * X), 0.01) * lung
    for kind, rr in (("nodule", (0.03, 0.05)), ("mass", (0.08, 0.13))):
        if kind in f:
            r = rng.uniform(*rr)
            D += 0.28 * _blob(X, Y, rng.uniform(-0.3, 0.35), _zone_y(f[kind], rng, dome - 0.05), r, r, 0.25) * (lung + 0.3)
    if "granuloma" in f:
        for _ in range(int(f["granuloma"].get("count", rng.choice([1, 2])))):
            r = rng.uniform(0.012, 0.02)
            D += 0.5 * _blob(X, Y, rng.uniform(-0.35, 0.4), rng.uniform(-0.5, dome - 0.2), r, r, 0.15)
    if "pneumothorax" in f:
        D -= 0.10 * _sig(-0.35 - Y, 0.05) * lung * (1 + vess)
    if "tortuous_aorta" in f:  # unfolded arch above the heart (scoliosis does not show on a lateral)
        D += 0.10 * _blob(X, Y, 0.12, -0.38, 0.2, 0.1, 0.3) * (1 - _blob(X, Y, 0.12, -0.36, 0.13, 0.05, 0.3)) * lung
    dev, dr = cv.layer()
    if "pacemaker" in f:
        c = cv.to_px(-0.55, -0.6)
        r = 0.08 / cv.px
        dr.rounded_rectangle([c[0] - r * 0.5, c[1] - r, c[0] + r * 0.5, c[1] + r], radius=max(1, int(r / 3)), fill=1.5)
        dr.line([c, cv.to_px(-0.2, -0.3), cv.to_px(-0.25, 0.2), cv.to_px(-0.4, 0.35)], fill=1.1,
                width=cv.lw(0.014), joint="curve")
    if "central_line" in f:
        dr.line([cv.to_px(-0.35, -0.95), cv.to_px(-0.1, -0.5), cv.to_px(-0.05, -0.05)], fill=1.0, width=cv.lw(0.012))
    if "ett" in f:
        dr.line([cv.to_px(-0.15, -1.05), cv.to_px(0.03, -0.40)], fill=0.8, width=cv.lw(0.02))
    if "sternotomy" in f:
        for k in range(5):
            c = cv.to_px(-0.68 + 0.08 * (k * 0.12), -0.45 + k * 0.12)
            r = max(1.5, 0.02 / cv.px)
            dr.ellipse([c[0] - r * 0.5, c[1] - r, c[0] + r * 0.5, c[1] + r], outline=1.5, width=cv.lw(0.008))
    D += 0.55 * np.asarray(dev, dtype=np.float32)
    return D


def render(findings, view: str, size: int, rng: np.random.Generator) -> Image.Image:
    """Render one radiograph (see :func:`cxrlib.datasets.synthetic.render_radiograph`)."""
    if view not in ("frontal", "lateral"):
        raise ValueError(f"view must be 'frontal' or 'lateral', got {view!r}")
    if not isinstance(size, (int, np.integer)) or size < 32:
        raise ValueError(f"size must be an int >= 32, got {size!r}")
    f = _norm_findings(findings)
    # anatomy/acquisition and findings draw from separate streams: adding a finding leaves the anatomy as is
    ra, rf = (np.random.default_rng(int(s)) for s in rng.integers(0, 2**63 - 1, size=2))
    a = _draw_anatomy(ra)
    n = int(size) if size <= INTERNAL_MAX else int(size) // 2
    D = (_frontal if view == "frontal" else _lateral)(n, f, rf, a, ra)
    return _finish(D, a, ra, int(size))
