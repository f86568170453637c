"""Learning-rate studies (engine.study) for the dashboard: their progress, the report as a
table and a plain-language summary, and the Launch page's study form. Streamlit-free and torch-free
(engine.study and engine.presets are), so tests call it directly."""
from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from engine.config import ConfigError, RunConfig, parse_values
from engine.study import GEOMETRY_POINTS, MIN_PAIRS_FOR_VERDICT, create_study, report
from storage import TERMINAL_STATUSES, Store

from . import charts
from .launch import FIELDS, form_message
from .study_charts import accuracy_of, kind_phrase, series

JOB_DONE = ("finished", "failed")


# ---- progress -------------------------------------------------------------------------------------
@dataclass
class Progress:
    runs_done: int
    runs_total: int
    jobs_done: int
    jobs_total: int
    status: str
    running: int            # runs being trained now

    @property
    def fraction(self) -> float:
        total = self.runs_total + self.jobs_total
        return (self.runs_done + self.jobs_done) / total if total else 0.0

    def text(self) -> str:
        what = (f"{self.runs_done} of {self.runs_total} runs ended, {self.jobs_done} of {self.jobs_total} "
                "averages and geometries done")
        if self.status == "running":
            return f"Running: {what}" + (f"; {self.running} run(s) training now." if self.running else ".")
        return f"{self.status.capitalize()}: {what}."


def planned(spec: dict) -> tuple[int, int]:
    """(runs, jobs) the coarse grid makes if every pre-training run finishes (refined PLRs are counted
    once they exist): the pre-training sweep (PLRs x seeds x data seeds) and a fork per FLR of each; an average per pre-training run and a geometry per FLR (that FLR's
    solution against the average), plus low FLR against high FLR when there are two or more."""
    pre = planned_pre(spec)
    flrs = len(spec.get("finetune_elrs", []))
    return pre * (1 + flrs), pre * (1 + flrs + (1 if flrs >= 2 else 0))


def planned_pre(spec: dict) -> int:
    return len(spec.get("pretrain_elrs", [])) * len(spec.get("seeds", []) or [0]) * len(spec.get("data_seeds") or [0])


def progress(store: Store, study_id: int, snapshot=None) -> Progress:
    """How far the study has come. A pre-training run that failed makes no forks, average or
    geometry: the totals then count only what the study will still make. snapshot: (info, runs,
    jobs) already read."""
    info, runs, jobs = snapshot or _snapshot(store, study_id)
    runs_total, jobs_total = planned(info.spec)
    flrs = len(info.spec.get("finetune_elrs", []))
    refined = sum(1 for r in runs if (r.study_role or "").startswith("pretrain:")) - planned_pre(info.spec)
    runs_total += max(refined, 0) * (1 + flrs)
    jobs_total += max(refined, 0) * (1 + flrs + (1 if flrs >= 2 else 0))
    dead = sum(1 for r in runs if (r.study_role or "").startswith("pretrain:") and r.is_terminal
               and r.status != "finished")
    runs_total -= dead * flrs
    jobs_total -= dead * (1 + flrs + (1 if flrs >= 2 else 0))
    if info.status != "running":   # ended: what exists is all there will be
        runs_total, jobs_total = len(runs), len(jobs)
    return Progress(runs_done=sum(r.status in TERMINAL_STATUSES for r in runs), runs_total=max(runs_total, len(runs)),
                    jobs_done=sum(j.status in JOB_DONE for j in jobs), jobs_total=max(jobs_total, len(jobs)),
                    status=info.status, running=sum(r.status == "running" for r in runs))


def _snapshot(store: Store, study_id: int):
    return store.get_study(study_id), store.list_runs(study_id=study_id), store.list_jobs(study_id=study_id)


_REPORTS: dict[tuple, tuple] = {}   # (url, study id) -> (version, report): made again only when a piece moved


def state(store: Store, study_id: int) -> tuple[Progress, dict]:
    """(progress, report) of a study. The report (engine.study.report: a regime analysis per
    pre-training run) is remade only when the study, one of its runs (status, step) or one of its
    jobs (status) has changed since the last call, so a page that follows a study every second reads
    three small lists while nothing moves."""
    snapshot = _snapshot(store, study_id)
    info, runs, jobs = snapshot
    version = (info.status, tuple((r.id, r.status, r.step) for r in runs), tuple((j.id, j.status) for j in jobs))
    cached = _REPORTS.get((store.url, study_id))
    if cached is None or cached[0] != version:
        cached = _REPORTS[(store.url, study_id)] = (version, report(store, study_id))
    return progress(store, study_id, snapshot), cached[1]


