"""Messages that tell a user what to run name a command that exists, with the profile it needs."""

from __future__ import annotations

import re

import pytest
from conftest import REPO

from cxrlib.embstore import load_embeddings


def _make_targets() -> set[str]:
    return set(re.findall(r"^([A-Za-z][\w-]*):", (REPO / "Makefile").read_text(), flags=re.MULTILINE))


def test_missing_embeddings_name_make_embed_with_a_profile(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        load_embeddings(tmp_path / "image.npz")
    msg = str(err.value)
    assert str(tmp_path / "image.npz") in msg and "`make embed PROFILE=<profile>`" in msg
    assert "make demo" in msg
    assert {"embed", "demo"} <= _make_targets()  # the commands the message names exist


def test_missing_study_table_sends_offline_users_to_make_demo(workdir):
    from cxrlib.pairs import load_paired

    with pytest.raises(FileNotFoundError) as err:
        load_paired("openi_synth", "offline")
    msg = str(err.value)
    assert "openi_synth" in msg and "`make demo`" in msg
    assert "make paper)" not in msg and "(make paper" not in msg
