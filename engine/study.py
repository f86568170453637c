"""The learning-rate study (the large-LR paper's protocol) as one object in the store: pre-train a
sweep of ELRs (PLR) on the sphere, fine-tune every end point at small ELRs (FLR), average its last K
kept checkpoints (SWA), and measure the geometry between its solutions; then report what the data
support. Torch-free: the study creates runs and jobs; the engine (this CLI process or the workers)
trains and computes them.

Every run and job of a study has a role (pretrain:ELR:DATA_SEED:SEED, finetune:PARENT:FLR,
average:PARENT, geometry:PARENT:A:B), unique within the study, so `advance` can be called any number
of times, by any number of processes, and each piece is created once: an interrupted study resumes
where it stopped. (Studies made before data seeds were replicated have pretrain:ELR:SEED roles.)

Statistics (what a verdict may claim): the unit of evidence is a (data seed, run seed) **pair**.
Options (pre-trained, fine-tuned at each FLR, averaged) are **selected on validation accuracy** and
every accuracy reported is **test** accuracy. Per pair, the gain is the test accuracy of its best 2A
option minus that of its best option from a PLR where *its own* run converged; over pairs, the mean
gain with a seeded percentile-bootstrap 95% interval decides the verdict.
"""
from __future__ import annotations

import math
import statistics
from collections import Counter

import numpy as np

from storage import TERMINAL_STATUSES, Store

from . import registry
from .config import ConfigError, RunConfig
from .submission import check_data, default_sweep_name

# Sub-regime 2A/2B: a chaotic-equilibrium run whose solutions (each fine-tuned point and the average)
# lie in one basin has near-zero loss and error barriers between them; the paper (ResNet18SI) reports ~0
# in 2A and 30-80% error barriers between separate basins. Decided per pair from that pair's own
# barriers: the validation-error barrier (test error for studies without a validation split) and the
# train-loss barrier, both within their limits = 2A. The limits were measured on the ticks preset of
# an earlier version (3 seeds, 2,000 test points: one point = 0.05%), the largest seed-mean barrier of
# a row:
#   PLR        1e-3..5.6e-3   1e-2     1.8e-2   3.2e-2   5.6e-2 (divergence)
#   test err   <= 0.08%       0.54%    0.47%    1.07%    3.5%
#   train loss 0              0.0017   0.0056   0.0365   0.82
# Inside one basin (PLR <= 1.8e-2) both stay near half of these limits or below; at 3.2e-2, where the
# averages collapse, the loss barrier is 3.6x its limit. They are a rule of thumb for this toy, not a
# law: README says so beside the study's table.
BASIN_BARRIER = 0.01          # validation (or test) error (fraction)
BASIN_LOSS_BARRIER = 0.01     # train loss (nats)
GEOMETRY_POINTS = 21

# Refinement: after the coarse grid, PLRs at these multiples of the estimated convergence threshold: at
# it and across the range just above it where the paper finds 2A. With the grid's last converged PLR
# (the threshold's converged neighbour) they sample the strongest converged baseline and the 2A range.
REFINE_FACTORS = (1.0, 1.15, 1.33, 1.5, 2.0)
REFINE_MIN_RATIO = 1.05       # a refined PLR this close (ratio) to one already in the grid is skipped

# The paired comparison's bootstrap: percentile interval over pairs, seeded (the same pairs give the
# same interval on every machine).
BOOTSTRAP_RESAMPLES = 4000
BOOTSTRAP_SEED = 20250
# Fewer pairs than this give no verdict but "not separated": resampling n pairs has few distinct
# outcomes (n = 2: 3, n = 5: 126), so a percentile interval over them says little.
MIN_PAIRS_FOR_VERDICT = 5
OPTIONS = ("pretrain", "average")          # and finetune@FLR for each FLR


