"""CXR-CLIP's Open-I evaluation set on a fake Open-I tree: all frontal images, longest section, every row test."""

from __future__ import annotations

from cxrlib.datasets import build_study_table
from cxrlib.datasets.fixtures import fake_openi_studies, make_fake_openi_nlm


def test_all_frontal_images_with_the_longest_section(tmp_path):
    specs = fake_openi_studies(6)
    specs[0]["images"].append((specs[0]["images"][0][0].replace("-1001", "-1002"), "Frontal"))  # 2 frontal images
    specs[1]["findings"], specs[1]["impression"] = "Zzz short.", "A much longer impression than the findings."
    root = make_fake_openi_nlm(tmp_path / "nlm", studies=specs)
    table, skips = build_study_table("openi_cxrclip", root=root)
    assert (table["view"] == "frontal").all() and (table["split"] == "test").all()
    assert (table["study_id"] == "CXR1").sum() == 2  # every frontal image, not one per study
    # the longer section, where Python's max() of the two strings would pick "Zzz short."
    assert table.loc[table["study_id"] == "CXR2", "report"].item() == "A much longer impression than the findings."
    assert (table["text_sections"].isin(["findings", "impression"])).all()
    assert max(specs[1]["findings"], specs[1]["impression"]) == "Zzz short."
    own, _ = build_study_table("openi", root=root)  # the package's own table: one image per study, split by patient
    assert len(own) == 6 and len(table) == 7
