"""Physics checked against math: update rules, norm identities, curvature, invariances.

Everything goes through the network every run trains with (engine/packnet.py), here with one member.
"""
import math

import pytest
import torch

from engine.config import RunConfig
from engine.hessian import hutchinson_trace, hvp_operator, lanczos_top
from engine.packnet import _PackedBN, member_losses
from engine.quantities import angular_update
from engine.trainer import Trainer
from tests.helpers import single

TINY = dict(width=6, depth=2, batch_size=32, probe_size=64, log_every=5, epochs=2)


def tiny(**kw) -> Trainer:
    torch.set_num_threads(1)
    trainer = Trainer([RunConfig(**{**TINY, **kw})])
    trainer.measure([])          # stacks the pack tensors, so trainer.W is the member's row
    return trainer


def loss_and_grad(trainer: Trainer, w: torch.Tensor, x, y):
    """Mean loss and its gradient at weights w (one member), BN on the batch's statistics."""
    wg = w.detach()[None].requires_grad_()
    loss, _ = member_losses(trainer.net(wg, x, mode="probe"), y)
    g, = torch.autograd.grad(loss.sum(), wg)
    return loss[0], g[0]


def next_batch(trainer: Trainer):
    """The batch the next train_step will read (a peek at a copy of the member's stream)."""
    idx = trainer.members[0].stream.clone().advance()
    return trainer.data.x_train[idx], trainer.data.y_train[idx]


def test_sphere_mode_keeps_norm_at_rho0():
    m = single(RunConfig(**{**TINY, "elr": 0.5, "epochs": 3}))
    _, norms = m.recorder.series("si_norm")
    assert len(norms) > 10
    for n in norms:
        assert abs(n - m.rho0) / m.rho0 < 1e-5


def test_lrwd_one_step_norm_identity():
    """rho_{t+1}^2 = (1 - lr wd)^2 rho_t^2 + lr^2 |g|^2 at momentum 0, because g is tangent to the sphere."""
    t = tiny(mode="lrwd", lr=0.3, wd=0.05)
    x, y = next_batch(t)
    _, g = loss_and_grad(t, t.W[0], x, y)
    rho2 = float(t.W[0].norm()) ** 2
    lr, wd = 0.3, 0.05
    expected = (1 - lr * wd) ** 2 * rho2 + lr ** 2 * float(g.norm()) ** 2
    t.train_step()
    got = float(t.W[0].norm()) ** 2
    # exact up to BN's eps and float32 rounding (measured 1.6e-5 relative on this tiny net)
    assert got == pytest.approx(expected, rel=1e-4)
    # and weight decay really matters: without it the prediction is clearly off
    assert abs(got - (rho2 + lr ** 2 * float(g.norm()) ** 2)) / got > 1e-3


def test_the_step_applies_the_gradient_of_its_batch():
    """train_step moves the weights by exactly -lr * g on the sphere before the projection."""
    t = tiny(mode="sphere", elr=0.01)
    x, y = next_batch(t)
    w = t.W[0].clone()
    _, g = loss_and_grad(t, w, x, y)
    t.train_step()
    lr = 0.01 * t.members[0].rho0 ** 2
    stepped = w - lr * g
    assert torch.allclose(t.W[0], stepped * (t.members[0].rho0 / stepped.norm()), rtol=1e-5, atol=1e-7)


def test_gradient_is_tangent_in_training():
    t = tiny()
    x, y = next_batch(t)
    _, g = loss_and_grad(t, t.W[0], x, y)
    cos = float(torch.dot(g, t.W[0]) / (g.norm() * t.W[0].norm()))
    assert abs(cos) < 1e-4