def create_study(store_or_url, base: RunConfig, *, pretrain_elrs: list[float], pretrain_epochs: int,
                 finetune_elrs: list[float], finetune_epochs: int, average: int, seeds: list[int],
                 data_seeds: list[int] | None = None, refine: bool = True, points: int = GEOMETRY_POINTS,
                 name: str | None = None, reserve_for: str | None = None) -> int:
    """Validate everything, then create the study and its pre-training sweep (one transaction); returns
    the study id. `store_or_url` may be a Store or a callable returning one, opened only once the input
    has been checked (bad input leaves no database file behind). ConfigError (one line) on bad input,
    before anything is written."""
    plan = check_study(base, pretrain_elrs=pretrain_elrs, pretrain_epochs=pretrain_epochs,
                       finetune_elrs=finetune_elrs, finetune_epochs=finetune_epochs, average=average, seeds=seeds,
                       data_seeds=data_seeds, refine=refine, points=points)
    spec, configs = plan["spec"], plan["configs"]
    store = store_or_url() if callable(store_or_url) else store_or_url
    swept = {"elr": list(spec["pretrain_elrs"]), **({"seed": spec["seeds"]} if len(spec["seeds"]) > 1 else {}),
             **({"data_seed": spec["data_seeds"]} if len(spec["data_seeds"]) > 1 else {})}
    name = name or f"study {default_sweep_name(plan['base'], swept)}"
    items = [{"config": c.to_dict(), "name": c.display_name() + (f" data={c.data_seed}" if len(spec["data_seeds"]) > 1
                                                                 else ""),
              "tags": list(c.tags), "reserved_for": reserve_for, "study_role": pretrain_role(c.elr, c.data_seed, c.seed)}
             for c in configs]
    return store.create_study(name, spec, items, owner=reserve_for)


def _distinct(values: list[float], flag: str, example: str) -> None:
    """Every value positive and finite, none twice, and no two that print alike (roles key on :g)."""
    if not values or not all(isinstance(e, (int, float)) and e > 0 and math.isfinite(e) for e in values):
        raise ConfigError(f"{flag} needs one or more positive ELRs, e.g. {example}")
    seen: dict[str, float] = {}
    for e in values:
        key = f"{e:g}"
        if key in seen:
            what = "twice" if seen[key] == e else f"twice in effect ({seen[key]!r} and {e!r} agree to 6 digits)"
            raise ConfigError(f"{flag} lists {key} {what}: give each rate once")
        seen[key] = e


def check_study(base: RunConfig, *, pretrain_elrs, pretrain_epochs, finetune_elrs, finetune_epochs, average, seeds,
                data_seeds=None, refine=True, points=GEOMETRY_POINTS) -> dict:
    """Everything a study's input must satisfy, checked without a store: {"spec", "configs", "base"}."""
    _distinct(list(pretrain_elrs), "--pretrain-elr", "1e-4:1:13")
    _distinct(list(finetune_elrs), "--finetune-elr", "1e-4 1e-3")
    if base.mode != "sphere":
        raise ConfigError("a study pre-trains and fine-tunes on the sphere at fixed ELRs: drop --mode lrwd")
    if pretrain_epochs < 1 or finetune_epochs < 1:
        raise ConfigError("--pretrain-epochs and --finetune-epochs must each be at least 1")
    if not 2 <= points <= 201:
        raise ConfigError(f"--points must be between 2 and 201, got {points}")
    seeds = list(seeds)
    data_seeds = [base.data_seed] if not data_seeds else list(data_seeds)
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seed lists a seed twice: {seeds}")
    if len(set(data_seeds)) != len(data_seeds):
        raise ConfigError(f"--data-seed lists a data seed twice: {data_seeds}")
    if not 1 <= average <= pretrain_epochs:
        raise ConfigError(f"--average K must be between 1 and --pretrain-epochs ({pretrain_epochs}): the "
                          f"pre-training keeps one checkpoint per epoch for its last K epochs, got {average}")
    # the last K epochs kept (their average) and the last one (where the forks start); a validation
    # split to select on
    base = base.replace(epochs=pretrain_epochs, keep_every=0, keep_last=average, name=None, validation=True,
                        data_seed=data_seeds[0])
    configs = [base.replace(elr=elr, seed=seed, data_seed=ds)
               for elr in pretrain_elrs for ds in data_seeds for seed in seeds]
    for flr in finetune_elrs:
        base.replace(elr=flr, epochs=pretrain_epochs + finetune_epochs)
    check_data(configs[:1])
    spec = {"base": base.to_dict(), "pretrain_elrs": list(pretrain_elrs), "seeds": seeds, "data_seeds": data_seeds,
            "pretrain_epochs": pretrain_epochs, "finetune_elrs": list(finetune_elrs),
            "finetune_epochs": finetune_epochs, "average": average, "points": points, "refine": bool(refine)}
    return {"spec": spec, "configs": configs, "base": base}


