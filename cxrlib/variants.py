"""Rule-based, seeded rewrites of radiology reports: clinically equivalent styles and single-error variants.

Ko et al. (arXiv 2509.15234) train and test text encoders on report variants written by an LLM
(``create_data/similar.txt``: keep laterality, distribution, severity and comparisons while expanding
abbreviations and swapping synonyms; ``create_data/error.txt``: inject exactly one clinically
significant error). This module does what rules can do offline and deterministically.

Equivalent rewrites (:data:`EQUIVALENT_RULES`; a *style* in :data:`STYLES` chains several):

* ``expand_abbreviations`` / ``contract_abbreviations``: the table :data:`ABBREVIATIONS` (case-sensitive
  for capitals such as ``PA``, so "pa" in a word is never touched). ``PE`` is left out on purpose: it
  means pulmonary embolism as often as pleural effusion.
* ``impression_only`` / ``findings_only``: one section of a two-section report (a style variant that
  may drop a minor finding the other section mentions; the benchmarks say which style they use).
* ``reorder_sentences``: a seeded permutation of the sentences within each section.
* ``negation_paraphrase``: "No effusion." <-> "Effusion is not seen." (whole simple sentences only).
* ``synonyms``: :data:`SYNONYMS`, radiological phrases of the same meaning, either direction.

Error variants (:data:`ERROR_RULES`, exactly one change each, following Ko et al.'s taxonomy where
rules can): ``negation_flip`` (a finding stated absent becomes present, or present becomes absent),
``laterality_swap`` (left <-> right in one sentence), ``severity_change`` (one severity word to another
grade), ``finding_swap`` (one finding for another with a different label, :data:`FINDING_SWAPS`),
``measurement_change`` (one measurement scaled), ``device_added`` / ``device_removed``.

:func:`text_findings` and :func:`text_laterality` are a small mention labeler (CheXpert's 14 names,
NegEx-style negation cues) used to check the rules: equivalent rewrites keep both, every error
variant changes one of them, a measurement or the devices. The study table's own labels come from
MeSH / CheXpert (:mod:`cxrlib.datasets.labels`), never from this labeler.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from cxrlib.datasets.labels import FINDING_LABELS

#: abbreviation -> expansion (a documented table; contraction uses it backwards, longest phrase first)
ABBREVIATIONS: dict[str, str] = {
    "PTX": "pneumothorax",
    "CHF": "congestive heart failure",
    "COPD": "chronic obstructive pulmonary disease",
    "b/l": "bilateral",
    "AP": "anteroposterior",
    "PA": "posteroanterior",
    "s/p": "status post",
    "ETT": "endotracheal tube",
    "NGT": "nasogastric tube",
    "CVC": "central venous catheter",
    "PICC": "peripherally inserted central catheter",
    "SVC": "superior vena cava",
    "RUL": "right upper lobe",
    "RML": "right middle lobe",
    "RLL": "right lower lobe",
    "LUL": "left upper lobe",
    "LLL": "left lower lobe",
    "CP angle": "costophrenic angle",
    "w/o": "without",
    "w/": "with",
}
#: pairs of phrases with one meaning (rewritten in either direction)
SYNONYMS: tuple[tuple[str, str], ...] = (
    ("cardiomegaly", "enlarged cardiac silhouette"),
    ("airspace disease", "airspace opacity"),
    ("within normal limits", "unremarkable"),
    ("osseous structures", "bony structures"),
    ("no acute cardiopulmonary abnormality", "no acute cardiopulmonary process"),
    ("pulmonary vascular congestion", "pulmonary venous congestion"),
    ("hyperinflated", "hyperexpanded"),
    ("calcified granuloma", "calcified nodule"),
)
#: finding phrase -> a phrase of another finding (different CheXpert label)
FINDING_SWAPS: dict[str, str] = {
    "pleural effusion": "pneumothorax", "pneumothorax": "pleural effusion",
    "atelectasis": "consolidation", "consolidation": "atelectasis",
    "pulmonary edema": "pneumonia", "pneumonia": "pulmonary edema",
    "cardiomegaly": "pleural effusion", "effusion": "pneumothorax",
}
#: severity word -> the word it becomes in an error (a different grade)
SEVERITY_SWAPS: dict[str, str] = {
    "mild": "severe", "minimal": "large", "small": "large", "trace": "large", "tiny": "large",
    "moderate": "severe", "severe": "mild", "large": "small", "massive": "small", "borderline": "severe",
}
DEVICE_SENTENCES: tuple[str, ...] = (
    "A right internal jugular central venous catheter terminates in the superior vena cava.",
    "An endotracheal tube terminates 4 cm above the carina.",
    "A nasogastric tube courses below the diaphragm.",
    "A left-sided pacemaker is present with leads in the right atrium and ventricle.",
)

# ---- sentences and sections --------------------------------------------------------------------


@dataclass(frozen=True)
class Report:
    """The two sections of a report; :meth:`text` joins them as the study table does."""

    findings: str = ""
    impression: str = ""

    def text(self) -> str:
        return " ".join(s for s in (self.findings.strip(), self.impression.strip()) if s)

    def sections(self) -> list[str]:
        return [s for s in (self.findings, self.impression) if s and s.strip()]


def split_sentences(text: str) -> list[str]:
    """Sentences of a section; an enumeration such as ``"1."`` stays with its sentence."""
    parts = [p for p in re.split(r"(?<=[.!?])\s+", text.strip()) if p]
    out: list[str] = []
    for p in parts:
        if out and re.fullmatch(r"\d+\.", out[-1]):
            out[-1] = f"{out[-1]} {p}"
        else:
            out.append(p)
    return out


def _map_sentences(report: Report, fn: Callable[[str], str]) -> Report:
    return Report(" ".join(fn(s) for s in split_sentences(report.findings)),
                  " ".join(fn(s) for s in split_sentences(report.impression)))


def _match_case(src: str, repl: str) -> str:
    return repl[0].upper() + repl[1:] if src[:1].isupper() and repl[:1].islower() else repl


def _sentence_case(m: re.Match, repl: str) -> str:
    """``repl`` capitalised where the match starts its sentence (after any enumeration), else as written."""
    starts = re.fullmatch(r"(?:\d+\.\s*)?", m.string[:m.start()]) is not None
    return repl[0].upper() + repl[1:] if starts else repl


def _abbr_pattern(abbr: str) -> re.Pattern:
    flags = 0 if abbr.split()[0].isupper() else re.IGNORECASE
    return re.compile(r"(?<![A-Za-z/])" + re.escape(abbr) + r"(?![A-Za-z])", flags)


def _phrase_pattern(phrase: str) -> re.Pattern:
    return re.compile(r"(?<![A-Za-z])" + re.escape(phrase) + r"(?![A-Za-z])", re.IGNORECASE)


# ---- equivalent rules --------------------------------------------------------------------------

EquivalentRule = Callable[[Report, np.random.Generator], "Report | None"]
EQUIVALENT_RULES: dict[str, EquivalentRule] = {}


def equivalent_rule(name: str):
    def deco(fn):
        EQUIVALENT_RULES[name] = fn
        return fn
    return deco


def _changed(old: Report, new: Report) -> Report | None:
    return None if new.text() == old.text() else new


@equivalent_rule("expand_abbreviations")
def expand_abbreviations(report: Report, rng: np.random.Generator | None = None) -> Report | None:
    def fn(s: str) -> str:
        for abbr in sorted(ABBREVIATIONS, key=len, reverse=True):
            s = _abbr_pattern(abbr).sub(lambda m, r=ABBREVIATIONS[abbr]: _sentence_case(m, r), s)
        return s
    return _changed(report, _map_sentences(report, fn))


@equivalent_rule("contract_abbreviations")
def contract_abbreviations(report: Report, rng: np.random.Generator | None = None) -> Report | None:
    def fn(s: str) -> str:
        for abbr, phrase in sorted(ABBREVIATIONS.items(), key=lambda kv: len(kv[1]), reverse=True):
            if abbr in ("w/", "w/o"):  # "with"/"without" -> "w/" reads as a typo, not a style
                continue
            s = _phrase_pattern(phrase).sub(abbr, s)
        return s
    return _changed(report, _map_sentences(report, fn))


@equivalent_rule("impression_only")
def impression_only(report: Report, rng: np.random.Generator | None = None) -> Report | None:
    if not report.impression.strip() or not report.findings.strip():
        return None
    return Report("", report.impression)


@equivalent_rule("findings_only")
def findings_only(report: Report, rng: np.random.Generator | None = None) -> Report | None:
    if not report.impression.strip() or not report.findings.strip():
        return None
    return Report(report.findings, "")


@equivalent_rule("reorder_sentences")
def reorder_sentences(report: Report, rng: np.random.Generator) -> Report | None:
    def shuffle(section: str) -> str:
        sents = split_sentences(section)
        if len(sents) < 2:
            return section
        order = rng.permutation(len(sents))
        if list(order) == list(range(len(sents))):
            order = np.roll(order, 1)
        return " ".join(sents[i] for i in order)
    return _changed(report, Report(shuffle(report.findings), shuffle(report.impression)))


_NEG_PRE = re.compile(r"^(?:There (?:is|are) )?[Nn]o (?!evidence|acute|definite|focal)([a-z][a-z ,]*?)\.$")
_NEG_POST = re.compile(r"^([A-Z][a-z ,]*?) (?:is|are) not (?:seen|identified|present)\.$")


@equivalent_rule("negation_paraphrase")
def negation_paraphrase(report: Report, rng: np.random.Generator | None = None) -> Report | None:
    def fn(s: str) -> str:
        if m := _NEG_PRE.match(s):
            thing = m.group(1)
            verb = "are" if thing.endswith("s") and not thing.endswith("thorax") else "is"
            return f"{thing[0].upper()}{thing[1:]} {verb} not seen."
        if m := _NEG_POST.match(s):
            return f"No {m.group(1)[0].lower()}{m.group(1)[1:]}."
        return s
    return _changed(report, _map_sentences(report, fn))


@equivalent_rule("synonyms")
def synonyms(report: Report, rng: np.random.Generator | None = None) -> Report | None:
    def fn(s: str) -> str:
        for a, b in SYNONYMS:
            if _phrase_pattern(a).search(s):
                return _phrase_pattern(a).sub(lambda m, r=b: _match_case(m.group(0), r), s)
            if _phrase_pattern(b).search(s):
                return _phrase_pattern(b).sub(lambda m, r=a: _match_case(m.group(0), r), s)
        return s
    return _changed(report, _map_sentences(report, fn))


#: named styles: the equivalent rules applied in order (a rule that does not apply is skipped)
STYLES: dict[str, tuple[str, ...]] = {
    "abbreviated": ("contract_abbreviations", "negation_paraphrase", "synonyms"),
    "expanded": ("expand_abbreviations", "negation_paraphrase", "synonyms"),
    "reordered": ("reorder_sentences", "negation_paraphrase"),
    "impression_only": ("impression_only", "contract_abbreviations"),
}


@dataclass(frozen=True)
class Variant:
    """One rewrite: its text, the style or error kind, and the rules that changed something."""

    text: str
    kind: str
    rules: tuple[str, ...]
    detail: str = ""


def rewrite(report: Report, style: str, seed: int = 0) -> Variant:
    """``report`` in ``style`` (see :data:`STYLES`); ``rules`` lists the rules that changed it (may be empty)."""
    if style not in STYLES:
        raise ValueError(f"unknown style {style!r}; choose one of {sorted(STYLES)}")
    rng = np.random.default_rng(seed)
    applied, cur = [], report
    for rule in STYLES[style]:
        new = EQUIVALENT_RULES[rule](cur, rng)
        if new is not None:
            cur, applied = new, [*applied, rule]
    return Variant(cur.text(), style, tuple(applied))


# ---- error rules -------------------------------------------------------------------------------

ErrorRule = Callable[[Report, np.random.Generator], "tuple[Report, str] | None"]
ERROR_RULES: dict[str, ErrorRule] = {}


def error_rule(name: str):
    def deco(fn):
        ERROR_RULES[name] = fn
        return fn
    return deco


def _edit_one_sentence(report: Report, rng: np.random.Generator,
                       edit: Callable[[str], str | None]) -> tuple[Report, str] | None:
    """Apply ``edit`` to one seeded-random sentence where it applies (the others stay as they are)."""
    sections = [split_sentences(report.findings), split_sentences(report.impression)]
    spots = [(si, i, new) for si, sents in enumerate(sections) for i, s in enumerate(sents)
             if (new := edit(s)) is not None and new != s]
    if not spots:
        return None
    si, i, new = spots[int(rng.integers(len(spots)))]
    old = sections[si][i]
    sections[si][i] = new
    return Report(" ".join(sections[0]), " ".join(sections[1])), f"{old!r} -> {new!r}"


def _sentence_findings(sentence: str) -> dict[str, float]:
    return text_findings(sentence)


@error_rule("negation_flip")
def negation_flip(report: Report, rng: np.random.Generator) -> tuple[Report, str] | None:
    def edit(s: str) -> str | None:
        f = _sentence_findings(s)
        if any(v == 0.0 for k, v in f.items() if k != "No Finding") and not any(
                v == 1.0 for k, v in f.items() if k != "No Finding"):
            if m := re.match(r"^(?:There (?:is|are) )?[Nn]o (?:evidence of )?(.+?)\.$", s):
                thing = m.group(1)
                return f"There is {thing}."
            if m := re.match(r"^(.+?) (is|are) not (?:seen|identified|present)\.$", s):
                return f"{m.group(1)} {m.group(2)} present."
            return None
        if any(v == 1.0 for k, v in f.items() if k not in ("No Finding", "Support Devices")):
            if m := re.match(r"^There (is|are) (?:an? )?(.+?)\.$", s):
                return f"There is no {m.group(2)}."
        return None
    return _edit_one_sentence(report, rng, edit)


_SIDE = re.compile(r"\b(left|right|Left|Right)\b")


@error_rule("laterality_swap")
def laterality_swap(report: Report, rng: np.random.Generator) -> tuple[Report, str] | None:
    swap = {"left": "right", "right": "left", "Left": "Right", "Right": "Left"}

    def edit(s: str) -> str | None:
        if not _SIDE.search(s) or not any(v == 1.0 for k, v in text_findings(s).items() if k != "No Finding"):
            return None
        return _SIDE.sub(lambda m: swap[m.group(1)], s)
    return _edit_one_sentence(report, rng, edit)


@error_rule("severity_change")
def severity_change(report: Report, rng: np.random.Generator) -> tuple[Report, str] | None:
    pat = re.compile(r"(?<![A-Za-z])(" + "|".join(SEVERITY_SWAPS) + r")(?![A-Za-z])", re.IGNORECASE)

    def edit(s: str) -> str | None:
        if not any(v == 1.0 for k, v in text_findings(s).items() if k != "No Finding"):
            return None
        return pat.sub(lambda m: _match_case(m.group(1), SEVERITY_SWAPS[m.group(1).lower()]), s, count=1) \
            if pat.search(s) else None
    return _edit_one_sentence(report, rng, edit)


@error_rule("finding_swap")
def finding_swap(report: Report, rng: np.random.Generator) -> tuple[Report, str] | None:
    def edit(s: str) -> str | None:
        if not any(v == 1.0 for k, v in text_findings(s).items() if k != "No Finding"):
            return None
        for phrase in sorted(FINDING_SWAPS, key=len, reverse=True):
            if _phrase_pattern(phrase).search(s):
                return _phrase_pattern(phrase).sub(lambda m, r=FINDING_SWAPS[phrase]: _match_case(m.group(0), r), s,
                                                   count=1)
        return None
    return _edit_one_sentence(report, rng, edit)


_MEASURE = re.compile(r"(?<![\d.])(\d+(?:\.\d+)?)\s?(cm|mm)\b")


def measurements(text: str) -> list[tuple[float, str]]:
    """Every ``<number> cm|mm`` in a text, in order."""
    return [(float(n), u) for n, u in _MEASURE.findall(text)]


@error_rule("measurement_change")
def measurement_change(report: Report, rng: np.random.Generator) -> tuple[Report, str] | None:
    factor = 2.0 if rng.random() < 0.5 else 3.0

    def edit(s: str) -> str | None:
        m = _MEASURE.search(s)
        if not m:
            return None
        value = float(m.group(1)) * factor
        num = f"{value:.1f}" if "." in m.group(1) else f"{value:.0f}"
        return s[:m.start(1)] + num + s[m.end(1):]
    return _edit_one_sentence(report, rng, edit)


_DEVICE = re.compile(r"\b(tube|catheter|line|picc|pacemaker|defibrillator|wires?|stent|port|clips?|cvc|ett|ngt)\b",
                     re.IGNORECASE)


def devices(text: str) -> set[str]:
    """Device words mentioned in a text (lower case)."""
    return {m.lower().rstrip("s") for m in _DEVICE.findall(text)}


@error_rule("device_added")
def device_added(report: Report, rng: np.random.Generator) -> tuple[Report, str] | None:
    if devices(report.text()):
        return None
    sentence = DEVICE_SENTENCES[int(rng.integers(len(DEVICE_SENTENCES)))]
    if report.findings.strip():
        return Report(f"{report.findings.strip()} {sentence}", report.impression), f"added {sentence!r}"
    return Report(report.findings, f"{report.impression.strip()} {sentence}".strip()), f"added {sentence!r}"


@error_rule("device_removed")
def device_removed(report: Report, rng: np.random.Generator) -> tuple[Report, str] | None:
    found = sorted(devices(report.text()))
    if not found:
        return None
    target = found[int(rng.integers(len(found)))]
    pat = re.compile(rf"\b{re.escape(target)}s?\b", re.IGNORECASE)
    sections = [split_sentences(report.findings), split_sentences(report.impression)]
    kept = [[s for s in sents if not pat.search(s)] for sents in sections]
    if not any(kept):
        return None  # the report would be empty
    removed = sum(len(a) - len(b) for a, b in zip(sections, kept))
    return Report(" ".join(kept[0]), " ".join(kept[1])), f"removed {removed} sentence(s) mentioning {target!r}"


def error_variants(report: Report, seed: int = 0, kinds: tuple[str, ...] | None = None) -> list[Variant]:
    """One variant per error kind that applies to ``report`` (each with exactly one injected error)."""
    kinds = tuple(ERROR_RULES) if kinds is None else kinds
    unknown = [k for k in kinds if k not in ERROR_RULES]
    if unknown:
        raise ValueError(f"unknown error kinds {unknown}; choose from {sorted(ERROR_RULES)}")
    out = []
    for i, kind in enumerate(kinds):
        res = ERROR_RULES[kind](report, np.random.default_rng([seed, i]))
        if res is not None and res[0].text() != report.text():
            out.append(Variant(res[0].text(), kind, (kind,), res[1]))
    return out


# ---- the checking labeler ----------------------------------------------------------------------

#: CheXpert finding -> mention pattern (lower-case text; abbreviations included)
MENTIONS: dict[str, str] = {
    "Enlarged Cardiomediastinum": r"widened mediastinum|mediastinal widening|enlarged cardiomediastinal",
    "Cardiomegaly": r"cardiomegaly|enlarged (?:heart|cardiac silhouette)|enlargement of the cardiac silhouette"
                    r"|heart (?:size )?is (?:\w+ly )?enlarged",
    "Lung Opacity": r"opacit(?:y|ies)|opacification|airspace disease|air space disease|infiltrates?",
    "Lung Lesion": r"nodules?|mass(?:es)?\b|lesions?",
    "Edema": r"edema|\bchf\b|congestive heart failure|vascular congestion|venous congestion",
    "Consolidation": r"consolidations?",
    "Pneumonia": r"pneumonia",
    "Atelectasis": r"atelecta\w*|volume loss",
    "Pneumothorax": r"pneumothora\w*|\bptx\b",
    "Pleural Effusion": r"effusions?|blunting of the costophrenic|costophrenic angle blunting",
    "Pleural Other": r"pleural thickening|pleural scarring",
    "Fracture": r"fractures?",
    "Support Devices": _DEVICE.pattern.lower(),
}
_PRE_NEG = re.compile(r"\b(?:no|without|negative for|free of|absence of|not)\b")
_POST_NEG = re.compile(r"\b(?:is|are) (?:not (?:seen|identified|present|visualized)|absent)|\bhas resolved")
_CLAUSE = re.compile(r";|\bbut\b|\bhowever\b|\balthough\b|\bwhich\b")
_SIDES = {"left": r"\bleft\b|\bl[ul]l\b|\blingula", "right": r"\bright\b|\br[uml]l\b",
          "bilateral": r"\bbilateral\w*|\bb/l\b|\bbibasilar|\bboth\b"}


def _clauses(text: str) -> list[str]:
    return [c for s in split_sentences(text.lower()) for c in _CLAUSE.split(s) if c.strip()]


def _mentions(clause: str):
    """(finding, start, negated) of each mention in one clause."""
    post = _POST_NEG.search(clause)
    for finding, pat in MENTIONS.items():
        for m in re.finditer(pat, clause):
            pre = _PRE_NEG.search(clause, 0, m.start())
            negated = pre is not None or (post is not None and post.start() > m.start())
            yield finding, m.start(), negated


def text_findings(text: str) -> dict[str, float]:
    """CheXpert's 14 values read off a report: 1 mentioned present, 0 only mentioned absent, NaN unmentioned;
    "No Finding" is 1 when no finding except support devices is present."""
    out = dict.fromkeys(FINDING_LABELS, math.nan)
    for clause in _clauses(text):
        for finding, _, negated in _mentions(clause):
            value = 0.0 if negated else 1.0
            out[finding] = value if math.isnan(out[finding]) else max(out[finding], value)
    positive = any(out[f] == 1.0 for f in FINDING_LABELS[1:-1])
    out["No Finding"] = 0.0 if positive else 1.0
    return out


def text_laterality(text: str) -> dict[str, frozenset[str]]:
    """Sides (left, right, bilateral) stated in the clauses where each present finding is mentioned."""
    out: dict[str, set[str]] = {}
    for clause in _clauses(text):
        sides = {side for side, pat in _SIDES.items() if re.search(pat, clause)}
        for finding, _, negated in _mentions(clause):
            if not negated:
                out.setdefault(finding, set()).update(sides)
    return {k: frozenset(v) for k, v in out.items()}


def same_labels(a: dict[str, float], b: dict[str, float]) -> bool:
    """Equal finding dicts with NaN == NaN."""
    return all((math.isnan(a[k]) and math.isnan(b[k])) or a[k] == b[k] for k in FINDING_LABELS)
