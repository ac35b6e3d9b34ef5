"""MIMIC-5x200 builder on a fake MIMIC-CXR-JPG tree and a fake BenchX id list (no network, no MIMIC text)."""

from __future__ import annotations

import pandas as pd
import pytest

from cxrlib.datasets import download, mimic5x200
from cxrlib.datasets.fixtures import make_fake_mimic


def _dicom(p: int, s: int, view: str = "pa") -> tuple[str, str, str]:
    subject, study = 10000000 + 37 * p, 50000000 + 1000 * p + s
    return f"{subject:08d}-{study:08d}-{view}", str(subject), str(study)


@pytest.fixture(scope="module")
def fake_root(tmp_path_factory):
    return make_fake_mimic(tmp_path_factory.mktemp("mimic5x200") / "mimic-cxr-jpg")


def _id_list(path, rows):
    pd.DataFrame([{"Path": "path/of/images", "dicom_id": d, "subject_id": su, "study_id": st,
                   "Report": "Associated Report Goes Here."} for d, su, st in rows]).to_csv(path, index=False)
    return path


# fixture cases cycle over studies: study index p*2+s; case 1 = Cardiomegaly only (Edema uncertain), case 2 =
# effusion + atelectasis (two of the five classes: not one-hot)
CARDIO = [_dicom(p, 1) for p in (0, 2, 4, 6, 8, 10)]
TWO_CLASSES = [_dicom(1, 0)]
ABSENT = [("deadbeef-0000-0000-0000-000000000000", "19999999", "59999999")]


def test_builds_the_listed_one_hot_images(fake_root, tmp_path):
    ids = _id_list(tmp_path / "ids.csv", CARDIO + TWO_CLASSES)
    table, skips = mimic5x200.build_mimic_5x200(fake_root, id_list=ids)
    assert sorted(table["image_id"]) == sorted(d for d, _, _ in CARDIO)
    assert (table["onehot_label"] == "Cardiomegaly").all() and (table["split"] == "test").all()
    assert table["report"].str.startswith("Moderate cardiomegaly").all()  # text from the user's own copy
    counts = skips["reason"].value_counts().to_dict()
    assert counts == {"not_one_hot": 1}
    assert table.attrs["listed"] == 7 and table.attrs["found"] == 7 and table.attrs["coverage"] == 1.0
    assert sum(table.attrs["official_split"].values()) == len(table)


def test_absent_ids_are_counted_and_low_coverage_refused(fake_root, tmp_path):
    ids = _id_list(tmp_path / "ids.csv", CARDIO + ABSENT)
    with pytest.raises(ValueError, match=r"1 of 7 listed images are absent .*85\.7% < the 95%"):
        mimic5x200.build_mimic_5x200(fake_root, id_list=ids)
    table, skips = mimic5x200.build_mimic_5x200(fake_root, id_list=ids, min_coverage=0.8)
    assert len(table) == 6
    assert skips.loc[skips["reason"] == "absent_from_copy", "item"].tolist() == [ABSENT[0][0]]


def test_id_list_schema_errors(tmp_path):
    bad = tmp_path / "bad.csv"
    pd.DataFrame({"dicom_id": ["a"], "study_id": ["1"]}).to_csv(bad, index=False)
    with pytest.raises(ValueError, match="lacks columns \\['subject_id'\\]"):
        mimic5x200.read_id_list(bad)
    dup = _id_list(tmp_path / "dup.csv", CARDIO[:1] * 2)
    with pytest.raises(ValueError, match="duplicate dicom_id"):
        mimic5x200.read_id_list(dup)
    ids = mimic5x200.read_id_list(_id_list(tmp_path / "ok.csv", CARDIO))
    assert list(ids.columns) == list(mimic5x200.ID_COLUMNS)  # the placeholder report column is dropped


def test_offline_names_the_file_to_place(tmp_path, monkeypatch):
    monkeypatch.setattr(download, "network_available", lambda url, timeout=3.0: False)
    dest = tmp_path / "benchx" / mimic5x200.ID_LIST_NAME
    with pytest.raises(mimic5x200.IdListUnavailable, match=f"datasets/MIMIC_5x200/mimic_5x200_ids.csv.*{dest}"):
        mimic5x200.fetch_id_list(dest)


def test_download_is_cached_and_checksummed(tmp_path, monkeypatch):
    src = _id_list(tmp_path / "upstream.csv", CARDIO)
    monkeypatch.setattr(download, "network_available", lambda url, timeout=3.0: True)
    dest = tmp_path / "cache" / mimic5x200.ID_LIST_NAME
    got = mimic5x200.fetch_id_list(dest, url=src.as_uri())
    assert got == dest and dest.read_bytes() == src.read_bytes()
    assert (dest.parent / (dest.name + ".sha256")).read_text().split()[0] == download.sha256_file(dest)
    src.unlink()  # the cached copy is reused without the network
    assert mimic5x200.fetch_id_list(dest, url=src.as_uri()) == dest
    dest.write_text(dest.read_text() + "x,1,2\n")
    with pytest.raises(ValueError, match="changed since it was downloaded"):
        mimic5x200.fetch_id_list(dest, url=src.as_uri())


def test_env_var_points_at_a_copy_placed_by_hand(tmp_path, monkeypatch):
    monkeypatch.setenv(mimic5x200.ENV_VAR, str(tmp_path / "mine.csv"))
    assert mimic5x200.id_list_path() == tmp_path / "mine.csv"