def pretrain_role(elr: float, data_seed: int, seed: int) -> str:
    return f"pretrain:{elr:g}:{data_seed}:{seed}"


def _pretrain_key(role: str, spec: dict) -> tuple[float, int, int] | None:
    """(PLR, data seed, seed) of a pre-training role, either format; None for other roles."""
    parts = role.split(":")
    if parts[0] != "pretrain":
        return None
    if len(parts) == 3:                          # a study from before data seeds: the base's data seed
        return float(parts[1]), spec["base"].get("data_seed", 0), int(parts[2])
    return float(parts[1]), int(parts[2]), int(parts[3])


def _data_seeds(spec: dict) -> list[int]:
    return spec.get("data_seeds") or [spec["base"].get("data_seed", 0)]


def advance(store: Store, study_id: int, reserve_for: str | None = None) -> bool:
    """Create whatever the finished pieces now allow (the refined PLRs once the coarse grid is done,
    forks and averages of finished pre-training runs, geometries of finished forks); when nothing is
    left, mark the study finished, or failed when a run or job it needed failed (`study --resume`
    retries those). Returns True when the study has ended. Safe to call again and from several processes."""
    study = store.get_study(study_id)
    if study.status != "running":
        return True
    spec = study.spec
    runs = {r.study_role: r for r in store.list_runs(study_id=study_id)}
    jobs = {j.study_role: j for j in store.list_jobs(study_id=study_id)}
    pending = _refine(store, study_id, spec, runs, reserve_for)
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
        store.set_study_status(study_id, "failed" if failures(store, study_id) else "finished")
    return not pending


def _refine(store: Store, study_id: int, spec: dict, runs: dict, reserve_for: str | None) -> bool:
    """Once every coarse pre-training run has ended, queue the refined PLRs around the threshold
    estimated from them (refine_elrs); True while the coarse grid is still running."""
    if not spec.get("refine"):
        return False
    coarse = {f"{e:g}" for e in spec["pretrain_elrs"]}
    labelled = []
    for role, run in runs.items():
        key = _pretrain_key(role, spec)
        if key is None or f"{key[0]:g}" not in coarse:
            continue
        if run.status not in TERMINAL_STATUSES:
            return True
        labelled.append({"pretrain_elr": key[0], "pair": (key[1], key[2]), "regime": run.regime})
    threshold = convergence_threshold(labelled)["estimate"]
    new = refine_elrs(spec["pretrain_elrs"], threshold)
    base = RunConfig.from_dict(spec["base"])
    items = []
    for elr in new:
        for ds in _data_seeds(spec):
            for seed in spec["seeds"]:
                role = pretrain_role(elr, ds, seed)
                if role in runs:
                    continue
                cfg = base.replace(elr=elr, seed=seed, data_seed=ds)
                items.append({"config": cfg.to_dict(), "name": f"{cfg.display_name()} data={ds} (refined)",
                              "tags": list(cfg.tags), "reserved_for": reserve_for, "study_id": study_id,
                              "study_role": role})
    if items:
        store.create_runs(items)
    return bool(items)


def refine_elrs(grid: list[float], threshold: float | None) -> list[float]:
    """The PLRs refinement adds: REFINE_FACTORS x the threshold (3 significant digits), each unless a PLR
    of the grid (or an earlier one of these) lies within REFINE_MIN_RATIO of it; none without a threshold."""
    if not threshold:
        return []
    taken, added = list(grid), []
    for factor in REFINE_FACTORS:
        elr = float(f"{threshold * factor:.3g}")
        if all(max(elr / e, e / elr) >= REFINE_MIN_RATIO for e in taken):
            taken.append(elr)
            added.append(elr)
    return added