def study_label(info) -> str:
    return f"#{info.id} {info.name} ({info.status})"


# ---- the report as words and tables ------------------------------------------------------------------
def acc_text(stats: dict | None) -> str:
    """'91.2% ± 0.4% (3)': mean ± std over n seeds; '—' when nothing has finished."""
    if not stats:
        return "—"
    if stats["n"] > 1:
        return f"{stats['mean']:.1%} ± {stats['std']:.1%} ({stats['n']})"
    return f"{stats['mean']:.1%} (1)"


def num_text(stats: dict | None, percent: bool = False) -> str:
    if not stats:
        return "—"
    fmt = (lambda v: f"{v:.2%}") if percent else (lambda v: f"{v:.3g}")
    return fmt(stats["mean"]) + (f" ± {fmt(stats['std'])}" if stats["n"] > 1 else "")


def regime_text(regime: str | None) -> str:
    return (regime or "—").replace("_", " ")


def column_name(kind: str, rep: dict) -> str:
    """A short column title per model: 'pre-trained', 'FLR 0.001', 'average of 5'."""
    if kind.startswith("finetune@"):
        return f"FLR {kind.split('@', 1)[1]}"
    if kind == "average":
        return f"average of {rep.get('spec', {}).get('average', 'K')}"
    return "pre-trained"


def table(rep: dict) -> pd.DataFrame:
    """One row per PLR (refined ones marked *): regime (with how many runs agree), sub-regime (when
    every pair agrees, else the votes), test accuracy of each model (mean ± std (runs)): pre-trained,
    fine-tuned at each FLR, averaged, and the model this PLR offers, chosen on validation; plain text."""
    rows = []
    for row in sorted(rep["rows"], key=lambda r: r["pretrain_elr"]):
        agree, n = row.get("regime_agreement") or (0, 0)
        votes = row.get("subregime_votes") or {}
        line = {"PLR": charts.tick_text(row["pretrain_elr"]) + ("*" if row.get("refined") else ""),
                "regime": (regime_text(row["regime"]) + (f" ({agree}/{n})" if n > 1 else "")) if row["regime"]
                else (f"runs split ({agree}/{n} agree)" if agree else "—"),
                "sub-regime": row.get("subregime") or (("not determined: " + ", ".join(f"{k} {v}" for k, v in
                                                                                       votes.items())) if votes else "—")}
        for kind, label, _ in series(rep):
            line[column_name(kind, rep)] = acc_text(accuracy_of(row, kind))
        chosen = row.get("chosen")
        line[f"chosen on {rep.get('selection', 'test')}"] = (f"{column_name(chosen['kind'], rep)}: "
                                                            f"{acc_text(chosen['test_acc'])}" if chosen else "—")
        rows.append(line)
    return pd.DataFrame(rows)


def geometry_table(rep: dict) -> pd.DataFrame:
    """One row per PLR and geometry pair: angle (rad), validation-error (what 2A/2B is decided on) and
    test-error barriers, train-loss barrier."""
    columns = ["PLR", "pair", "angle (rad)", "val_err barrier", "test_err barrier", "train_loss barrier"]
    rows = [{"PLR": charts.tick_text(row["pretrain_elr"]), "pair": " vs ".join(g["pair"]),
             "angle (rad)": num_text(g["angle"]), "val_err barrier": num_text(g.get("barrier_val_err"), percent=True),
             "test_err barrier": num_text(g["barrier_test_err"], percent=True),
             "train_loss barrier": num_text(g["barrier_train_loss"])}
            for row in sorted(rep["rows"], key=lambda r: r["pretrain_elr"]) for g in row["geometry"]]
    return pd.DataFrame(rows, columns=columns)


