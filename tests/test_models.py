"""Scale invariance, parameter counts and the frozen head of the SI models (SPEC §2, §4)."""
import pytest
import torch
import torch.nn.functional as F

from engine.config import ConfigError, RunConfig
from engine.models import (build_model, convnet_si, mlp_si, resnet18_si, si_layer_names,
                           si_parameters)

BATCH = 12


def small_model(name: str):
    """A narrow model and a random train-mode batch for it (narrow keeps the test fast)."""
    torch.manual_seed(0)
    if name == "mlp_si":
        model, x = mlp_si(64, 10, width=16, depth=3), torch.randn(BATCH, 64)
    elif name == "convnet_si":
        model, x = convnet_si(10, width=4), torch.randn(BATCH, 3, 32, 32)
    else:
        model, x = resnet18_si(10, width=4), torch.randn(BATCH, 3, 32, 32)
    return model.train(), x, torch.randint(0, 10, (BATCH,))


def set_bn_eps(model, eps: float) -> None:
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.eps = eps


@torch.no_grad()
def output_at_scale(model, x, alpha: float) -> torch.Tensor:
    params = si_parameters(model)
    for p in params:
        p.mul_(alpha)
    out = model(x)
    for p in params:
        p.div_(alpha)
    return out


def max_relative_change(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


MODELS = ["mlp_si", "convnet_si", "resnet18_si"]


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("alpha", [0.1, 7.0])
def test_output_is_scale_invariant_up_to_bn_eps(name, alpha):
    model, x, _ = small_model(name)
    # BatchNorm divides by sqrt(var + eps); var scales with alpha^2 but eps does not, so invariance is
    # exact only as eps -> 0 (train-mode BN rejects eps = 0). With eps = 1e-12 what is left is float32
    # rounding (measured ~5e-7 of the output scale).
    set_bn_eps(model, 1e-12)
    reference = output_at_scale(model, x, 1.0)
    assert max_relative_change(output_at_scale(model, x, alpha), reference) < 1e-5
    # PyTorch's default eps = 1e-5 breaks it by about eps / (2 var) * |1 / alpha^2 - 1|: measured
    # ~4e-5 at alpha = 7 and ~8e-3 at alpha = 0.1 (pre-BN variances ~0.1 become ~1e-3).
    set_bn_eps(model, 1e-5)
    reference = output_at_scale(model, x, 1.0)
    bound = 2e-3 if alpha > 1 else 3e-2
    assert max_relative_change(output_at_scale(model, x, alpha), reference) < bound


@pytest.mark.parametrize("name", MODELS)
def test_gradient_is_tangent_to_the_sphere(name):
    model, x, y = small_model(name)
    params = si_parameters(model)
    grads = torch.autograd.grad(F.cross_entropy(model(x), y), params)
    dot = sum((g * p).sum() for g, p in zip(grads, params))
    grad_norm = torch.sqrt(sum((g ** 2).sum() for g in grads))
    weight_norm = torch.sqrt(sum((p ** 2).sum() for p in params))
    assert grad_norm > 0
    # measured 1e-6 .. 6e-6 with default eps; 1e-4 leaves room without hiding a non-SI layer (~1e-1)
    assert abs(dot / (grad_norm * weight_norm)) < 1e-4


@pytest.mark.parametrize("name", MODELS)
def test_gradient_scales_inversely_with_the_weights(name):
    model, x, y = small_model(name)
    set_bn_eps(model, 1e-12)
    params = si_parameters(model)
    grads = torch.autograd.grad(F.cross_entropy(model(x), y), params)
    with torch.no_grad():
        for p in params:
            p.mul_(4.0)
    scaled = torch.autograd.grad(F.cross_entropy(model(x), y), params)
    for g, g4 in zip(grads, scaled):
        torch.testing.assert_close(g4 * 4.0, g, rtol=1e-3, atol=1e-4 * g.abs().max().item())


def si_count(model) -> int:
    return sum(p.numel() for p in si_parameters(model))


def test_si_parameter_counts_at_width_32():
    assert si_count(convnet_si(10, width=32)) == 387_936
    assert si_count(resnet18_si(10, width=32)) == 2_790_240


def test_default_init_norm_at_width_32():
    # PyTorch's default conv init gives E|w|^2 = out_channels / 3 per layer: 480/3 and 2400/3.
    torch.manual_seed(0)
    rho2_conv = sum((p ** 2).sum().item() for p in si_parameters(convnet_si(10, width=32)))
    rho2_resnet = sum((p ** 2).sum().item() for p in si_parameters(resnet18_si(10, width=32)))
    assert rho2_conv == pytest.approx(160, rel=0.02)
    assert rho2_resnet == pytest.approx(800, rel=0.02)


def test_only_conv_and_linear_weights_train():
    for model in (mlp_si(64, 10, width=8), convnet_si(10, width=4), resnet18_si(10, width=4)):
        trainable = [name for name, p in model.named_parameters() if p.requires_grad]
        assert trainable and all(name.endswith(".weight") and not name.startswith("head") for name in trainable)


def test_layer_names():
    assert si_layer_names(mlp_si(64, 10, width=8, depth=2)) == ["fc0", "fc1"]
    assert si_layer_names(convnet_si(10, width=4)) == ["conv0", "conv1", "conv2", "conv3"]
    names = si_layer_names(resnet18_si(10, width=4))
    assert len(names) == len(si_parameters(resnet18_si(10, width=4))) == 20
    assert names[:3] == ["conv0", "layer1.0.conv1", "layer1.0.conv2"]
    assert "layer2.0.shortcut.conv" in names and len(set(names)) == len(names)


@pytest.mark.parametrize("model_name, dataset, shape", [
    ("mlp_si", "digits", (64,)),
    ("convnet_si", "cifar10", (3, 32, 32)),
    ("resnet18_si", "cifar100", (3, 32, 32)),
])
def test_head_is_frozen_fixed_and_of_norm_init_scale(model_name, dataset, shape):
    cfg = RunConfig(model=model_name, dataset=dataset, width=4, data_dir="unused")
    classes = 100 if dataset == "cifar100" else 10
    first = build_model(cfg, shape, classes, seed=1)
    second = build_model(cfg.replace(seed=2), shape, classes, seed=2)
    head_params = list(first.head.parameters())
    assert head_params and not any(p.requires_grad for p in head_params)
    assert first.head.weight.norm().item() == pytest.approx(10.0, rel=1e-5)
    assert (first.head.bias is not None) == (model_name == "convnet_si")
    for a, b in zip(first.head.parameters(), second.head.parameters()):
        assert torch.equal(a, b)
    # ... while the trained weights do follow the run seed
    assert not torch.equal(si_parameters(first)[0], si_parameters(second)[0])
    assert torch.equal(si_parameters(first)[0], si_parameters(build_model(cfg, shape, classes, seed=1))[0])


def test_init_scale_sets_head_norm():
    cfg = RunConfig(width=8, init_scale=3.0)
    assert build_model(cfg, (64,), 10).head.weight.norm().item() == pytest.approx(3.0, rel=1e-5)


@pytest.mark.parametrize("model_name", ["convnet_si", "resnet18_si"])
def test_conv_net_on_non_image_data_names_the_working_pairs(model_name):
    with pytest.raises(ConfigError) as err:      # such a config cannot be made
        RunConfig(model=model_name, dataset="digits")
    # and the model refuses inputs of another shape than the config's (data read from elsewhere)
    cfg = RunConfig(model=model_name, dataset="synthetic", synthetic_shape=(3, 32, 32))
    with pytest.raises(ConfigError) as built:
        build_model(cfg, (64,), 10)
    for message in (str(err.value), str(built.value)):
        assert "\n" not in message and "3x32x32" in message
        for pair_part in ("cifar10", "cifar100", "synthetic", "mlp_si"):
            assert pair_part in message


@pytest.mark.parametrize("model", ["mlp_si", "convnet_si", "resnet18_si"])
def test_the_first_si_layer_is_the_one_that_reads_the_input(model):
    """engine/packnet.py relies on it: only that layer may see one batch shared by all members."""
    image = model != "mlp_si"
    cfg = RunConfig(model=model, width=4, dataset="synthetic", synthetic_shape=(3, 32, 32) if image else (64,))
    net = build_model(cfg, (3, 32, 32) if image else (64,), 10)
    x = torch.randn(4, *((3, 32, 32) if image else (64,)))
    seen = {}
    names = si_layer_names(net)
    def keep_input(name):
        def hook(module, inputs, output):
            seen[name] = inputs[0]
        return hook

    for name in names:
        net.get_submodule(name).register_forward_hook(keep_input(name))
    net(x)
    first = seen[names[0]]
    assert torch.equal(first.reshape(len(x), -1), x.reshape(len(x), -1))
    assert not any(seen[n].shape[1:] == first.shape[1:] and torch.equal(seen[n], first) for n in names[1:])