def failures(store: Store, study_id: int) -> list[str]:
    """One line per run or job the study needed that failed or was cancelled (non-finite runs are
    divergence, an outcome, not a failure)."""
    lines = [f"run {r.id} ({r.study_role}): {r.status}" + (f": {(r.error or '').splitlines()[0]}" if r.error else "")
             for r in store.list_runs(study_id=study_id, status=["failed", "cancelled"])]
    lines += [f"{j.kind} job {j.id} ({j.study_role}): failed" + (f": {(j.error or '').splitlines()[0]}" if j.error else "")
              for j in store.list_jobs(study_id=study_id, status="failed")]
    return sorted(lines)


def _fork(store: Store, study_id: int, pre, epoch: int, flr: float, spec: dict, role: str,
          reserve_for: str | None) -> None:
    cfg = RunConfig.from_dict(pre.config).replace(elr=flr, epochs=epoch + spec["finetune_epochs"], keep_last=1,
                                                  name=None)
    store.create_runs([{"config": cfg.to_dict(), "name": f"#{pre.id}@{epoch} FLR {flr:g}",
                        "tags": list(cfg.tags), "parent_id": pre.id, "fork_epoch": epoch,
                        "reserved_for": reserve_for, "study_id": study_id, "study_role": role}])


# ---- statistics (pure functions of numbers: tests/test_study.py checks them on made-up inputs) -------------

def bootstrap(values: list[float], resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED) -> dict | None:
    """Mean of per-pair values with a percentile bootstrap 95% interval (resampling the pairs with
    replacement, numpy's default_rng(seed)), the fraction above 0 and n; None without values."""
    x = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=float)
    if not len(x):
        return None
    means = x[np.random.default_rng(seed).integers(0, len(x), size=(resamples, len(x)))].mean(1)
    low, high = np.percentile(means, [2.5, 97.5])
    return {"mean": float(x.mean()), "ci95": [float(low), float(high)],
            "fraction_positive": float((x > 0).mean()), "n": int(len(x))}


def verdict(gain: dict | None) -> str | None:
    """win when the interval's lower end is above 0, loss when its upper end is below 0, otherwise (and
    with fewer than MIN_PAIRS_FOR_VERDICT pairs) not separated; None without pairs."""
    if not gain:
        return None
    if gain["n"] < MIN_PAIRS_FOR_VERDICT:
        return "not separated"
    low, high = gain["ci95"]
    return "win" if low > 0 else "loss" if high < 0 else "not separated"


def convergence_threshold(runs: list[dict]) -> dict:
    """The convergence threshold from per-run labels ({"pretrain_elr", "pair", "regime"}): per pair, the
    geometric mean of its last converged PLR and the next PLR it was run at, where that one did not
    converge (None for a pair that converged everywhere or nowhere, or that converged again above a
    PLR where it did not: no single threshold); the estimate is the geometric mean over pairs, with the
    smallest and largest."""
    by_pair: dict = {}
    for r in runs:
        by_pair.setdefault(tuple(r["pair"]), []).append((r["pretrain_elr"], r["regime"]))
    per_pair = {}
    for pair, labels in by_pair.items():
        labels = sorted((e, g) for e, g in labels if g)
        flags = [g == "convergence" for _, g in labels]
        if not flags or all(flags) or not any(flags) or not flags[0] or True in flags[flags.index(False):]:
            continue
        i = flags.index(False)
        per_pair[pair] = math.sqrt(labels[i - 1][0] * labels[i][0])
    values = list(per_pair.values())
    estimate = math.exp(statistics.fmean(math.log(v) for v in values)) if values else None
    return {"estimate": estimate, "range": [min(values), max(values)] if values else None,
            "per_pair": [[*pair, v] for pair, v in sorted(per_pair.items())], "n": len(values)}