def summary(rep: dict, prog: Progress | None = None) -> str:
    """One paragraph saying what the study's data show: which split chose the models, where the best
    model came from (its test accuracy ± std over runs, its PLR against the convergence threshold),
    and the engine's paired comparison of the best 2A option with the best converged one per (data
    seed, seed) pair: a win only when the bootstrap interval's lower end is above 0; otherwise "not
    separated" (with the fraction of pairs that gain) or a loss. Plain text (no names in it), for
    st.markdown after plain.md or for st.write."""
    running = rep.get("status") == "running"
    lead = "So far (the study is still running; numbers change as its pieces end): " if running else ""
    best = rep.get("best")
    if not best:
        return lead + "No model has finished yet: the summary appears once the first pre-training runs end."
    chose = ("Models are chosen on validation accuracy and reported on test." if rep.get("selection") == "validation"
             else "This study has no validation split (it predates them): models are chosen on test accuracy, "
                  "which flatters the winner.")
    by_plr = {row["pretrain_elr"]: row for row in rep["rows"]}
    stats = best["test_acc"]
    row = by_plr.get(best["pretrain_elr"], {})
    runs = f"over {stats['n']} runs" if stats["n"] > 1 else "from one run"
    spread = f" ± {stats['std']:.1%}" if stats["n"] > 1 else ""
    words = [chose, f"The best model comes from PLR {charts.tick_text(best['pretrain_elr'])}: "
                    f"{kind_phrase(best['kind'], rep)}, test accuracy {stats['mean']:.1%}{spread} {runs}."]
    regime = row.get("regime")
    if regime:
        sub = f" (sub-regime {row['subregime']})" if row.get("subregime") else ""
        words.append(f"Its pre-training mostly ended in {regime_text(regime)}{sub}.")
    threshold = (rep.get("boundaries") or {}).get("convergence_chaotic")
    ratio = best.get("ratio_to_convergence_threshold")
    if threshold and ratio:
        words.append(f"That PLR is {ratio:.2g}× the estimated convergence threshold "
                     f"(≈ {charts.tick_text(float(f'{threshold:.2g}'))}, from each run's own label).")
    else:
        words.append("The grid shows no convergence/chaotic boundary, so there is no threshold to compare the PLR with.")
    words.append(comparison_text(rep))
    return lead + " ".join(words)


def comparison_text(rep: dict) -> str:
    """The paired comparison (engine.study: report's gain and verdict) in one or two sentences."""
    gain = rep.get("gain")
    if not gain:
        return ("No (data seed, seed) pair has both a 2A model and a model from a PLR where its own run "
                "converged yet, so there is no paired comparison.")
    low, high = gain["ci95"]
    points = lambda v: f"{v * 100:+.1f}"  # noqa: E731  (percentage points)
    head = (f"Per (data seed, seed) pair, the best 2A model minus the best converged one: mean {points(gain['mean'])} "
            f"percentage points over {gain['n']} pair(s), 95% bootstrap interval {points(low)} to {points(high)}; "
            f"{gain['fraction_positive']:.0%} of pairs gain.")
    if rep.get("verdict") == "win":
        return head + " The interval lies above 0: 2A wins on these data."
    if rep.get("verdict") == "loss":
        return head + " The interval lies below 0: the converged baseline wins on these data."
    if gain["n"] < MIN_PAIRS_FOR_VERDICT:
        return head + (f" Fewer than {MIN_PAIRS_FOR_VERDICT} pairs are too few for a verdict: the data do not "
                       "separate the two.")
    return head + " The interval includes 0: the data do not separate the two."


def gains_table(rep: dict) -> pd.DataFrame:
    """One row per (data seed, seed) pair: its best 2A and best converged option (chosen on validation),
    their test accuracies and the gain."""
    columns = ["data seed", "seed", "best 2A", "its test acc", "best converged", "its test acc ", "gain"]
    rows = [{"data seed": p["data_seed"], "seed": p["seed"],
             "best 2A": f"{kind_phrase(p['best_2A']['kind'], rep)} at PLR {charts.tick_text(p['best_2A']['pretrain_elr'])}",
             "its test acc": f"{p['best_2A']['test_acc']:.1%}",
             "best converged": f"{kind_phrase(p['best_converged']['kind'], rep)} at PLR "
                               f"{charts.tick_text(p['best_converged']['pretrain_elr'])}",
             "its test acc ": f"{p['best_converged']['test_acc']:.1%}", "gain": f"{p['gain'] * 100:+.1f} pt"}
            for p in rep.get("pairs") or []]
    return pd.DataFrame(rows, columns=columns)


