"""Helpers shared by the engine tests: a run alone, comparing traces, scripted controls, traces
written into a store."""
import numpy as np
import pandas as pd
import torch

from engine.analysis import analyze
from engine.submission import queue_runs
from engine.trainer import Member, Trainer
from storage import Store


def single(cfg, control=None) -> Member:
    """Train cfg alone (a pack of one) in memory; the member carries recorder, result and weights."""
    torch.set_num_threads(1)
    trainer = Trainer([cfg], controls=[control])
    trainer.run()
    return trainer.members[0]


def assert_same_rows(expected, got, rtol=1e-5, loose=None, upto=None):
    """Same log points, same keys, every value within rtol (loose: {key: rtol})."""
    loose = loose or {}
    expected = [r for r in expected if upto is None or r[0] <= upto]
    assert [r[0] for r in got] == [r[0] for r in expected]
    for (step, epoch, _, want), (_, epoch2, _, have) in zip(expected, got):
        assert epoch == epoch2
        assert list(have) == list(want), (step, set(have) ^ set(want))
        for key, value in want.items():
            np.testing.assert_allclose(have[key], value, rtol=loose.get(key, rtol), atol=1e-12, equal_nan=True,
                                       err_msg=f"{key} at step {step}")


def assert_bitwise_rows(expected, got):
    """Same log points and keys, every value equal to the last bit (nan equal to nan)."""
    assert [r[0] for r in got] == [r[0] for r in expected]
    for (step, _, _, want), (_, _, _, have) in zip(expected, got):
        assert list(have) == list(want), (step, set(have) ^ set(want))
        for key, value in want.items():
            assert have[key] == value or (value != value and have[key] != have[key]), (key, step, value, have[key])


class Script:
    """A member control that acts at given steps of a clock (e.g. another member's step): an action is
    a control answer ("pause", "resume", "stop") or a callable applied to the member."""

    def __init__(self, clock, actions):
        self.clock, self.actions, self.fired = clock, dict(actions), set()

    def poll(self, member):
        now = self.clock()
        for at, action in self.actions.items():
            if at <= now and at not in self.fired:
                self.fired.add(at)
                if callable(action):
                    action(member)
                    continue
                return action
        return None


def store_traces(db, named_traces, swept=None, sweep_name=None) -> list[int]:
    """Write in-memory traces ([(RunConfig, trace)]) into a store as finished runs labelled with their
    regime, as a worker would have left them (queued as the dashboard queues them: one sweep when
    `swept`); their ids."""
    store = Store(db)
    ids = queue_runs(store, [cfg for cfg, _ in named_traces], swept, sweep_name)
    for run_id, (_, trace) in zip(ids, named_traces):
        keys = [c for c in trace.columns if c not in ("step", "epoch", "wall_time")]
        store.log_metrics(run_id, [(int(r["step"]), float(r["epoch"]), float(r["wall_time"]),
                                    {k: float(r[k]) for k in keys if pd.notna(r[k])})
                                   for r in trace.to_dict("records")])
        store.update_run(run_id, status="finished", step=int(trace["step"].max()),
                         regime=analyze(trace, 10)["regime"])
    return ids
