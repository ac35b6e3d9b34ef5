"""One source for every setting: the schema, its validator, the notebooks' defaults, the profiles, run names."""

from __future__ import annotations

import shutil
from collections import Counter

import pytest
import yaml

from cxrlib import config, dag, paths, settings
from cxrlib.train import TrainConfig

NOTEBOOK_NODES = [n for n, node in dag.NODES.items() if node.notebook is not None]


def _notebook(node: str):
    return paths.repo_root() / "notebooks" / f"{node}.ipynb"


@pytest.mark.parametrize("node", NOTEBOOK_NODES)
def test_notebook_defaults_equal_the_schema(node):
    declared = config.notebook_parameters(_notebook(node))
    for name, value in declared.items():
        s = settings.lookup(node, name)
        if s is not None:
            assert value == s.default and type(value) is type(s.default), \
                f"{node}: parameter {name} = {value!r}, but cxrlib.settings says {s.default!r}"


def test_a_parameter_outside_the_schema_belongs_to_one_notebook():
    counts = Counter(name for node in NOTEBOOK_NODES for name in config.notebook_parameters(_notebook(node))
                     if all(settings.lookup(n, name) is None for n in NOTEBOOK_NODES))
    shared = sorted(name for name, c in counts.items() if c > 1)
    assert not shared, f"parameters declared by several notebooks but not in cxrlib.settings: {shared}"


def test_every_schema_setting_of_a_notebook_node_is_a_parameter_there():
    for s in settings.schema():
        for node in s.nodes:
            if node in NOTEBOOK_NODES:
                assert s.name in config.notebook_parameters(_notebook(node)), f"{node} lacks parameter {s.name}"


def test_train_config_defaults_are_the_recipe():
    fields = TrainConfig().to_dict()  # the flat recipe: w_<term> for the weights mapping
    recipe = settings.defaults("recipe")
    assert set(fields) - {"seed", "device"} == set(recipe) == TrainConfig.keys() - {"seed", "device"}
    assert {k: fields[k] for k in recipe} == recipe


def test_loss_weights_come_from_losses_terms():
    from cxrlib import losses

    assert settings.loss_terms() == losses.TERMS
    assert [k for k in settings.defaults("recipe") if k.startswith("w_")] == [f"w_{t}" for t in losses.TERMS]
    assert {f"W_{t.upper()}" for t in losses.TERMS} <= set(settings.make_vars())


def test_module_names_are_read_from_source():
    from cxrlib import adapt, losses, projector

    assert settings.module_names("projector", "KINDS") == projector.KINDS
    assert settings.module_names("projector", "ACTIVATIONS") == tuple(projector.ACTIVATIONS)
    assert settings.module_names("losses", "BCE_ON") == losses.BCE_ON
    assert settings.module_names("adapt", "PRECISIONS") == adapt.PRECISIONS
    from cxrlib.datasets.registry import registered_datasets
    from cxrlib.evalsets import EVAL_SETS

    # training data sets = the registry less the peers' evaluation-only sets (EVAL_SET, not DATASET)
    assert set(settings.datasets()) == set(registered_datasets()) - set(EVAL_SETS)
    assert set(EVAL_SETS) <= set(registered_datasets())


@pytest.mark.parametrize("profile", ["paper", "offline", "smoke"])
def test_profiles_never_restate_a_default(profile):
    assert config.restated_defaults(profile) == []


@pytest.mark.parametrize("profile", ["paper", "offline", "smoke"])
def test_profile_comments_hold_no_measured_numbers(profile):
    import re

    text = (paths.configs_dir() / f"{profile}.yaml").read_text()
    comments = " ".join(line.split("#", 1)[1] for line in text.splitlines() if "#" in line)
    assert not re.search(r"\d+(\.\d+)?\s*(s|%|CPU-s)\b|P@\d+ \d|R@\d+ \d", comments), comments


@pytest.mark.parametrize("var, value, match", [
    ("W_SUPCON", ".nan", "W_SUPCON=.nan: w_supcon must be a number >= 0"),
    ("W_SUPCON", "nan", "w_supcon must be a number >= 0"),
    ("W_CLIP", "-1", "W_CLIP=-1: w_clip must be a number >= 0, got -1"),
    ("EPOCHS", "abc", "EPOCHS=abc: epochs must be an integer >= 1"),
    ("EPOCHS", "2.5", "epochs must be an integer"),
    ("LR", "0", "LR=0: lr must be a number > 0"),
    ("BATCH_SIZE", "1", "BATCH_SIZE=1: batch_size must be an integer >= 2"),
    ("DEVICE", "tpu", "DEVICE=tpu: device must be auto, cpu, cuda"),
    ("N_BOOT", "0", "N_BOOT=0: n_boot must be an integer >= 10"),
    ("SEED", "-1", "seed must be an integer >= 0"),
    ("DATASET", "imagenet", "dataset must be one of openi"),
    ("BACKBONE", "resnet", "backbone must be a backbone name"),
    ("W_SUPCN", "1", "unknown make variable W_SUPCN"),
])
def test_bad_make_variable_is_one_clear_line(var, value, match):
    with pytest.raises(settings.SettingError, match=match) as exc:
        settings.check_make_var(var, value)
    assert "\n" not in str(exc.value)