# ---- launching ------------------------------------------------------------------------------------------
# The study form's label for each flag of `python -m engine study` (the training flags as on Launch).
STUDY_FIELDS = {**FIELDS, "--pretrain-elr": "Pre-training ELRs (PLR)", "--pretrain-epochs": "Pre-training epochs",
                "--finetune-elr": "Fine-tuning ELRs (FLR)", "--finetune-epochs": "Fine-tuning epochs",
                "--average": "Average the last K", "--seed": "Seeds", "--data-seed": "Data seeds", "--points": "Points on each path",
                "--norm": "Normalisation", "--name": "Study name", "--epochs": "Pre-training epochs"}


@dataclass
class StudyForm:
    """What the Launch page's study form asks for: the flags of `python -m engine study`. Rate lists
    are text as on the command line: values separated by spaces or commas, or a log range
    START:STOP:N. 0 in width and batch_size means the engine's default, 0 in eval_every once per
    epoch."""
    pretrain_elrs: str = "1e-3:0.1:5"
    pretrain_epochs: int = 40
    finetune_elrs: str = "1e-4"
    finetune_epochs: int = 20
    average: int = 5
    seeds: str = "0 1 2 3 4"
    data_seeds: str = "0"
    refine: bool = True
    model: str = "mlp_si"
    width: int = 0
    depth: int = 3
    norm: str = "batch"
    dataset: str = "digits"
    data_dir: str = ""
    batch_size: int = 0
    log_every: int = 10
    eval_every: int = 0
    points: int = GEOMETRY_POINTS
    name: str = ""


def _values(text: str, flag: str, kind=float) -> list:
    parts = [p for p in text.replace(",", " ").split() if p]
    if not parts:
        raise ConfigError(f"{flag} is empty: give one or more values or a log range START:STOP:N")
    try:
        return [v for part in parts for v in parse_values(part, kind)]
    except ConfigError as exc:
        raise ConfigError(f"{flag}: {exc}") from None


def study_args(form: StudyForm) -> dict:
    """create_study's arguments from the form (base config included). ConfigError worded with the
    CLI's flags; launch() words it for the form."""
    base = RunConfig(model=form.model, width=form.width or None, depth=form.depth, norm=form.norm,
                     dataset=form.dataset, data_dir=form.data_dir.strip() or None, mode="sphere",
                     batch_size=form.batch_size or None, log_every=form.log_every, eval_every=form.eval_every or None,
                     validation=True, tags=("study",))   # a study selects on a validation split
    return {"base": base, "pretrain_elrs": _values(form.pretrain_elrs, "--pretrain-elr"),
            "pretrain_epochs": int(form.pretrain_epochs),
            "finetune_elrs": _values(form.finetune_elrs, "--finetune-elr"), "finetune_epochs": int(form.finetune_epochs),
            "average": int(form.average), "seeds": _values(form.seeds, "--seed", int),
            "data_seeds": _values(form.data_seeds, "--data-seed", int), "refine": bool(form.refine),
            "points": int(form.points),
            "name": form.name.strip() or None}


def launch(store: Store, form: StudyForm) -> int:
    """Create the study (its pre-training sweep queued for the workers, which advance it); its id.
    Bad input: one ConfigError line naming the form's field, nothing written."""
    try:
        args = study_args(form)
        return create_study(store, args.pop("base"), **args)
    except ConfigError as exc:
        raise ConfigError(form_message(str(exc).replace("--average K ", "--average "), STUDY_FIELDS)) from None


def launch_preset(store: Store, preset) -> int:
    """One click: a StudyPreset created for the workers."""
    try:
        return preset.create(store)
    except ConfigError as exc:
        raise ConfigError(form_message(exc, STUDY_FIELDS)) from None


def pieces(spec: dict) -> str:
    """What a study spec will train, in one line."""
    runs, jobs = planned(spec)
    data = len(spec.get("data_seeds") or [0])
    refine = " (and up to 5 PLRs refined around the convergence threshold)" if spec.get("refine") else ""
    return (f"{len(spec['pretrain_elrs'])} PLR(s) × {len(spec['seeds'])} seed(s) × {data} data seed(s), "
            f"{len(spec['finetune_elrs'])} FLR(s): {runs} runs and {jobs} averages and geometries{refine}")

