"""The retrieval explorer of notebook 07: two models of a profile's comparison, side by side, on one query.

A query is a gallery study (by id, by finding, or drawn at random with the notebook's seed), an uploaded
image, or a typed report. Each model's top-``k`` results show a thumbnail, the study id, the score, the
labels, the report, ``✓`` for the query's own study and ``= #r`` for a report text identical to the one at
rank ``r``. Everything comes from :mod:`cxrlib.search` over make's results; no metric is computed here.
"""

from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from cxrlib.search import Retriever, SearchError, model_specs

THUMB_PX = 96
TABLE_CLASS = "cxr-results"  # the HTML class of a result table (the browser test looks for it)


def default_models(profile: str, paired: list | None = None) -> list[str]:
    """The first pair of notebook 03's paired tests, else its first two models."""
    names = list(model_specs(profile))
    if paired:
        return list(paired[0])
    return names[:2]


def thumbnail(path: str, px: int = THUMB_PX) -> str:
    """An ``<img>`` tag of a small PNG of ``path`` (a grey box when the file cannot be read)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im = im.convert("L")
            im.thumbnail((px, px))
            buf = io.BytesIO()
            im.save(buf, format="PNG")
    except OSError:
        return f'<div style="width:{px}px;height:{px}px;background:#ccc" title="unreadable {html.escape(path)}"></div>'
    data = base64.b64encode(buf.getvalue()).decode()
    return f'<img src="data:image/png;base64,{data}" width="{px}" alt="{html.escape(path)}"/>'


def results_html(df: pd.DataFrame, title: str, show_images: bool = True, chars: int = 160) -> str:
    """One model's ranked list as an HTML table."""
    rows = []
    for _, r in df.iterrows():
        dup = "" if pd.isna(r["same_text_as_rank"]) else f" <b>= #{int(r['same_text_as_rank'])}</b>"
        pair = " ✓" if r["is_query_study"] else ""
        text = r["report"] if len(r["report"]) <= chars else r["report"][: chars - 1] + "…"
        label = "abnormal" if r["label_abnormal"] else "normal"
        rows.append(
            f"<tr><td>{r['rank']}{pair}</td>"
            + (f"<td>{thumbnail(r['image_path'])}</td>" if show_images else "")
            + f"<td><code>{html.escape(r['study_id'])}</code><br>{r['score']:.3f}</td>"
            f"<td>{label}<br><small>{html.escape(r['findings'])}</small></td>"
            f"<td style='text-align:left'>{html.escape(text)}{dup}</td></tr>")
    head = "<th>rank</th>" + ("<th>image</th>" if show_images else "") + "<th>study · score</th><th>labels</th><th>report</th>"
    return (f"<h4>{html.escape(title)}</h4><table class='{TABLE_CLASS}'><thead><tr>{head}</tr></thead>"
            f"<tbody>{''.join(rows)}</tbody></table>")


