"""PyTorch Lightning: `SphereLabCallback` tracks a LightningModule's fit through `spherelab.track`
(README, "Your own model"). Imported only when used: `pip install spherelab[lightning]`.

One tracked step per optimizer step: the gradients are read in `on_before_optimizer_step` (after
backward, before the step), the weights after the batch. The loss is the training step's own (its
return value, or its "loss" entry). Validation metrics the registry knows (val_loss, val_acc,
test_loss, test_acc) are logged at the end of each validation epoch, as the module logged them. A stop
from the dashboard ends the fit at the next step (`trainer.should_stop`).
"""
from __future__ import annotations

import torch
from lightning.pytorch.callbacks import Callback

from engine import registry

from .track import Tracker

LOGGED_AT_VALIDATION = ("val_loss", "val_acc", "test_loss", "test_acc")


class SphereLabCallback(Callback):
    def __init__(self, db=None, name=None, sweep=None, tags=(), config=None, probe=None, sharpness_every: int = 0,
                 log_every: int = 1, **options):
        self.options = dict(db=db, name=name, sweep=sweep, tags=tags, config=config, probe=probe,
                            sharpness_every=sharpness_every, log_every=log_every, **options)
        self.run: Tracker | None = None
        self._stepped = False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        """The run starts at the first batch: torch.fx cannot trace a LightningModule, so its SI weights
        are found with forward hooks on this batch's input (or on `probe`, when given)."""
        if self.run is not None:
            return
        if len(trainer.optimizers) != 1:
            raise ValueError(f"SphereLabCallback tracks one optimizer; this module has {len(trainer.optimizers)}")
        batches = trainer.num_training_batches
        per_epoch = int(batches) // trainer.accumulate_grad_batches if batches != float("inf") else None
        config = {"epochs": trainer.max_epochs, **(self.options["config"] or {})}
        example = batch[0] if isinstance(batch, (list, tuple)) else batch
        self.run = Tracker(pl_module, trainer.optimizers[0], **{**self.options, "config": config},
                           steps_per_epoch=self.options.get("steps_per_epoch") or per_epoch or None, example=example)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.run.before_step()
        self._stepped = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self._stepped:          # accumulating gradients: no step yet
            return
        self._stepped = False
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        self.run.after_step(train_loss=loss.detach() if isinstance(loss, torch.Tensor) else loss)
        if self.run.stop_requested:
            trainer.should_stop = True

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if self.run is None or trainer.sanity_checking:
            return
        values = {key: trainer.callback_metrics[key] for key in LOGGED_AT_VALIDATION
                  if key in trainer.callback_metrics and registry.is_known(key)}
        if values:
            self.run.log(**values)

    def on_fit_end(self, trainer, pl_module) -> None:
        if self.run is not None:
            self.run.finish()

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if self.run is not None:
            stopped = isinstance(exception, KeyboardInterrupt)
            self.run.finish("interrupted" if stopped else "failed",
                            error="stopped with Ctrl-C" if stopped else f"{type(exception).__name__}: {exception}"[:500])