def subregime(regime: str | None, barriers: list[tuple[float, float]]) -> str | None:
    """2A: the solutions share one basin (every (error, train-loss) barrier within BASIN_BARRIER,
    BASIN_LOSS_BARRIER); 2B: not. Only chaotic-equilibrium runs have a sub-regime."""
    if regime != "chaotic_equilibrium" or not barriers:
        return None
    return "2A" if all(err <= BASIN_BARRIER and loss <= BASIN_LOSS_BARRIER for err, loss in barriers) else "2B"


_subregime = subregime


def agreed(labels: list) -> str | None:
    """The label every labelled pair got; None when they disagree or none has one."""
    found = {x for x in labels if x}
    return found.pop() if len(found) == 1 else None


def _majority(labels: list) -> str | None:
    """The label most runs got; None when none did (no labels, or a tie: the runs disagree, as at a
    boundary, and `regime_agreement` shows by how much)."""
    ranked = Counter(x for x in labels if x).most_common(2)
    if not ranked or (len(ranked) == 2 and ranked[0][1] == ranked[1][1]):
        return None
    return ranked[0][0]


def _options(entry: dict) -> list[tuple[str, float | None, float | None]]:
    """(kind, accuracy selected on, test acc) of each solution of one pre-training run: the selection
    is on validation accuracy; a study made before validation splits has none and selects on test
    (its report says `"selection": "test"`)."""
    out = [("pretrain", entry["pretrain_val_acc"], entry["pretrain_test_acc"]),
           ("average", entry["average_val_acc"], entry["average_test_acc"])]
    out += [(f"finetune@{f}", entry["finetune_val_acc"][f], entry["finetune_test_acc"][f])
            for f in entry["finetune_test_acc"]]
    return [(kind, test if val is None else val, test) for kind, val, test in out]


def _chosen(entries: list[dict]) -> dict | None:
    """The option of highest validation accuracy among these runs' solutions (ties: the smaller PLR,
    then the order of _options), with its test accuracy."""
    best = None
    for e in sorted(entries, key=lambda e: e["pretrain_elr"]):
        for kind, val, test in _options(e):
            if val is None or test is None:
                continue
            if best is None or val > best["val_acc"]:
                best = {"pretrain_elr": e["pretrain_elr"], "kind": kind, "val_acc": val, "test_acc": test}
    return best


def paired_gains(entries: list[dict]) -> list[dict]:
    """Per (data seed, seed) pair: its best 2A option and its best option from a PLR where its own run
    converged, each chosen on validation accuracy, and the gain in test accuracy between them (pairs
    without both are left out)."""
    by_pair: dict = {}
    for e in entries:
        by_pair.setdefault((e["data_seed"], e["seed"]), []).append(e)
    out = []
    for (ds, seed), mine in sorted(by_pair.items()):
        converged = _chosen([e for e in mine if e["regime"] == "convergence"])
        best_2a = _chosen([e for e in mine if e["subregime"] == "2A"])
        if converged and best_2a:
            out.append({"data_seed": ds, "seed": seed, "best_2A": best_2a, "best_converged": converged,
                        "gain": best_2a["test_acc"] - converged["test_acc"]})
    return out


def subregime_boundary(entries: list[dict]) -> dict:
    """Per pair, the 2A/2B boundary: the geometric mean of its largest 2A PLR and the next chaotic PLR,
    where that one is 2B (a pair with 2B below 2A, or without both, has none). Over pairs: the geometric
    mean with a bootstrap 95% interval (of log10), and `determined` only when every pair with a
    sub-regime has a boundary and they all fall in the same grid interval."""
    by_pair: dict = {}
    for e in entries:
        if e["subregime"]:
            by_pair.setdefault((e["data_seed"], e["seed"]), []).append((e["pretrain_elr"], e["subregime"]))
    per_pair = {}
    for pair, labels in by_pair.items():
        labels.sort()
        subs = [s for _, s in labels]
        if "2A" in subs and "2B" in subs:
            i = len(subs) - 1 - subs[::-1].index("2A")
            if i + 1 < len(subs) and "2A" not in subs[i + 1:] and "2B" not in subs[:i]:
                per_pair[pair] = math.sqrt(labels[i][0] * labels[i + 1][0])
    values = list(per_pair.values())
    stats = bootstrap([math.log10(v) for v in values]) if values else None
    return {"estimate": 10 ** stats["mean"] if stats else None,
            "ci95": [10 ** c for c in stats["ci95"]] if stats else None, "n": len(values),
            "pairs_with_subregime": len(by_pair),
            "determined": bool(values) and len(values) == len(by_pair) and len({round(v, 12) for v in values}) == 1,
            "per_pair": [[*pair, v] for pair, v in sorted(per_pair.items())]}


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


