"""README's "Choices the paper leaves open" table: generated from the settings, never restating a default."""

from __future__ import annotations

import re

import pytest
from conftest import REPO

from cxrlib import config, readme, settings


def _block() -> str:
    text = (REPO / "README.md").read_text()
    m = re.search(r"<!-- choices:start -->\n(.*?)<!-- choices:end -->", text, re.S)
    assert m, "README has no choices block"
    return m.group(1)


def _rows(block: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split(" | ")] for line in block.splitlines()[2:]]


def test_readme_choices_block_is_the_rendered_one():
    assert _block() == readme.choices_block(), ("README's choices table is stale: run `.venv/bin/python -m "
                                                 "cxrlib.readme --help-only` (or make readme)")


def test_every_rendered_default_is_the_settings_or_notebook_default():
    """Independent of the renderer: read each `name` = `value` back from README and look it up."""
    seen = 0
    for detail, _, where in _rows(_block()):
        m = re.match(r"`(\d\d_[a-z_]+)`: (.*)", where)
        if not m:
            continue
        node, pairs = m.groups()
        local = config.notebook_parameters(REPO / "notebooks" / f"{node}.ipynb")
        for name, value in re.findall(r"`([a-z_0-9]+)` = `([^`]*)`", pairs):
            s = settings.lookup(node, name)
            expected = s.default if s is not None else local[name]
            assert value == str(expected), f"{detail}: {name} shows {value}, the default is {expected!r}"
            seen += 1
    recipe = settings.defaults("recipe")
    assert seen > 30 and {"lr", "epochs", "batch_size", "dropout", "w_supcon"} <= set(recipe)
    assert f"`lr` = `{recipe['lr']}`" in _block() and f"`epochs` = `{recipe['epochs']}`" in _block()


def test_the_words_restate_no_default():
    for (detail, words, _), (_, _, node, names) in zip(_rows(_block()), readme.CHOICES):
        for name in names:
            value = str(readme.parameter_default(node, name))
            if re.fullmatch(r"[-+.\de]+", value) and len(value) > 1:  # a number of two or more characters
                assert not re.search(rf"(?<![\w.]){re.escape(value)}(?![\w.])", words), \
                    f"README choices row {detail!r} restates {name} = {value} by hand"


def test_a_changed_default_changes_the_block(monkeypatch):
    lr = settings.lookup("02_train", "lr")
    real = settings.lookup

    def patched(node, name):
        s = real(node, name)
        return settings.Setting(s.name, 0.5, s.check, s.help, s.nodes, s.group, s.make_var) if s is lr else s

    monkeypatch.setattr(settings, "lookup", patched)
    assert "`lr` = `0.5`" in readme.choices_block() and readme.choices_block() != _block()


def test_an_unknown_parameter_is_an_error_naming_it(monkeypatch):
    monkeypatch.setattr(readme, "CHOICES", (("x", "words", settings.TRAIN, ("no_such_param",)),))
    with pytest.raises(ValueError, match="'no_such_param' is neither a setting nor a parameter of 02_train"):
        readme.choices_block()
