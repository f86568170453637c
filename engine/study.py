"""The learning-rate study (SPEC §10, the large-LR paper's protocol) as one object in the store:
pre-train a sweep of ELRs (PLR) on the sphere, fine-tune every end point at small ELRs (FLR), average
its last K kept checkpoints (SWA), and measure the geometry between its solutions; then report test
accuracy and geometry against the regime each PLR fell in. Torch-free: the study creates runs and
jobs; the engine (this CLI process or the workers) trains and computes them.

Every run and job of a study has a role (pretrain:ELR:SEED, finetune:PARENT:FLR, average:PARENT,
geometry:PARENT:A:B), unique within the study, so `advance` can be called any number of times, by any
number of processes, and each piece is created once: an interrupted study resumes where it stopped.
"""
from __future__ import annotations

import math
import statistics
from collections import Counter

from storage import TERMINAL_STATUSES, Store

from .analysis import analyze_stored
from .config import ConfigError, RunConfig
from .submission import check_data, default_sweep_name

# Sub-regime 2A/2B (SPEC §10): a chaotic-equilibrium PLR whose solutions (each fine-tuned point and the
# average) lie in one basin has near-zero loss and error barriers between them; the paper (ResNet18SI)
# reports ~0 in 2A and 30-80% error barriers between separate basins. Decided on the barriers averaged
# over seeds (one seed's test-error barrier is noisy at the 0.5% level). Measured on the ticks preset
# (3 seeds, 2,000 test points: one point = 0.05%), the largest seed-mean barrier of a row:
#   PLR        1e-3..5.6e-3   1e-2     1.8e-2   3.2e-2   5.6e-2 (divergence)
#   test err   <= 0.08%       0.54%    0.47%    1.07%    3.5%
#   train loss 0              0.0017   0.0056   0.0365   0.82
# Inside one basin (PLR <= 1.8e-2) both stay near half of these limits or below; at 3.2e-2, where the
# averages collapse, the loss barrier is 3.6x its limit.
BASIN_BARRIER = 0.01          # test error (fraction)
BASIN_LOSS_BARRIER = 0.01     # train loss (nats)
GEOMETRY_POINTS = 21


def create_study(store: Store, base: RunConfig, *, pretrain_elrs: list[float], pretrain_epochs: int,
                 finetune_elrs: list[float], finetune_epochs: int, average: int, seeds: list[int],
                 points: int = GEOMETRY_POINTS, name: str | None = None, reserve_for: str | None = None) -> int:
    """Validate everything, then create the study and its pre-training sweep (one transaction each);
    returns the study id. ConfigError (one line) on bad input, before anything is written."""
    if not pretrain_elrs or not all(e > 0 and math.isfinite(e) for e in pretrain_elrs):
        raise ConfigError("--pretrain-elr needs one or more positive ELRs, e.g. 1e-4:1:13")
    if not finetune_elrs or not all(e > 0 and math.isfinite(e) for e in finetune_elrs):
        raise ConfigError("--finetune-elr needs one or more positive ELRs, e.g. 1e-4 1e-3")
    if base.mode != "sphere":
        raise ConfigError("a study pre-trains and fine-tunes on the sphere at fixed ELRs: drop --mode lrwd")
    if pretrain_epochs < 1 or finetune_epochs < 1:
        raise ConfigError("--pretrain-epochs and --finetune-epochs must each be at least 1")
    if not 2 <= points <= 201:
        raise ConfigError(f"--points must be between 2 and 201, got {points}")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seed lists a seed twice: {seeds}")
    if not 1 <= average <= pretrain_epochs:
        raise ConfigError(f"--average K must be between 1 and --pretrain-epochs ({pretrain_epochs}): the "
                          f"pre-training keeps one checkpoint per epoch for its last K epochs, got {average}")
    # the last K epochs kept (their average) and the last one (where the forks start)
    base = base.replace(epochs=pretrain_epochs, keep_every=0, keep_last=average, name=None)
    configs = [base.replace(elr=elr, seed=seed).validate() for elr in pretrain_elrs for seed in seeds]
    for flr in finetune_elrs:
        base.replace(elr=flr, epochs=pretrain_epochs + finetune_epochs).validate()
    check_data(configs[:1])
    spec = {"base": base.to_dict(), "pretrain_elrs": list(pretrain_elrs), "seeds": list(seeds),
            "pretrain_epochs": pretrain_epochs, "finetune_elrs": list(finetune_elrs),
            "finetune_epochs": finetune_epochs, "average": average, "points": points}
    swept = {"elr": list(pretrain_elrs), **({"seed": list(seeds)} if len(seeds) > 1 else {})}
    name = name or f"study {default_sweep_name(base, swept)}"
    items = [{"config": c.to_dict(), "name": c.display_name(), "tags": list(c.tags), "reserved_for": reserve_for,
              "study_role": f"pretrain:{c.elr:g}:{c.seed}"} for c in configs]
    return store.create_study(name, spec, items, owner=reserve_for)