def _elrs(spec: dict, runs: dict) -> list[float]:
    """The study's PLRs: the coarse grid and any refined ones, ascending."""
    found = {f"{e:g}": e for e in spec["pretrain_elrs"]}
    for role in runs:
        key = _pretrain_key(role, spec)
        if key is not None:
            found.setdefault(f"{key[0]:g}", key[0])
    return sorted(found.values())


def report(store: Store, study_id: int) -> dict:
    """The study's report. Per pre-training run (`runs`): its regime, its pair's sub-regime from its own
    barriers, validation and test accuracy of each solution. Per PLR (`rows`, aggregated over pairs:
    mean, std, n): the regime most runs got and how many agree, the sub-regime when the pairs agree,
    accuracies, feature accuracies, geometry, and the option chosen there on validation. Then the
    estimated boundaries, `best` and `best_converged` (chosen on mean validation accuracy; the converged
    one only over runs labelled converged), the paired comparison (`pairs`, `gain`, `verdict`) and the
    failures, if any."""
    study = store.get_study(study_id)
    spec = study.spec
    runs = {r.study_role: r for r in store.list_runs(study_id=study_id)}
    jobs = {j.study_role: j for j in store.list_jobs(study_id=study_id)}
    legacy = "data_seeds" not in spec
    elrs = _elrs(spec, runs)
    coarse = {f"{e:g}" for e in spec["pretrain_elrs"]}
    per_seed = []
    for elr in elrs:
        for ds in _data_seeds(spec):
            for seed in spec["seeds"]:
                pre = runs.get(f"pretrain:{elr:g}:{seed}" if legacy else pretrain_role(elr, ds, seed))
                if pre is not None:
                    per_seed.append(_entry(store, pre, elr, ds, seed, spec, runs, jobs))
    rows = [_aggregate(elr, [e for e in per_seed if e["pretrain_elr"] == elr], spec, f"{elr:g}" not in coarse)
            for elr in elrs]
    boundaries = _boundaries(rows)
    threshold = convergence_threshold([{"pretrain_elr": e["pretrain_elr"], "pair": (e["data_seed"], e["seed"]),
                                        "regime": e["regime"]} for e in per_seed])
    boundaries["convergence_chaotic"] = threshold["estimate"] or boundaries["convergence_chaotic"]
    sub_boundary = subregime_boundary(per_seed)
    boundaries["2A_2B"] = sub_boundary["estimate"] if sub_boundary["determined"] else None
    pairs = paired_gains(per_seed)
    gain = bootstrap([p["gain"] for p in pairs])
    return {"study": study_id, "name": study.name, "status": study.status, "spec": spec, "rows": rows,
            "runs": per_seed, "boundaries": boundaries,
            "thresholds": {"convergence_chaotic": threshold, "2A_2B": sub_boundary},
            "selection": "validation" if spec["base"].get("validation") else "test",
            "best": _best(rows, boundaries), "best_converged": _best(rows, boundaries, converged_only=True),
            "pairs": pairs, "gain": gain, "verdict": verdict(gain),
            "refined_elrs": [r["pretrain_elr"] for r in rows if r["refined"]],
            "failures": failures(store, study_id)}