def test_all_zero_weights_rejected_for_training_and_adaptation():
    zero = {f"w_{t}": 0 for t in settings.loss_terms()}
    with pytest.raises(settings.SettingError, match="all loss weights are 0"):
        settings.validate("02_train", zero)
    with pytest.raises(ValueError, match="all loss weights are 0"):
        TrainConfig.from_dict(zero).validate()
    with pytest.raises(settings.SettingError, match="all adaptation loss weights are 0"):
        settings.validate("00_adapt_backbone", {f"adapt_w_{t}": 0.0 for t in settings.loss_terms()})


def test_good_make_variables_are_coerced():
    assert settings.check_make_var("W_SUPCON", "1")[0] == 1.0 and isinstance(settings.check_make_var("W_SUPCON", "1")[0], float)
    assert settings.check_make_var("EPOCHS", "3")[0] == 3
    assert settings.check_make_var("DEVICE", "cuda:1")[0] == "cuda:1"


def test_batch_size_sets_the_projector_only():
    """BATCH_SIZE is the projector's batch size: it must not reach the extractor's parameters (issue 11, case 3)."""
    p = dag.plan("smoke", ["BATCH_SIZE=128"], environ={})
    assert p.params["02_train"]["batch_size"] == 128
    assert p.params["embed"]["batch_size"] == dag.plan("smoke", [], environ={}).params["embed"]["batch_size"]
    assert "batch_size" not in p.params["05_loss_ablation"]


# ---- run identity ---------------------------------------------------------------------------------

@pytest.fixture
def profiles_dir(tmp_path, monkeypatch):
    """A configs folder holding copies of the real profiles, for variants written by a test."""
    d = tmp_path / "configs"
    shutil.copytree(paths.configs_dir(), d)
    monkeypatch.setattr(paths, "configs_dir", lambda: d)
    return d


def _variant(profiles_dir, name: str, base: str = "smoke", **train):
    cfg = yaml.safe_load((profiles_dir / f"{base}.yaml").read_text())
    cfg["nodes"]["02_train"] = {**(cfg["nodes"].get("02_train") or {}), **train}
    (profiles_dir / f"{name}.yaml").write_text(yaml.safe_dump(cfg))


def _as_notebook_02(params: dict) -> str:
    """The run name notebook 02 computes from its own parameters (its cell defaults + the params file)."""
    ns = {**config.notebook_parameters(_notebook("02_train")), **params}
    return dag.run_id({**settings.recipe_from(ns), "seed": ns["seed"], "dataset": ns["dataset"],
                       "backbone": ns["backbone"]})


def test_weights_in_the_train_section_name_one_run_everywhere(profiles_dir):
    """Case 1: weights set in nodes.02_train are the run 02 trains and 03/04/05 evaluate."""
    _variant(profiles_dir, "w", w_supcon=0.5)
    p = dag.plan("w", environ={})
    trained = _as_notebook_02(p.params["02_train"])
    assert "supcon0.5" in trained
    for node in ("03_retrieval_eval", "04_embedding_viz", "05_loss_ablation"):
        assert p.params[node]["run"] == trained, node
    assert dag.main_run("w", p.dataset, p.train_key) == trained


def test_make_variable_and_profile_give_the_same_run(profiles_dir):
    _variant(profiles_dir, "w", w_supcon=0.5)
    assert dag.plan("w", environ={}).run == dag.plan("smoke", ["W_SUPCON=0.5"], environ={}).run
    assert dag.plan("smoke", ["W_SUPCON=0.5"], environ={}).run != dag.plan("smoke", environ={}).run


def test_every_recipe_setting_changes_the_run(profiles_dir):
    base = dag.plan("smoke", environ={}).run
    _variant(profiles_dir, "d", dropout=0.3)
    _variant(profiles_dir, "t", clip_temperature=0.05)
    assert len({base, dag.plan("d", environ={}).run, dag.plan("t", environ={}).run}) == 3


def test_restating_a_default_keeps_the_run():
    assert dag.run_id({"w_bce": 1, "dataset": "x", "backbone": "b"}) == dag.run_id({"dataset": "x", "backbone": "b"})


def test_unknown_profile_key_is_an_error(profiles_dir):
    cfg = yaml.safe_load((profiles_dir / "smoke.yaml").read_text())
    cfg["nodes"]["05_loss_ablation"]["epochs"] = 3  # 05 trains the main run's recipe: not its parameter
    (profiles_dir / "e.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(config.ConfigError, match=r"nodes.05_loss_ablation: \['epochs'\] not parameters"):
        dag.plan("e", environ={})


def test_results_of_another_dataset_sit_beside(workdir):
    assert dag.out_key("paper", "openi") == "paper" and dag.out_key("paper") == "paper"
    assert dag.out_key("paper", "mimic") == "paper-mimic"
    assert dag.results_dir("paper", "mimic") == workdir / "results" / "paper-mimic"
    assert dag.plan("paper", ["DATASET=mimic"], environ={}).vars()["B"] == str(workdir / "build" / "paper-mimic")