def advance(store: Store, study_id: int, reserve_for: str | None = None) -> bool:
    """Create whatever the finished pieces now allow (forks and averages of finished pre-training runs,
    geometries of finished forks); mark the study finished when nothing is left. Returns True when
    the study has ended. Safe to call again and from several processes."""
    study = store.get_study(study_id)
    if study.status != "running":
        return True
    spec = study.spec
    runs = {r.study_role: r for r in store.list_runs(study_id=study_id)}
    jobs = {j.study_role: j for j in store.list_jobs(study_id=study_id)}
    pending = False
    for role, pre in runs.items():
        if not role.startswith("pretrain:"):
            continue
        if pre.status not in TERMINAL_STATUSES:
            pending = True
            continue
        kept = [c.epoch for c in store.checkpoints(pre.id)]
        if pre.status != "finished" or not kept:
            continue                      # failed, cancelled or non-finite: no solution to branch from
        last = kept[-1]
        forks = {}
        for flr in spec["finetune_elrs"]:
            key = f"finetune:{pre.id}:{flr:g}"
            if key not in runs:
                _fork(store, study_id, pre, last, flr, spec, key, reserve_for)
                pending = True
            else:
                forks[flr] = runs[key]
                pending |= runs[key].status not in TERMINAL_STATUSES
        average_key = f"average:{pre.id}"
        if average_key not in jobs:
            store.create_job("average", pre.id, {"epochs": kept[-spec["average"]:]}, reserved_for=reserve_for,
                             study_id=study_id, study_role=average_key)
            pending = True
            continue
        pending |= jobs[average_key].status not in ("finished", "failed")
        finished = {flr: run for flr, run in forks.items() if run.status == "finished"}
        if len(forks) < len(spec["finetune_elrs"]) or any(r.status not in TERMINAL_STATUSES for r in forks.values()):
            continue
        solution = {flr: {"run": run.id, "epoch": spec["pretrain_epochs"] + spec["finetune_epochs"]}
                    for flr, run in finished.items()}
        swa = {"run": pre.id, "epochs": kept[-spec["average"]:]}
        pairs = [(f"finetune@{flr:g}", "average", solution[flr], swa) for flr in sorted(solution)]
        if len(solution) >= 2:
            low, high = min(solution), max(solution)
            pairs.append((f"finetune@{low:g}", f"finetune@{high:g}", solution[low], solution[high]))
        for a_name, b_name, a, b in pairs:
            key = f"geometry:{pre.id}:{a_name}:{b_name}"
            if key not in jobs:
                store.create_job("geometry", pre.id, {"a": a, "b": b, "points": spec.get("points", GEOMETRY_POINTS),
                                                      "names": [a_name, b_name]},
                                 other_run_id=b["run"], reserved_for=reserve_for, study_id=study_id, study_role=key)
                pending = True
            else:
                pending |= jobs[key].status not in ("finished", "failed")
    if not pending:
        store.set_study_status(study_id, "finished")
    return not pending


def _fork(store: Store, study_id: int, pre, epoch: int, flr: float, spec: dict, role: str,
          reserve_for: str | None) -> None:
    cfg = RunConfig.from_dict(pre.config).replace(elr=flr, epochs=epoch + spec["finetune_epochs"], keep_last=1,
                                                  name=None).validate()
    store.create_runs([{"config": cfg.to_dict(), "name": f"#{pre.id}@{epoch} FLR {flr:g}",
                        "tags": list(cfg.tags), "parent_id": pre.id, "fork_epoch": epoch,
                        "reserved_for": reserve_for, "study_id": study_id, "study_role": role}])


# ---- the report ------------------------------------------------------------------------------------------

def _stats(values: list[float]) -> dict | None:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return None
    return {"mean": statistics.fmean(values), "std": statistics.pstdev(values) if len(values) > 1 else 0.0,
            "n": len(values)}


