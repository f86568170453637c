"""spherelab.lightning.SphereLabCallback with the real Lightning library: a fit tracked by the callback
is the run a plain loop tracked by spherelab.track gives for the same model, data and optimizer."""
import numpy as np
import pytest
import torch
from lightning.pytorch import LightningModule, Trainer
from torch import nn

import spherelab
from spherelab.lightning import SphereLabCallback
from storage import Store

BATCH, EPOCHS, LR, WD = 32, 2, 0.2, 5e-3


def model_and_data():
    torch.manual_seed(0)
    x, y = torch.randn(256, 20), torch.randint(0, 4, (256,))
    model = nn.Sequential(nn.Linear(20, 32, bias=False), nn.BatchNorm1d(32, affine=False), nn.ReLU(),
                          nn.Linear(32, 32, bias=False), nn.BatchNorm1d(32, affine=False), nn.ReLU(),
                          nn.Linear(32, 4))
    return model, x, y


class Module(LightningModule):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.log("val_loss", nn.functional.cross_entropy(logits, y))
        self.log("val_acc", (logits.argmax(1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=LR, weight_decay=WD)


def test_the_callback_tracks_what_a_plain_tracked_loop_tracks(tmp_path):
    db = str(tmp_path / "lightning.db")
    torch.set_num_threads(1)
    model, x, y = model_and_data()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=BATCH)
    trainer = Trainer(max_epochs=EPOCHS, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                      callbacks=[SphereLabCallback(db=db, name="lightning", quiet=True)])
    trainer.fit(Module(model), loader, loader)

    model, x, y = model_and_data()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, weight_decay=WD)
    steps = len(x) // BATCH
    with spherelab.track(model, optimizer, db=db, name="plain", steps_per_epoch=steps, quiet=True) as run:
        for _ in range(EPOCHS):
            for i in range(steps):
                loss = nn.functional.cross_entropy(model(x[i * BATCH:(i + 1) * BATCH]), y[i * BATCH:(i + 1) * BATCH])
                optimizer.zero_grad()
                loss.backward()
                run.before_step()
                optimizer.step()
                run.after_step(train_loss=loss.detach())

    store = Store(db)
    fit, plain = store.list_runs(status="finished")[::-1]
    assert (fit.name, plain.name) == ("lightning", "plain") and fit.progress == 1.0
    assert fit.config["optimizer"] == "SGD" and fit.config["epochs"] == EPOCHS and fit.config["lr"] == LR
    keys = ["train_loss", "si_norm", "elr", "eff_grad_norm", "angular_update"]
    a, b = store.read_metrics(fit.id, keys).dropna(subset=["si_norm"]), store.read_metrics(plain.id, keys)
    assert a["step"].tolist() == b["step"].tolist() == list(range(1, EPOCHS * steps + 1))
    assert a["epoch"].tolist() == b["epoch"].tolist()
    for key in keys:
        np.testing.assert_allclose(a[key], b[key], rtol=1e-5, err_msg=key)
    val = store.read_metrics(fit.id, ["val_loss", "val_acc"]).dropna()
    assert val["step"].tolist() == [steps, 2 * steps] and ((val["val_acc"] >= 0) & (val["val_acc"] <= 1)).all()


def test_a_failing_fit_leaves_its_run_failed_with_the_error(tmp_path):
    class Broken(Module):
        def training_step(self, batch, batch_idx):
            if batch_idx == 2:
                raise RuntimeError("a bug in the user's step")
            return super().training_step(batch, batch_idx)

    db = str(tmp_path / "broken.db")
    model, x, y = model_and_data()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=BATCH)
    trainer = Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False,
                      callbacks=[SphereLabCallback(db=db, quiet=True)])
    with pytest.raises(RuntimeError, match="a bug in the user's step"):
        trainer.fit(Broken(model), loader)
    [run] = Store(db).list_runs()
    assert run.status == "failed" and "a bug in the user's step" in run.error and run.step == 2
