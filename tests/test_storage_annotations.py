"""The Store's helpers for managing saved runs from the dashboard: names, tags, notes, whole sweeps."""
import pytest

from storage import RunNotFound, Store, StoreError


def test_rename_run_and_sweep_strip_and_refuse_empty_names(store):
    sweep_id, [run_id] = store.create_sweep_runs("old", {}, [{"config": {}, "name": "a"}])
    store.rename_run(run_id, "  baseline  ")
    store.rename_sweep(sweep_id, "lecture sweep")
    assert store.get_run(run_id).name == "baseline" and store.get_sweep(sweep_id).name == "lecture sweep"
    for bad in ("", "   ", "x" * 201):
        with pytest.raises(StoreError, match="name"):
            store.rename_run(run_id, bad)
    assert store.get_run(run_id).name == "baseline"


def test_set_tags_replaces_them(store):
    run_id = store.create_run({}, name="a", tags=["x", "y"])
    store.set_tags(run_id, ["y", " z ", "z"])
    assert store.get_run(run_id).tags == ["y", "z"]
    store.set_tags(run_id, [])
    assert store.get_run(run_id).tags == []
    with pytest.raises(StoreError):
        store.set_tags(run_id, ["ok", ""])


def test_notes_keep_the_latest_survive_a_resume_and_travel_in_bundles(store, tmp_path):
    run_id = store.create_run({}, name="a")
    assert store.notes(run_id) == ""
    store.update_run(run_id, step=500)
    store.add_event(run_id, 400, "note", {"text": "an engine note"})   # not the user's notes
    store.set_notes(run_id, "first")
    store.set_notes(run_id, "second [x](y)")
    store.truncate_after(run_id, 100)    # a resume from a checkpoint at step 100
    assert store.notes(run_id) == "second [x](y)"
    store.export_bundle([run_id], tmp_path / "b.zip")
    with Store(tmp_path / "other.db") as other:
        [copy] = other.import_bundle(tmp_path / "b.zip")
        assert other.notes(copy) == "second [x](y)"
    with pytest.raises(StoreError, match="at most"):
        store.set_notes(run_id, "x" * 20_001)


def test_delete_sweep_removes_its_runs_but_not_while_one_is_trained(store):
    sweep_id, ids = store.create_sweep_runs("s", {}, [{"config": {}, "name": n} for n in "ab"])
    other = store.create_run({}, name="other")
    store.log_metrics(ids[0], [(0, 0.0, 0.0, {"train_loss": 1.0})])
    store.update_run(ids[1], status="running")
    with pytest.raises(StoreError, match="stop them first"):
        store.delete_sweep(sweep_id)
    assert len(store.list_runs()) == 3
    store.update_run(ids[1], status="interrupted")
    deleted = store.delete_sweep(sweep_id)
    assert sorted(r.id for r in deleted) == ids
    assert [r.id for r in store.list_runs()] == [other] and store.list_sweeps() == []
    with pytest.raises(RunNotFound):
        store.metric_keys(ids[0])