def _final(store: Store, run, key: str = "test_acc") -> float | None:
    if run is None or run.status != "finished":
        return None
    latest = store.latest_metrics(run.id).get(key)
    return latest[1] if latest else None


def report(store: Store, study_id: int) -> dict:
    """The study's table (SPEC §10): per PLR, aggregated over seeds (mean, std, n): the regime of the
    pre-training trace, the sub-regime 2A/2B of chaotic rows from their barriers, test accuracy of the
    pre-trained, fine-tuned (per FLR) and averaged models, feature accuracies, the geometry; the
    estimated regime boundaries; where the best model came from, and the best of the converged PLRs
    (what a practitioner who avoids large learning rates would get), to compare with."""
    study = store.get_study(study_id)
    spec = study.spec
    runs = {r.study_role: r for r in store.list_runs(study_id=study_id)}
    jobs = {j.study_role: j for j in store.list_jobs(study_id=study_id)}
    per_seed = []
    for elr in spec["pretrain_elrs"]:
        for seed in spec["seeds"]:
            pre = runs.get(f"pretrain:{elr:g}:{seed}")
            if pre is None:
                continue
            entry = {"pretrain_elr": elr, "seed": seed, "run": pre.id, "status": pre.status,
                     "regime": analyze_stored(store, pre.id)["regime"] if pre.step else None,
                     "pretrain_test_acc": _final(store, pre),
                     "pretrain_feature_acc": _features(store, pre),
                     "finetune_test_acc": {}, "finetune_runs": {}, "finetune_feature_acc": {}}
            for flr in spec["finetune_elrs"]:
                fork = runs.get(f"finetune:{pre.id}:{flr:g}")
                entry["finetune_test_acc"][f"{flr:g}"] = _final(store, fork)
                entry["finetune_runs"][f"{flr:g}"] = fork.id if fork else None
                entry["finetune_feature_acc"][f"{flr:g}"] = _features(store, fork)
            swa = jobs.get(f"average:{pre.id}")
            result = swa.result if swa is not None and swa.status == "finished" else None
            entry["average_test_acc"] = result["test_acc"] if result else None
            entry["average_feature_acc"] = ([result[f"feature_acc/{k}"] for k in range(16)]
                                            if result and "feature_acc/0" in result else None)
            entry["geometry"] = [{"pair": list(j.spec.get("names", [])), "angle": j.result["angle"],
                                  "barrier_test_err": j.result["barrier"]["test_err"],
                                  "barrier_train_loss": j.result["barrier"]["train_loss"]}
                                 for role, j in sorted(jobs.items())
                                 if role.startswith(f"geometry:{pre.id}:") and j.status == "finished"]
            entry["subregime"] = _subregime(entry["regime"], [(g["barrier_test_err"], g["barrier_train_loss"])
                                                              for g in entry["geometry"]])
            per_seed.append(entry)
    rows = [_aggregate(elr, [e for e in per_seed if e["pretrain_elr"] == elr], spec) for elr in spec["pretrain_elrs"]]
    boundaries = _boundaries(rows)
    return {"study": study_id, "name": study.name, "status": study.status, "spec": spec, "rows": rows,
            "runs": per_seed, "boundaries": boundaries, "best": _best(rows, boundaries),
            "best_converged": _best(rows, boundaries, "convergence")}


def _features(store: Store, run) -> list[float] | None:
    if run is None or run.status != "finished":
        return None
    latest = store.latest_metrics(run.id)
    if "feature_acc/0" not in latest:
        return None
    return [latest[f"feature_acc/{k}"][1] for k in range(16)]


def _subregime(regime: str | None, barriers: list[tuple[float, float]]) -> str | None:
    """2A: the solutions share one basin (every (test-error, train-loss) barrier within BASIN_BARRIER,
    BASIN_LOSS_BARRIER); 2B: not. Only chaotic-equilibrium rows have a sub-regime."""
    if regime != "chaotic_equilibrium" or not barriers:
        return None
    return "2A" if all(err <= BASIN_BARRIER and loss <= BASIN_LOSS_BARRIER for err, loss in barriers) else "2B"