def _entry(store: Store, pre, elr: float, ds: int, seed: int, spec: dict, runs: dict, jobs: dict) -> dict:
    entry = {"pretrain_elr": elr, "data_seed": ds, "seed": seed, "run": pre.id, "status": pre.status,
             "regime": pre.regime if pre.status in TERMINAL_STATUSES else None,
             "pretrain_test_acc": _final(store, pre), "pretrain_val_acc": _final(store, pre, "val_acc"),
             "pretrain_feature_acc": _features(store, pre),
             "finetune_test_acc": {}, "finetune_val_acc": {}, "finetune_runs": {}, "finetune_feature_acc": {}}
    for flr in spec["finetune_elrs"]:
        fork = runs.get(f"finetune:{pre.id}:{flr:g}")
        entry["finetune_test_acc"][f"{flr:g}"] = _final(store, fork)
        entry["finetune_val_acc"][f"{flr:g}"] = _final(store, fork, "val_acc")
        entry["finetune_runs"][f"{flr:g}"] = fork.id if fork else None
        entry["finetune_feature_acc"][f"{flr:g}"] = _features(store, fork)
    swa = jobs.get(f"average:{pre.id}")
    result = swa.result if swa is not None and swa.status == "finished" else None
    entry["average_test_acc"] = result["test_acc"] if result else None
    entry["average_val_acc"] = result.get("val_acc") if result else None
    entry["average_feature_acc"] = _feature_vector(result or {}, lambda key: result[key])
    held_out = "val_err" if spec["base"].get("validation") else "test_err"
    entry["geometry"] = [{"pair": list(j.spec.get("names", [])), "angle": j.result["angle"],
                          "barrier_test_err": j.result["barrier"]["test_err"],
                          "barrier_val_err": j.result["barrier"].get("val_err"),
                          "barrier_train_loss": j.result["barrier"]["train_loss"]}
                         for role, j in sorted(jobs.items())
                         if role.startswith(f"geometry:{pre.id}:") and j.status == "finished"]
    entry["subregime"] = subregime(entry["regime"], [(g[f"barrier_{held_out}"], g["barrier_train_loss"])
                                                     for g in entry["geometry"] if g[f"barrier_{held_out}"] is not None])
    return entry


FEATURE_FAMILY = "feature_acc/<k>"


def _feature_vector(values: dict, value) -> list[float] | None:
    """The feature accuracies among `values` (a run's latest metrics, an average's result) in feature
    order, value(key) each; as many as were measured (the dataset's feature count: 16 on ticks), None
    when there are none (not ticks)."""
    keys = registry.members(values, FEATURE_FAMILY)
    return [value(key) for key in keys] or None


def _features(store: Store, run) -> list[float] | None:
    if run is None or run.status != "finished":
        return None
    latest = store.latest_metrics(run.id)
    return _feature_vector(latest, lambda key: latest[key][1])


