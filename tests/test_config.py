"""The run options' one declaration (engine.config.OPTIONS): a RunConfig is checked when it is made,
and the CLI, the Launch form and README list the same options."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from engine.cli import build_parser
from engine.config import (OPTION, OPTIONS, README_END, README_START, SWEEPABLE, ConfigError, RunConfig,
                           markdown_table, update_readme)

ROOT = Path(__file__).resolve().parent.parent
NAMES = {o.name for o in OPTIONS}


def _training_flags(command: str) -> set[str]:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    return {flag for action in sub._actions for flag in action.option_strings if flag.startswith("--")}


def test_every_field_of_runconfig_is_a_declared_option_with_a_label_and_help():
    assert [o.name for o in OPTIONS] == list(RunConfig.__dataclass_fields__)
    for opt in OPTIONS:
        assert opt.label and opt.help and opt.group, opt.name
        assert getattr(RunConfig(), opt.name) == opt.default
    assert set(SWEEPABLE) == {"elr", "lr", "wd", "momentum", "seed", "width", "batch_size"}


@pytest.mark.parametrize("changes, field, words", [
    (dict(depth=0), "depth", "--depth must be a whole number from 1 to 1,000, got 0"),
    (dict(depth=2.5), "depth", "--depth must be a whole number"),
    (dict(momentum=1.0), "momentum", "--momentum must be in [0, 1)"),
    (dict(elr=float("nan")), "elr", "--elr must be a positive finite number"),
    (dict(model="vgg"), "model", "unknown --model 'vgg'"),
    (dict(norm="group"), "norm", "unknown --norm 'group'"),
    (dict(seed=-1), "seed", "--seed must be a whole number from 0 to 2**63-1"),
    (dict(data_seed=2**63), "data_seed", "--data-seed must be a whole number from 0 to 2**63-1"),
    (dict(synthetic_shape=(3, 0)), "synthetic_shape", "--synthetic-shape must be 1 to 4 positive sizes"),
    (dict(tags=("ok", " ")), "tags", "--tags got an empty tag"),
    (dict(epochs=None), "epochs", "--epochs needs a value"),
    (dict(validation="yes"), "validation", "--validation must be on or off"),
    (dict(lr=0.1), "lr", "--lr is for --mode lrwd"),
    (dict(model="convnet_si"), "model", "needs 3x32x32 images"),
    (dict(batch_size=5000), "batch_size", "larger than the 1437 training samples"),
])
def test_an_invalid_config_cannot_be_made_and_the_error_names_its_field(changes, field, words):
    with pytest.raises(ConfigError) as made:
        RunConfig(**changes)
    assert made.value.field == field and words in str(made.value) and "\n" not in str(made.value)
    with pytest.raises(ConfigError) as replaced:     # replace() checks too
        RunConfig().replace(**changes)
    assert str(replaced.value) == str(made.value)
    with pytest.raises(ConfigError):                 # and so does reading a stored config
        RunConfig.from_dict({**RunConfig().to_dict(), **changes})


def test_the_cli_the_launch_form_and_readme_list_the_same_options(tmp_path):
    flags = {o.flag for o in OPTIONS}
    for command in ("train", "sweep", "submit"):
        assert _training_flags(command) - {"--help", "--db", "--artifacts", "--sweep-name"} == flags, command
    # the study sets its rates, epochs, kept checkpoints and validation split itself
    assert _training_flags("study") >= {o.flag for o in OPTIONS if o.study != "set"}
    from dashboard.launch import FIELDS, LaunchForm
    assert set(LaunchForm().values) == NAMES and {f for f in FIELDS if f != "--sweep-name"} == flags
    readme = (ROOT / "README.md").read_text()
    rows = re.findall(r"^\| `(--[a-z-]+)`", readme.split("<!-- run options")[1].split("<!-- end of run options")[0],
                      flags=re.M)
    assert rows == [o.flag for o in OPTIONS]


def test_readme_holds_exactly_the_generated_option_table(tmp_path):
    readme = (ROOT / "README.md").read_text()
    table = readme.split(README_START)[1]
    assert table.split(README_END)[0] == markdown_table(), "run `python -m engine.config --update-readme README.md`"
    printed = subprocess.run([sys.executable, "-m", "engine.config", "--markdown"], capture_output=True, text=True,
                             cwd=ROOT, check=True, timeout=60).stdout
    assert printed == markdown_table()
    copy = tmp_path / "README.md"
    copy.write_text(readme.replace(markdown_table(), "| stale |\n"))
    update_readme(copy)
    assert copy.read_text() == readme


def test_the_launch_page_shows_a_field_for_every_option(empty_db, monkeypatch):
    """Each option appears on the form where it applies: mlp_si with digits on the sphere, then lrwd,
    synthetic data and CIFAR bring the others."""
    from tests.test_dashboard import open_app
    at = open_app(empty_db, monkeypatch, "launch")
    shown = set()

    def collect():
        assert not at.exception
        shown.update(w.key[2:] for kind in ("number_input", "selectbox", "radio", "checkbox", "text_input")
                     for w in getattr(at, kind) if w.key and w.key.startswith("f_"))

    collect()
    assert {"depth", "norm", "elr", "data_seed", "keep_last", "validation"} <= shown and "lr" not in shown
    at.radio(key="f_mode").set_value("lrwd").run()
    collect()
    at.selectbox(key="f_dataset").set_value("synthetic").run()
    collect()
    at.selectbox(key="f_dataset").set_value("cifar10").run()
    collect()
    assert NAMES <= shown, NAMES - shown


def test_a_form_error_names_the_field_in_the_forms_words():
    from dashboard import launch
    with pytest.raises(ConfigError) as caught:
        launch.configs_of(launch.LaunchForm(keep_last=-1))
    assert caught.value.field == "keep_last" and str(caught.value).startswith("“Keep the last” must be at least 0")
    [config], _ = launch.configs_of(launch.LaunchForm(norm="layer", data_seed=3, keep_last=4, validation=True))
    assert (config.norm, config.data_seed, config.keep_last, config.validation) == ("layer", 3, 4, True)
    # an option that does not apply takes its default: the hidden LR on the sphere plays no part
    [config], _ = launch.configs_of(launch.LaunchForm(lr=-1.0, wd=0.5, depth=7, model="convnet_si",
                                                      dataset="synthetic", synthetic_shape="3x32x32"))
    assert (config.lr, config.wd, config.depth) == (None, 0.0, OPTION["depth"].default)


def test_config_and_the_dashboards_launch_code_do_not_import_torch():
    code = "import sys, engine.config, dashboard.launch, dashboard.data; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)