def _majority(labels: list) -> str | None:
    """The label most seeds got; None when none did (no labels, or a tie: the seeds disagree, as at a
    boundary, and `regime_agreement` shows by how much)."""
    ranked = Counter(x for x in labels if x).most_common(2)
    if not ranked or (len(ranked) == 2 and ranked[0][1] == ranked[1][1]):
        return None
    return ranked[0][0]


def _aggregate(elr: float, entries: list[dict], spec: dict) -> dict:
    pairs = {}
    for e in entries:
        for g in e["geometry"]:
            pairs.setdefault(" vs ".join(g["pair"]), []).append(g)
    regime = _majority([e["regime"] for e in entries])
    geometry = [{"pair": name.split(" vs "), "angle": _stats([g["angle"] for g in gs]),
                 "barrier_test_err": _stats([g["barrier_test_err"] for g in gs]),
                 "barrier_train_loss": _stats([g["barrier_train_loss"] for g in gs])}
                for name, gs in pairs.items()]
    return {
        "pretrain_elr": elr, "seed": [e["seed"] for e in entries], "runs": [e["run"] for e in entries],
        "regime": regime,
        "regime_agreement": (max(Counter(e["regime"] for e in entries if e["regime"]).values(), default=0),
                             len(entries)),
        "subregime": _subregime(regime, [(g["barrier_test_err"]["mean"], g["barrier_train_loss"]["mean"])
                                         for g in geometry if g["barrier_test_err"] and g["barrier_train_loss"]]),
        "pretrain_test_acc": _stats([e["pretrain_test_acc"] for e in entries]),
        "finetune_test_acc": {f"{flr:g}": _stats([e["finetune_test_acc"][f"{flr:g}"] for e in entries])
                              for flr in spec["finetune_elrs"]},
        "average_test_acc": _stats([e["average_test_acc"] for e in entries]),
        "feature_acc": {kind: _mean_vectors([e[key] for e in entries]) for kind, key in
                        (("pretrain", "pretrain_feature_acc"), ("average", "average_feature_acc"))}
        | {f"finetune@{flr:g}": _mean_vectors([e["finetune_feature_acc"][f"{flr:g}"] for e in entries])
           for flr in spec["finetune_elrs"]},
        "geometry": geometry,
    }


def _mean_vectors(vectors: list) -> list[float] | None:
    vectors = [v for v in vectors if v]
    return [statistics.fmean(column) for column in zip(*vectors)] if vectors else None


REGIME_ORDER = {"convergence": 0, "chaotic_equilibrium": 1, "divergence": 2}


def _boundaries(rows: list[dict]) -> dict:
    """Geometric means of neighbouring PLRs whose (majority) labels differ: convergence/chaotic
    (1->2), 2A/2B, chaotic/divergence (2->3); None where the grid shows no such change."""
    labelled = [(r["pretrain_elr"], r["regime"], r["subregime"]) for r in sorted(rows, key=lambda r: r["pretrain_elr"])
                if r["regime"] in REGIME_ORDER]

    def between(left, right):
        for (e1, r1, s1), (e2, r2, s2) in zip(labelled, labelled[1:]):
            if left(r1, s1) and right(r2, s2):
                return math.sqrt(e1 * e2)
        return None

    return {"convergence_chaotic": between(lambda r, s: r == "convergence", lambda r, s: r != "convergence"),
            "2A_2B": between(lambda r, s: s == "2A", lambda r, s: s == "2B"),
            "chaotic_divergence": between(lambda r, s: r != "divergence", lambda r, s: r == "divergence")}


def _best(rows: list[dict], boundaries: dict, regime: str | None = None) -> dict | None:
    """The highest mean test accuracy over pre-trained, fine-tuned and averaged models (of rows in
    `regime`, else of all), with its spread and its PLR's ratio to the convergence threshold."""
    candidates = []
    for r in rows:
        if regime is not None and r["regime"] != regime:
            continue
        options = [("pretrain", r["pretrain_test_acc"]), ("average", r["average_test_acc"])]
        options += [(f"finetune@{flr}", acc) for flr, acc in r["finetune_test_acc"].items()]
        candidates += [(acc["mean"], r["pretrain_elr"], kind, acc) for kind, acc in options if acc]
    if not candidates:
        return None
    _, elr, kind, acc = max(candidates, key=lambda c: c[0])
    threshold = boundaries["convergence_chaotic"]
    return {"pretrain_elr": elr, "kind": kind, "test_acc": acc,
            "ratio_to_convergence_threshold": elr / threshold if threshold else None}