def test_hvp_matches_finite_differences():
    t = tiny()
    t.net.double()
    w0 = t.W[0].double()
    x, y = t.data.x_train[:64].double(), t.data.y_train[:64]
    chunks = [(x[:32], y[:32]), (x[32:], y[32:])]
    v = torch.randn(t.numel, dtype=torch.float64, generator=torch.Generator().manual_seed(0))

    def grad_at(w):
        return sum(loss_and_grad(t, w, xc, yc)[1] * 0.5 for xc, yc in chunks)

    hv = hvp_operator(t.net, w0[None], chunks, False)(v[None], torch.tensor([0]))[0]
    eps = 1e-5
    fd = (grad_at(w0 + eps * v) - grad_at(w0 - eps * v)) / (2 * eps)
    assert torch.allclose(hv, fd, rtol=1e-5, atol=1e-8 * float(fd.abs().max()))


def test_lanczos_top_eigenvalue_matches_explicit_hessian():
    t = tiny()
    x, y = t.data.x_train[:32], t.data.y_train[:32]
    w = t.W[0].detach().clone()
    H = torch.autograd.functional.hessian(lambda v: loss_and_grad_free(t, v, x, y), w)
    H = 0.5 * (H + H.T)
    exact = float(torch.linalg.eigvalsh(H.double())[-1])
    matvec = hvp_operator(t.net, w[None], [(x, y)], False)
    probe = torch.randn(t.numel, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(matvec(probe[None], torch.tensor([0]))[0], H @ probe, rtol=1e-3, atol=1e-5)
    start = torch.randn(1, t.numel, generator=torch.Generator().manual_seed(0))
    (lam,), vec, _ = lanczos_top(matvec, start, iters=60, tol=1e-6)
    assert lam == pytest.approx(exact, rel=1e-4)
    assert torch.allclose(H @ vec[0], lam * vec[0], atol=1e-3 * abs(lam))     # and y is its eigenvector


def loss_and_grad_free(trainer, w, x, y):
    """The mean loss as a function of w alone (differentiable twice, for the explicit Hessian)."""
    loss, _ = member_losses(trainer.net(w[None], x, mode="probe"), y)
    return loss[0]


def test_lanczos_on_known_matrices_batched_and_warm_started():
    torch.manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(50, 50, dtype=torch.float64))
    evals = torch.linspace(-3.0, 2.0, 50, dtype=torch.float64)
    evals[-1] = 5.0
    A = (q * evals) @ q.T
    # largest *algebraic*: a more negative eigenvalue must not win
    B = (q * torch.cat([torch.tensor([-10.0], dtype=torch.float64), evals[1:]])) @ q.T
    ops = torch.stack([A, B])

    def matvec(V, live):
        return torch.bmm(ops[live], V[:, :, None])[:, :, 0]

    starts = torch.randn(2, 50, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    (a, b), vecs, used = lanczos_top(matvec, starts, iters=50, tol=1e-8)
    assert a == pytest.approx(5.0, rel=1e-8) and b == pytest.approx(5.0, rel=1e-6)
    (a2, _), _, used2 = lanczos_top(matvec, vecs, iters=50, tol=1e-8)
    assert a2 == pytest.approx(5.0, rel=1e-8)
    assert used2 < used        # a warm start converges faster


def test_hutchinson_is_unbiased_on_known_matrix():
    A = torch.diag(torch.arange(1.0, 11.0))
    [est] = hutchinson_trace(lambda V, live: V @ A, 1, 10, 4, [torch.Generator().manual_seed(0)])
    assert est == pytest.approx(55.0)   # diagonal matrix: z^T A z = trace exactly for Rademacher z


def test_sharpness_unchanged_when_weights_rescaled():
    t = tiny(lanczos_iters=60, lanczos_tol=1e-7)
    before = t.measure(["sharpness"])[0]["sharpness"]
    with torch.no_grad():
        t.W.mul_(3.0)
    t.members[0].carried.clear()          # a cold start
    after = t.measure(["sharpness"])[0]["sharpness"]
    assert before > 0
    assert after == pytest.approx(before, rel=1e-3)


def test_probes_leave_the_model_unchanged():
    t = tiny(sharpness_every=5, trace_samples=2)
    for _ in range(7):
        t.train_step()
    stats = [(mean.clone(), var.clone()) for mean, var in t.STATS]
    w = t.W.clone()
    t.measure(["sharpness", "trace", "test"])
    t.measure(["averages"], start=True)              # the start-point loss on the probe
    for (m0, v0), (m1, v1) in zip(stats, t.STATS):
        assert torch.equal(m0, m1) and torch.equal(v0, v1)
    assert torch.equal(w, t.W)
    assert t.members[0].carried["sharpness"] is not None     # the warm start is kept


@pytest.mark.science
@pytest.mark.parametrize("alpha", [0.1, 7.0])
def test_sphere_run_depends_on_elr_not_radius(alpha):
    """Scaling the initial SI weights leaves a sphere-mode loss trace unchanged at the same ELR.

    BN's eps is the one thing that sees the radius (measured: with eps=1e-5 a width-64 digits run
    at alpha=0.25 drifts 40% apart within 50 steps, amplified by SGD), so both runs use eps=1e-12:
    then only float rounding separates the traces (a short run in the convergence regime, since
    chaotic dynamics would amplify even that).
    """
    runs = []
    for scale in (1.0, alpha):
        torch.set_num_threads(1)
        t = Trainer([RunConfig(**{**TINY, "elr": 0.005, "epochs": 1, "log_every": 2})])
        for layer in t.net.modules():
            if isinstance(layer, _PackedBN):
                layer.eps = 1e-12
        m = t.members[0]
        with torch.no_grad():
            m.w.mul_(scale)
            m.w0.mul_(scale)
        m.rho0 = float(m.w.norm())
        t.run()
        runs.append(m.recorder)
    _, la = runs[0].series("train_loss")
    _, lb = runs[1].series("train_loss")
    assert len(la) == len(lb) > 5
    assert lb == pytest.approx(la, rel=1e-4)
    _, ea = runs[0].series("elr")
    _, eb = runs[1].series("elr")
    assert eb == pytest.approx(ea, rel=1e-5)
    _, na = runs[0].series("si_norm")
    _, nb = runs[1].series("si_norm")
    assert nb[-1] == pytest.approx(alpha * na[-1], rel=1e-5)   # the radius really was different


def test_angular_update_resolves_tiny_angles():
    u = torch.zeros(1, 1000)
    u[0, 0] = 1.0
    for angle in (1e-6, 1e-4, 0.3, 2.0):
        w = torch.zeros(1, 1000)
        w[0, 0], w[0, 1] = math.cos(angle) * 5, math.sin(angle) * 5
        assert float(angular_update(u, w)[0]) == pytest.approx(angle, rel=1e-3)


def test_elr_is_lr_over_norm_squared_and_threshold():
    m = single(RunConfig(**{**TINY, "mode": "lrwd", "lr": 0.2, "wd": 0.01, "momentum": 0.5, "sharpness_every": 5}))
    row = m.recorder.rows[-1][3]
    assert row["elr"] == pytest.approx(row["lr"] / row["si_norm"] ** 2, rel=1e-9)
    assert row["sharpness_threshold"] == pytest.approx(2 * 1.5 / row["elr"], rel=1e-9)
    for name in ("fc0", "fc1"):
        assert row[f"layer_elr/{name}"] == pytest.approx(row["lr"] / row[f"layer_norm/{name}"] ** 2)


@pytest.mark.science
def test_momentum_steady_state_in_lrwd():
    """At equilibrium ELR * eff_grad_norm ~ sqrt(2 lr wd / (1 + mu)) (SPEC §3); check within 35%."""
    for mu in (0.0, 0.5):
        m = single(RunConfig(mode="lrwd", lr=0.5, wd=0.05, momentum=mu, epochs=40, log_every=10, width=32, depth=2,
                             batch_size=32))
        rows = [r[3] for r in m.recorder.rows[-30:]]
        prod = sum(r["elr"] * r["eff_grad_norm"] for r in rows) / len(rows)
        assert prod == pytest.approx(math.sqrt(2 * 0.5 * 0.05 / (1 + mu)), rel=0.35)
