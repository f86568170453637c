"""The metric registry is the one source of metric names: README, exports and the engine agree with it."""
import re
import subprocess
import sys
from pathlib import Path

from engine import registry

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_metric_table_is_the_registry():
    text = README.read_text()
    assert registry.markdown_table() in text
    documented = re.findall(r"^\| `([^`]+)` \|", text[text.index("| key | chart label (unit) | definition |"):], flags=re.M)
    assert documented[:len(registry.METRICS)] == [m.key for m in registry.METRICS]


def test_family_keys_resolve_and_order():
    assert registry.spec("layer_norm/layer1.0.conv1").key == "layer_norm/<layer>"
    assert registry.spec("feature_acc/3").datasets == ("ticks",)
    assert registry.spec("nonsense") is None and not registry.is_log("nonsense")
    keys = ["elr", "layer_norm/fc10", "zzz", "train_loss", "layer_norm/fc2", "si_norm", "feature_acc/10",
            "feature_acc/2"]
    assert registry.order(keys) == ["train_loss", "si_norm", "layer_norm/fc2", "layer_norm/fc10", "elr",
                                    "feature_acc/2", "feature_acc/10", "zzz"]
    assert registry.label("layer_norm/fc0") == "layer norm fc0"


def test_default_panels_are_known_keys_that_move_in_their_mode():
    for mode in registry.MODES:
        for key in registry.default_panels(mode):
            assert mode in registry.spec(key).modes, (mode, key)


def test_charts_read_labels_with_units_and_the_key_in_the_hover():
    assert registry.axis_title("train_loss") == "train loss (nats)"
    assert registry.axis_title("test_acc") == "test accuracy (%)" and registry.is_percent("test_acc")
    assert registry.axis_title("elr") == "effective LR" and registry.unit("elr") == ""
    assert registry.axis_title("angular_update") == "angular update (rad)"
    assert registry.axis_title("wall_time") == "wall time (s)" and registry.axis_title("step") == "step"
    assert registry.axis_title("layer_norm/fc0") == "layer norm fc0"
    assert registry.axis_title("feature_acc/<k>") == "feature accuracy (%)"       # the family itself
    assert registry.axis_title("test_err") == "test error (%)"                   # drawn, never logged
    assert registry.hover_name("eff_grad_norm") == "effective gradient norm · eff_grad_norm"
    assert registry.hover_name("step") == "step" and registry.hover_name("made_up") == "made_up"
    assert (registry.hover_format("val_acc"), registry.hover_format("sharpness")) == (".1%", ".4g")
    # what charts draw but no quantity logs stays out of what the engine may log and of README's table
    assert not registry.is_known("test_err") and not registry.is_known("wall_time")


def test_every_metric_has_a_label_a_group_and_only_known_units():
    for m in registry.METRICS:
        assert m.label and m.label != m.key, m.key
        assert m.unit in ("", "nats", "%", "rad"), m.key
        assert (m.unit == "%") == m.key.split("/")[0].endswith("_acc"), m.key    # every accuracy, nothing else


def test_regime_map_keys_are_logged_metrics_with_their_own_scale():
    assert all(registry.is_known(k) for k in registry.REGIME_MAP_KEYS)
    assert registry.log_keys(registry.REGIME_MAP_KEYS) == {"train_loss", "eff_grad_norm"}


def test_family_members_in_natural_order():
    keys = ["feature_acc/10", "test_acc", "feature_acc/2", "feature_acc/0", "layer_norm/fc0"]
    assert registry.members(keys, "feature_acc/<k>") == ["feature_acc/0", "feature_acc/2", "feature_acc/10"]
    assert registry.members(["test_acc"], "feature_acc/<k>") == []


def test_the_registry_imports_without_torch():
    """The dashboard imports it, and the dashboard never loads torch."""
    code = "import sys, engine.registry; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=README.parent)
    assert out.stdout.strip() == "False"
