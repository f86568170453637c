"""spherelab.track: a user's own training loop measured into the store (README, "Your own model")."""
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from torch import nn

import spherelab
from engine.config import RunConfig
from engine.data import load_dataset
from engine.models import build_model, convnet_si, mlp_si, resnet18_si, si_layer_names
from engine.trainer import BatchStream, train_traces
from spherelab.detect import detect_si
from storage import MIN_STALE_AFTER_S, Store

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_track_logs_what_the_engine_logs_for_the_same_run(store):
    """mlp_si on digits under lr + wd, trained by a plain torch loop with track, against the engine's own
    run of that configuration: the same batches, the same SI norm, ELR, gradient norms and angular update."""
    cfg = RunConfig(mode="lrwd", lr=0.1, wd=0.01, epochs=1, batch_size=64, log_every=4, seed=3)
    [trace] = train_traces([cfg], device="cpu")
    data = load_dataset(cfg, "cpu")
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, data.input_shape, data.num_classes)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, weight_decay=cfg.wd)
    stream = BatchStream(data, cfg.batch, torch.Generator().manual_seed(cfg.seed))
    steps = data.steps_per_epoch(cfg.batch)
    with spherelab.track(model, optimizer, db=store.url, log_every=cfg.log_every, steps_per_epoch=steps) as run:
        for _ in range(steps):
            idx = stream.advance()
            logits = model(data.x_train[idx])
            loss = nn.functional.cross_entropy(logits, data.y_train[idx])
            acc = (logits.argmax(1) == data.y_train[idx]).float().mean()
            optimizer.zero_grad()
            loss.backward()
            run.before_step()
            optimizer.step()
            run.after_step(train_loss=loss, train_acc=acc)
    info = store.get_run(run.run_id)
    assert info.status == "finished" and info.step == steps and info.progress == 1.0
    assert info.config["si_params"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert info.config["optimizer"] == "SGD" and info.config["wd"] == cfg.wd
    mine = store.read_metrics(run.run_id).set_index("step")
    engine = trace.set_index("step").loc[mine.index]
    assert list(mine.index) == sorted({*range(cfg.log_every, steps + 1, cfg.log_every), steps})  # and the last
    for key in ("si_norm", "elr", "lr", "grad_norm", "eff_grad_norm", "angular_update", "train_loss", "train_acc",
                "layer_norm/fc1", "layer_elr/fc2"):
        torch.testing.assert_close(torch.tensor(mine[key].to_numpy()), torch.tensor(engine[key].to_numpy()),
                                   rtol=2e-4, atol=1e-7, msg=key)
    torch.testing.assert_close(torch.tensor(mine["epoch"].to_numpy()), torch.tensor(engine["epoch"].to_numpy()))


@pytest.mark.parametrize("build", [lambda: mlp_si(64, 10, depth=2), lambda: mlp_si(64, 10, norm="layer"),
                                   lambda: convnet_si(10, 4), lambda: resnet18_si(10, 4)],
                         ids=["mlp_si", "mlp_si_layer", "convnet_si", "resnet18_si"])
def test_detection_finds_every_si_weight_of_the_builtin_models(build):
    model = build()
    found = detect_si(model)
    assert found.layer_names == si_layer_names(model) and not found.others


class Mixed(nn.Module):
    """One weight of each kind: SI through BN, an affine BN (its scale and shift act after the
    normalisation), GroupNorm, LayerNorm and a sum that scales with it; not SI through its own bias, a tanh,
    a sum with a term that does not scale with it (d2, skip),
    and the trainable head."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn_a = nn.BatchNorm2d(4, affine=False)
        self.b = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn_b = nn.BatchNorm2d(4)                                   # affine: b is SI, bn_b's weight, bias not
        self.c = nn.Conv2d(4, 4, 3, padding=1)                          # own bias
        self.gn_c = nn.GroupNorm(2, 4, affine=False)
        self.d = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.d2 = nn.Conv2d(4, 4, 3, padding=1, bias=False)             # d2(relu(d)) + d: SI in d, not in d2
        self.gn_d = nn.GroupNorm(2, 4, affine=False)
        self.skip = nn.Conv2d(4, 4, 1, bias=False)                      # skip(x) + x: x does not scale with it
        self.bn_skip = nn.BatchNorm2d(4, affine=False)
        self.e = nn.Linear(4, 8, bias=False)
        self.ln_e = nn.LayerNorm(8, elementwise_affine=False)
        self.f = nn.Linear(8, 8, bias=False)                            # into a tanh
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        x = torch.relu(self.bn_a(self.a(x)))
        x = torch.relu(self.bn_b(self.b(x)))
        x = torch.relu(self.gn_c(self.c(x)))
        d = self.d(x)
        x = torch.relu(self.gn_d(self.d2(torch.relu(d)) + d))
        x = torch.relu(self.bn_skip(self.skip(x) + x))
        x = torch.relu(self.ln_e(self.e(x.mean((2, 3)))))
        return self.head(torch.tanh(self.f(x)))


def test_detection_of_a_hand_written_model_with_mixed_norms():
    model = Mixed()
    found = detect_si(model)
    assert found.method == "torch.fx"
    assert sorted(found.si) == ["a.weight", "b.weight", "d.weight", "e.weight"]
    assert {"bn_b.weight", "skip.weight", "d2.weight", "head.bias"} <= set(found.others)
    # the check behind it: scaling the SI weights (each, and together) leaves the output unchanged,
    # scaling any other weight does not
    model.train()
    x = torch.randn(4, 3, 8, 8)
    before = model(x).detach()
    for name, p in model.named_parameters():
        if name.endswith("weight") and p.dim() > 1:
            with torch.no_grad():
                p.mul_(3.0)
            same = torch.allclose(model(x), before, rtol=1e-3, atol=1e-4)
            with torch.no_grad():
                p.div_(3.0)
            assert same == (name in found.si), name
    with torch.no_grad():
        for p in found.si.values():
            p.mul_(3.0)
    torch.testing.assert_close(model(x), before, rtol=1e-3, atol=1e-4)


def test_hooks_find_the_plain_pattern_and_si_params_override():
    model = Mixed()
    from spherelab.detect import _by_hooks
    assert _by_hooks(model, torch.randn(2, 3, 8, 8)) == {"a.weight", "b.weight", "e.weight"}
    found = detect_si(model, si_params=["b.weight", model.c.weight])
    assert sorted(found.si) == ["b.weight", "c.weight"] and found.method == "given"
    with pytest.raises(ValueError, match="si_params names"):
        detect_si(model, si_params=["nope.weight"])


def test_no_si_weight_logs_losses_and_says_so(store, capsys):
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, y = torch.randn(32, 4), torch.randint(0, 2, (32,))
    with spherelab.track(model, optimizer, db=store.url, name="plain", tags=["mine"], config={"note": "x"}) as run:
        for _ in range(3):
            loss = nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            run.before_step()
            optimizer.step()
            run.after_step(train_loss=loss)
        run.log(test_loss=0.5)
    err = capsys.readouterr().err
    assert err.count("no scale-invariant weight") == 1
    info = store.get_run(run.run_id)
    assert info.status == "finished" and info.tags == ["mine"] and info.config["note"] == "x"
    assert info.config["optimizer"] == "Adam" and info.config["si_params"] == 0
    assert info.config["momentum"] == 0.0 and info.config["betas"] == [0.9, 0.999]
    assert set(store.metric_keys(run.run_id)) == {"train_loss", "test_loss", "non_si_norm"}


def test_exception_in_the_block_fails_the_run_and_sweep_groups_runs(store):
    ids = []
    for lr in (0.1, 0.2):
        model = mlp_si(8, 3, width=8, depth=1)
        optimizer = torch.optim.SGD(model.parameters(), lr=lr)
        with pytest.raises(ZeroDivisionError):
            with spherelab.track(model, optimizer, db=store.url, sweep="my sweep") as run:
                ids.append(run.run_id)
                1 / 0
    assert [store.get_run(i).status for i in ids] == ["failed", "failed"]
    assert "ZeroDivisionError" in store.get_run(ids[0]).error
    [sweep] = store.list_sweeps()
    assert sweep.name == "my sweep" and sorted(sweep.run_ids) == ids


def test_sharpness_on_a_copy_leaves_training_untouched(store):
    torch.manual_seed(0)
    x, y = torch.randn(64, 8), torch.randint(0, 3, (64,))

    def train(sharpness_every):
        torch.manual_seed(1)
        model = mlp_si(8, 3, width=16, depth=2)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        run = spherelab.track(model, optimizer, db=store.url, probe=(x, y), sharpness_every=sharpness_every)
        for _ in range(4):
            loss = nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            run.before_step()
            optimizer.step()
            run.after_step(train_loss=loss)
        run.finish()
        return run.run_id, [p.detach().clone() for p in model.parameters()], torch.rand(1)

    plain_id, plain, plain_rng = train(0)
    sharp_id, sharp, sharp_rng = train(2)
    for a, b in zip(plain, sharp):
        assert torch.equal(a, b)
    assert torch.equal(plain_rng, sharp_rng)
    frame = store.read_metrics(sharp_id, ["sharpness", "sharpness_threshold", "elr"]).dropna()
    assert list(frame["step"]) == [2, 4]
    assert (frame["sharpness"] > 0).all()
    torch.testing.assert_close(torch.tensor(frame["sharpness_threshold"].to_numpy()),
                               torch.tensor((2 * 1.9 / frame["elr"]).to_numpy()))


KILLED = textwrap.dedent("""
    import sys, time, torch
    import spherelab
    from engine.models import mlp_si
    model = mlp_si(8, 3, width=8, depth=1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(32, 8), torch.randint(0, 3, (32,))
    run = spherelab.track(model, optimizer, db=sys.argv[1])
    for step in range(1, 1000000):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad(); loss.backward()
        run.before_step(); optimizer.step(); run.after_step(train_loss=loss)
        if step == 5:
            run.flush()
            print(run.run_id, flush=True)
        if step > 5:
            time.sleep(0.01)
""")

def test_a_killed_tracking_process_leaves_its_run_interrupted(tmp_path):
    """Run from a folder outside the repository (the package as installed would be): SIGKILL after a
    flush; the run goes interrupted at the first stale check, its trace up to the flush kept, and no
    worker takes it up."""
    db = tmp_path / "store.db"
    script = tmp_path / "train.py"
    script.write_text(KILLED)
    env = {**os.environ, "PYTHONPATH": REPO}
    proc = subprocess.Popen([sys.executable, str(script), str(db)], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, text=True)
    try:
        run_id = int(proc.stdout.readline())
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    with Store(db) as store:
        assert store.get_run(run_id).status == "running"
        assert store.last_step(run_id) >= 5
        deadline = time.monotonic() + 30
        while not store.requeue_stale(MIN_STALE_AFTER_S) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert store.get_run(run_id).status == "interrupted"
        trace = store.read_metrics(run_id)
        assert list(trace["step"][:5]) == [1, 2, 3, 4, 5]
        assert store.claim_interrupted("some-worker") is None


def tracked_sweep(db, lrs=(0.05, 0.5), steps=24):
    """Tiny mlp_si runs on random data, tracked into one sweep; their ids."""
    torch.manual_seed(0)
    x, y = torch.randn(256, 8), torch.randint(0, 3, (256,))
    ids = []
    for lr in lrs:
        model = mlp_si(8, 3, width=8, depth=2)
        optimizer = torch.optim.SGD(model.parameters(), lr=lr, weight_decay=0.01)
        with spherelab.track(model, optimizer, db=db, sweep="tracked", log_every=2, steps_per_epoch=4) as run:
            for step in range(steps):
                idx = slice(32 * (step % 8), 32 * (step % 8 + 1))
                loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
                optimizer.zero_grad()
                loss.backward()
                run.before_step()
                optimizer.step()
                run.after_step(train_loss=loss)
            run.log(test_loss=loss.detach(), test_acc=0.5)
        ids.append(run.run_id)
    return ids


def test_tracked_runs_read_like_engine_runs_on_the_pages_and_the_cli(tmp_path, monkeypatch, capsys):
    from engine.cli import main
    from tests.test_dashboard import charts, open_app
    db = tmp_path / "store.db"
    first, second = tracked_sweep(db)
    assert main(["analyze", str(first), "--db", str(db)]) in (0, None)
    assert '"regime"' in capsys.readouterr().out
    at = open_app(db, monkeypatch, "run", run=second)
    import json
    [heatmap] = [c for c in charts(at) if c.key == "run-layer-heatmap"]
    [trace] = json.loads(heatmap.proto.spec)["data"]
    assert trace["type"] == "heatmap" and trace["y"] == ["fc0", "fc1"]
    with Store(db) as store:
        sweep = store.get_run(first).sweep_id
    at = open_app(db, monkeypatch, "regime_map", sweep=sweep)
    assert charts(at)
    open_app(db, monkeypatch, "periodic", run=second)
    at = open_app(db, monkeypatch, "live")
    assert f"#{second}" in str(at.dataframe[0].value["run"].tolist())
    at = open_app(db, monkeypatch, "compare", runs=f"{first},{second}", metric="elr")
    assert charts(at)


def test_layer_heatmap_rows_are_layers_and_colours_log_values():
    import math
    import pandas as pd
    from dashboard.charts import layer_heatmap
    frame = pd.DataFrame({"step": [1, 2, 3], "layer_elr/fc10": [1e-3, 1e-2, 1e-1],
                          "layer_elr/fc2": [1.0, 1.0, float("inf")], "si_norm": [1.0, 2.0, 3.0]})
    fig = layer_heatmap(frame)
    heat = fig.data[0]
    assert list(heat.y) == ["fc2", "fc10"] and list(heat.x) == [1, 2, 3]
    assert heat.z[1][0] == pytest.approx(-3) and heat.z[0][1] == pytest.approx(0) and math.isnan(heat.z[0][2])
    assert "0.01" in heat.colorbar.ticktext


def test_the_example_runs_from_another_folder(tmp_path, monkeypatch):
    """examples/track_resnet.py, one short epoch, from a folder outside the repository."""
    import runpy
    monkeypatch.chdir(tmp_path)
    example = runpy.run_path(os.path.join(REPO, "examples", "track_resnet.py"))
    db = tmp_path / "example.db"
    example["main"](["--db", str(db), "--epochs", "1", "--samples", "256", "--sharpness-every", "2"])
    with Store(db) as store:
        [run] = store.list_runs()
        assert run.status == "finished" and run.total_steps == 2 and run.config["si_layers"] == ["features.0", "features.4", "features.8"]
        assert run.config["non_si_params"] == 0 and run.config["synthetic_classes"] == 10
        assert {"sharpness", "test_acc", "layer_elr/features.4"} <= set(store.metric_keys(run.id))


def test_a_run_left_unfinished_at_exit_keeps_its_trace_and_reads_interrupted(store):
    """What the atexit hook does when a script ends without finish() (called directly here: the test
    process does not end)."""
    model = mlp_si(8, 3, width=8, depth=1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(32, 8), torch.randint(0, 3, (32,))
    run = spherelab.track(model, optimizer, db=store.url)
    for _ in range(7):
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        run.before_step()
        optimizer.step()
        run.after_step(train_loss=loss)
    run._at_exit()
    info = store.get_run(run.run_id)
    assert info.status == "interrupted" and "without run.finish()" in info.error
    assert list(store.read_metrics(run.run_id)["step"]) == list(range(1, 8))
    run.finish()                                  # already ended: nothing changes
    assert store.get_run(run.run_id).status == "interrupted"


def test_stop_from_the_dashboard_reaches_the_loop_and_ends_the_run_cancelled(store):
    model = mlp_si(8, 3, width=8, depth=1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(32, 8), torch.randint(0, 3, (32,))
    with spherelab.track(model, optimizer, db=store.url) as run:
        store.send_command(run.run_id, "pause")
        store.cancel(run.run_id)                      # what the Live page's stop and `engine cancel` do
        deadline = time.monotonic() + 30
        while not run.stop_requested and time.monotonic() < deadline:
            loss = nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            run.before_step()
            optimizer.step()
            run.after_step(train_loss=loss)
            time.sleep(0.01)
        assert run.stop_requested
    info = store.get_run(run.run_id)
    assert info.status == "cancelled"
    assert any("pause is not applied" in e.payload.get("text", "") for e in store.events(run.run_id, ["note"]))
