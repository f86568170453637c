"""The metric registry is the one source of metric names: README, exports and the engine agree with it."""
import re
from pathlib import Path

from engine import registry

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_metric_table_is_the_registry():
    text = README.read_text()
    assert registry.markdown_table() in text
    documented = re.findall(r"^\| `([^`]+)` \|", text[text.index("| key | definition |"):], flags=re.M)
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