def _aggregate(elr: float, entries: list[dict], spec: dict, refined: bool = False) -> dict:
    pairs = {}
    for e in entries:
        for g in e["geometry"]:
            pairs.setdefault(" vs ".join(g["pair"]), []).append(g)
    regime = _majority([e["regime"] for e in entries])
    geometry = [{"pair": name.split(" vs "), "angle": _stats([g["angle"] for g in gs]),
                 "barrier_test_err": _stats([g["barrier_test_err"] for g in gs]),
                 "barrier_val_err": _stats([g["barrier_val_err"] for g in gs]),
                 "barrier_train_loss": _stats([g["barrier_train_loss"] for g in gs])}
                for name, gs in pairs.items()]
    flrs = [f"{flr:g}" for flr in spec["finetune_elrs"]]
    votes = Counter(e["subregime"] for e in entries if e["subregime"])
    return {
        "pretrain_elr": elr, "refined": refined, "seed": [e["seed"] for e in entries],
        "data_seed": [e["data_seed"] for e in entries], "runs": [e["run"] for e in entries],
        "regime": regime,
        "regime_agreement": (max(Counter(e["regime"] for e in entries if e["regime"]).values(), default=0),
                             len(entries)),
        # the row's sub-regime only when most runs were chaotic and every pair with one agrees (each from
        # its own barriers)
        "subregime": agreed([e["subregime"] for e in entries]) if regime == "chaotic_equilibrium" else None,
        "subregime_votes": dict(sorted(votes.items())),
        "pretrain_test_acc": _stats([e["pretrain_test_acc"] for e in entries]),
        "pretrain_val_acc": _stats([e["pretrain_val_acc"] for e in entries]),
        "finetune_test_acc": {f: _stats([e["finetune_test_acc"][f] for e in entries]) for f in flrs},
        "finetune_val_acc": {f: _stats([e["finetune_val_acc"][f] for e in entries]) for f in flrs},
        "average_test_acc": _stats([e["average_test_acc"] for e in entries]),
        "average_val_acc": _stats([e["average_val_acc"] for e in entries]),
        "feature_acc": {kind: _mean_vectors([e[key] for e in entries]) for kind, key in
                        (("pretrain", "pretrain_feature_acc"), ("average", "average_feature_acc"))}
        | {f"finetune@{f}": _mean_vectors([e["finetune_feature_acc"][f] for e in entries]) for f in flrs},
        "geometry": geometry,
        "chosen": _row_choice(entries),
        # a mostly-converged PLR's converged runs (one run that converged at a chaotic PLR is a pair's
        # baseline in `pairs`, but no PLR's: a mean over one run would win on luck)
        "chosen_converged": _row_choice(entries, lambda e: e["regime"] == "convergence") if regime == "convergence"
        else None,
    }


def _row_choice(entries: list[dict], keep=lambda e: True) -> dict | None:
    """The option (pretrain, average, finetune@FLR) of highest mean validation accuracy over these runs
    (those `keep` accepts), with the mean test accuracy of the same runs: what this PLR offers."""
    best = None
    chosen = [e for e in entries if keep(e)]
    kinds = ["pretrain", "average", *(f"finetune@{f}" for f in (chosen[0]["finetune_test_acc"] if chosen else ()))]
    for kind in kinds:
        pairs = [(val, test) for e in chosen for k, val, test in _options(e)
                 if k == kind and val is not None and test is not None]
        if not pairs:
            continue
        val = _stats([v for v, _ in pairs])
        if best is None or val["mean"] > best["val_acc"]["mean"]:
            best = {"kind": kind, "val_acc": val, "test_acc": _stats([t for _, t in pairs])}
    return best


def _mean_vectors(vectors: list) -> list[float] | None:
    vectors = [v for v in vectors if v]
    return [statistics.fmean(column) for column in zip(*vectors)] if vectors else None


REGIME_ORDER = {"convergence": 0, "chaotic_equilibrium": 1, "divergence": 2}


def _boundaries(rows: list[dict]) -> dict:
    """Geometric means of neighbouring PLRs whose (majority) labels differ: convergence/chaotic
    (1->2), 2A/2B, chaotic/divergence (2->3); None where the grid shows no such change. The report
    replaces the first two by the per-pair estimates (convergence_threshold, subregime_boundary)."""
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


def _best(rows: list[dict], boundaries: dict, converged_only: bool = False) -> dict | None:
    """The PLR and option of highest mean validation accuracy (`chosen` of each row; with
    converged_only, of the rows most of whose runs converged, over their runs labelled converged only,
    so a run that was chaotic at a mostly-converged PLR is not in it), its test accuracy, and its PLR's
    ratio to the convergence threshold."""
    candidates = []
    for r in rows:
        choice = r.get("chosen_converged") if converged_only else r.get("chosen")
        if choice:
            candidates.append((choice["val_acc"]["mean"], -r["pretrain_elr"], r["pretrain_elr"], choice))
    if not candidates:
        return None
    *_, elr, choice = max(candidates, key=lambda c: (c[0], c[1]))
    threshold = boundaries["convergence_chaotic"]
    return {"pretrain_elr": elr, "kind": choice["kind"], "val_acc": choice["val_acc"], "test_acc": choice["test_acc"],
            "ratio_to_convergence_threshold": elr / threshold if threshold else None}