@dataclass
class Explorer:
    """Two :class:`~cxrlib.search.Retriever` s over the same gallery, and the widgets that query them."""

    profile: str
    models: list[str]
    k: int = 5
    split: str | None = None
    seed: int = 0
    retrievers: dict[str, Retriever] = field(default_factory=dict)

    def __post_init__(self):
        if len(self.models) != 2:
            raise SearchError(f"the explorer compares two models, got {self.models}; "
                              f"choose from {list(model_specs(self.profile))}")
        self.retrievers = {m: Retriever.from_run(self.profile, m, split=self.split) for m in self.models}
        self.rng = np.random.default_rng(self.seed)

    @property
    def table(self) -> pd.DataFrame:
        return next(iter(self.retrievers.values())).gallery.table

    def findings(self) -> list[str]:
        from cxrlib.search import _finding_columns

        t = self.table
        return [c for c in _finding_columns() if c in t and (t[c] == 1).any()]

    def pick(self, by: str, value: Any = None) -> str:
        """A gallery study id: ``by="id"`` (``value``), ``"finding"`` (a random study with it), ``"random"``."""
        t = self.table
        if by == "id":
            ids = set(t["study_id"].astype(str))
            if str(value) not in ids:
                raise SearchError(f"study {value!r} is not in the gallery (e.g. {sorted(ids)[:3]})")
            return str(value)
        if by == "finding":
            if value not in t.columns:
                raise SearchError(f"unknown finding {value!r}; choose one of {self.findings()}")
            pool = t.loc[t[value] == 1, "study_id"].astype(str).tolist()
            if not pool:
                raise SearchError(f"no gallery study has {value!r}")
            return str(self.rng.choice(pool))
        if by == "random":
            return str(self.rng.choice(t["study_id"].astype(str).to_numpy()))
        raise SearchError(f"pick by 'id', 'finding' or 'random', not {by!r}")

    def query(self, study: str | None = None, image: Any = None, report: str | None = None,
              direction: str = "image") -> tuple[str, dict[str, pd.DataFrame]]:
        """Run one query on both models -> (query HTML, {model: results})."""
        if study is not None:
            row = self.table.set_index(self.table["study_id"].astype(str)).loc[str(study)]
            out = {m: r.by_study(str(study), self.k, modality=direction) for m, r in self.retrievers.items()}
            label = "abnormal" if row["label_abnormal"] else "normal"
            shown = (thumbnail(row["image_path"], 160) if direction == "image" else "")
            head = (f"<b>study {html.escape(str(study))}</b> ({label}) — its "
                    f"{'image searches reports' if direction == 'image' else 'report searches images'}"
                    f"<div style='display:flex;gap:1em'>{shown}<p>{html.escape(str(row['report']))}</p></div>")
        elif image is not None:
            out = {m: r.by_image(image, self.k) for m, r in self.retrievers.items()}
            head = "<b>uploaded image</b> — searches reports"
        elif report is not None:
            out = {m: r.by_text(report, self.k) for m, r in self.retrievers.items()}
            head = f"<b>typed report</b> — searches images<p>{html.escape(report)}</p>"
        else:
            raise SearchError("give a study, an image or a report")
        return head, out

    def render(self, head: str, out: dict[str, pd.DataFrame]) -> str:
        cols = "".join(f"<div style='flex:1;min-width:0'>{results_html(df, m)}</div>" for m, df in out.items())
        return f"<div>{head}</div><div style='display:flex;gap:1.5em'>{cols}</div>"

    # ---- widgets -----------------------------------------------------------------------------
    def widget(self, first_study: str | None = None):
        """The interactive explorer; shows ``first_study`` (or a random one) at once."""
        import ipywidgets as w

        ids = sorted(self.table["study_id"].astype(str))
        study = w.Combobox(options=ids[:5000], placeholder="study id", description="study", ensure_option=False)
        finding = w.Dropdown(options=self.findings(), description="finding")
        direction = w.ToggleButtons(options=[("image → reports", "image"), ("report → images", "text")],
                                    value="image", description="search")
        b_id, b_find, b_rand = w.Button(description="show study"), w.Button(description="random with finding"), \
            w.Button(description="random study")
        upload = w.FileUpload(accept="image/*", multiple=False, description="upload image")
        text = w.Textarea(placeholder="type a report, e.g. small left pleural effusion", layout=w.Layout(width="60%"))
        b_text = w.Button(description="search report")
        status = w.HTML()
        result = w.HTML()

        def show(**query):
            try:
                q = self.query(direction=direction.value, **query) if "study" in query else self.query(**query)
                result.value = self.render(*q)
                status.value = ""
            except SearchError as exc:
                status.value = f"<span style='color:#b00'>{html.escape(str(exc))}</span>"

        b_id.on_click(lambda _: show(study=self.pick("id", study.value.strip())) if study.value.strip() else None)
        b_find.on_click(lambda _: show(study=self.pick("finding", finding.value)))
        b_rand.on_click(lambda _: show(study=self.pick("random")))
        b_text.on_click(lambda _: show(report=text.value))

        def on_upload(change):
            files = change["new"]
            if files:
                from PIL import Image

                item = files[0] if isinstance(files, (list, tuple)) else next(iter(files.values()))
                try:
                    img = Image.open(io.BytesIO(bytes(item["content"])))
                    img.load()
                except OSError as exc:
                    status.value = f"<span style='color:#b00'>cannot read the uploaded image: {html.escape(str(exc))}</span>"
                    return
                show(image=img)

        upload.observe(on_upload, names="value")
        first = first_study or self.pick("random")
        study.value = first
        show(study=first)
        controls = w.VBox([direction, w.HBox([study, b_id, b_rand]), w.HBox([finding, b_find]),
                           w.HBox([text, b_text]), upload, status])
        return w.VBox([controls, result])
