"""Streamlit pieces the pages share: the store (or a clear error), page state in the URL, empty
states, the worker panel and the run controls."""
from __future__ import annotations

import functools
import os
import time
from typing import Any, Callable

import streamlit as st
from sqlalchemy.exc import SQLAlchemyError

from storage import LIVE_STATUSES, RunInfo, RunNotFound, Store, StoreError, SweepNotFound, resolve_db_url
from storage.urls import display_url

from . import charts, data, export, launch
from .plain import md

LAUNCH_PAGE = "dashboard/pages/launch.py"
LIVE_PAGE = "dashboard/pages/live.py"
RUN_PAGE = "dashboard/pages/run.py"
COMPARE_PAGE = "dashboard/pages/compare.py"
REGIME_PAGE = "dashboard/pages/regime_map.py"
PERIODIC_PAGE = "dashboard/pages/periodic.py"
TEACH_PAGE = "dashboard/pages/teach.py"
SOLUTIONS_PAGE = "dashboard/pages/solutions.py"
STUDY_PAGE = "dashboard/pages/study.py"
# Regime badge colours (Streamlit's names), matching charts.REGIME_COLORS. A regime the analysis
# learns later reads grey until it gets its own.
REGIME_BADGES = {"convergence": "green", "chaotic_equilibrium": "orange", "divergence": "red", "periodic": "violet",
                 "undetermined": "gray"}
REFRESH_S = 1.0   # how often pages that follow training redraw
JOB_PENDING = ["queued", "running"]   # job statuses a page keeps following
PLOT_CONFIG = {"displaylogo": False, "modeBarButtonsToRemove": ["select2d", "lasso2d", "autoScale2d"]}
DB_FIX = ("**How to fix:** point the dashboard at a spherelab database with the environment variable "
          "`SPHERELAB_DB` (a file path or a SQLAlchemy URL, e.g. `SPHERELAB_DB=~/runs.db streamlit run "
          "streamlit_app.py`), or move the broken file away (or delete it) so a fresh one is created. "
          "A PostgreSQL URL needs the server running and reachable.")


# ---- the store ----------------------------------------------------------------------------------
@st.cache_resource(show_spinner=False)
def _open_store(url: str) -> Store:
    """One Store per database URL for the whole server (a Store is thread-safe); failures are not
    cached, so fixing the file and reloading the page works."""
    return Store(url)


def store_or_stop() -> Store:
    try:
        return _open_store(resolve_db_url(None))
    except StoreError as exc:
        show_store_failure(exc)
        st.stop()


def show_store_failure(exc: Exception) -> None:
    reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
    st.error(f"**Cannot use the run database.** {md(reason)}")
    st.markdown(DB_FIX)


def run_page(title: str, body: Callable[[Store], None], caption: str = "") -> None:
    """Title, store, then the page body; a store failure shows its message and a fix, never a traceback."""
    st.title(title)
    if caption:
        st.caption(caption)
    guarded(body)(store_or_stop())


def guarded(body: Callable[..., None]) -> Callable[..., None]:
    """body, with store failures shown as messages: for pages and for fragments, which rerun alone."""
    @functools.wraps(body)
    def call(*args, **kwargs) -> None:
        try:
            body(*args, **kwargs)
        except (RunNotFound, SweepNotFound) as exc:
            st.warning(f"{md(exc)}. The link may point at a deleted run or another database.")
        except StoreError as exc:
            st.error(md(exc))
        except SQLAlchemyError as exc:  # the database broke under us (file removed, server gone)
            _open_store.clear()
            show_store_failure(exc)
    return call


# ---- page state in the URL ----------------------------------------------------------------------
# Every page reads its query parameters through seed() (pick() for a selectbox of ids): a value that
# does not parse is refused, a number outside its range clamped, ids or choices that are not here left
# out, each with a one-line note on the page naming the parameter; the page then shows what it can.
_SEEN = "_url_seen"  # the URL values last applied or written, per key


class Many:
    """A comma-separated list parameter whose items parse with `item` (int, str)."""

    def __init__(self, item: Callable[[str], Any]):
        self.item = item

    def __call__(self, text: str) -> list:
        return [self.item(part.strip()) for part in text.split(",") if part.strip()]


int_list = Many(int)
str_list = Many(str)


def flag(text: str) -> bool:
    """A yes/no parameter: 1/true/yes or 0/false/no."""
    value = text.strip().lower()
    if value in ("1", "true", "yes"):
        return True
    if value in ("0", "false", "no"):
        return False
    raise ValueError("not 1 or 0")


def finite(text: str) -> float:
    value = float(text)
    if value != value:
        raise ValueError("not a number")
    return value


_KINDS = {int: "a whole number", float: "a number", finite: "a number", flag: "1 or 0"}


def read_param(key: str, raw: str, parse: Callable[[str], Any] = str, allowed=None, lo=None, hi=None,
               noun: str | None = None) -> tuple[Any, str | None]:
    """(the value to use or None to keep the page's own, a note or None) for URL parameter `key`=`raw`:
    what does not parse is refused, a number outside [lo, hi] clamped, list items or a value not in
    `allowed` left out. The note names the parameter and what was done (plain text)."""
    what = noun or "value"
    if isinstance(parse, Many):
        kept, bad = [], []
        for part in (p.strip() for p in raw.split(",")):
            if not part:
                continue
            try:
                value = parse.item(part)
            except ValueError:
                bad.append(part)
                continue
            (kept if allowed is None or value in allowed else bad).append(value)
        if not bad:
            return kept, None
        missing = ", ".join(map(str, bad))
        reason = "not in this database" if noun else "not a choice here"
        if kept:
            return kept, f"Left out of the link's “{key}”: {missing} ({reason})."
        return None, f"The link's “{key}” names no {what} here ({missing}: {reason}): showing the page's default."
    try:
        value = parse(raw)
    except (ValueError, OverflowError):
        kind = _KINDS.get(parse, f"a {what}")
        return None, f"Ignored the link's “{key}={raw}”: not {kind}."
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        low, high = lo is not None and value < lo, hi is not None and value > hi
        if low or high:
            clamped = lo if low else hi
            bounds = f"outside {lo:g}–{hi:g}" if lo is not None and hi is not None else \
                f"below {lo:g}" if low else f"above {hi:g}"
            return clamped, f"The link's “{key}={raw}” is {bounds}: using {clamped:g}."
    if allowed is not None and value not in allowed:
        if noun:
            return None, (f"{noun.capitalize()} {raw} is not in this database: it was deleted, or the link comes "
                          f"from another database. Showing another {noun} instead.")
        choices = ", ".join(map(str, list(allowed)[:8])) + (", …" if len(allowed) > 8 else "")
        return None, f"Ignored the link's “{key}={raw}”: not one of {choices}."
    return value, None


def seed(key: str, default: Any, parse: Callable[[str], Any] = str, allowed=None, *, lo=None, hi=None,
         noun: str | None = None) -> None:
    """Give widget `key` its value before it is drawn: the URL's (query parameter of the same name)
    when the URL changed since this page last wrote it (a shared link, a switch from another page),
    else the value it already has, else `default`. The URL's value is checked by read_param (a note
    on the page says what was refused or clamped); values not in `allowed` are dropped."""
    seen = st.session_state.setdefault(_SEEN, {})
    raw = st.query_params.get(key)
    if raw is not None and raw != seen.get(key):
        seen[key] = raw
        value, note = read_param(key, raw, parse, allowed, lo, hi, noun)
        if note:
            st.warning(md(note), icon=":material/link_off:")
        if value is not None:
            st.session_state[key] = value
    current = _keep_allowed(st.session_state.get(key), allowed)
    # assigned even when unchanged: a value left by another page's widget of the same key would
    # otherwise be ignored by this page's widget
    st.session_state[key] = default if current is None or current == [] else current


def publish(key: str, value: Any, default: Any = None) -> None:
    """Write widget `key`'s value to the URL (removed when it is the default or empty)."""
    seen = st.session_state.setdefault(_SEEN, {})
    if value is None or value == [] or value == "" or value == default:
        st.query_params.pop(key, None)
        seen[key] = None
        return
    text = ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
    st.query_params[key] = text
    seen[key] = text


def choose(key: str, value: Any) -> None:
    """Give widget `key` (not drawn yet in this run) this value and write it to the URL, as if the user
    had picked it there."""
    text = str(value)
    st.session_state[key] = value
    st.query_params[key] = text
    st.session_state.setdefault(_SEEN, {})[key] = text


def _keep_allowed(value, allowed):
    if allowed is None or value is None:
        return value
    if isinstance(value, list):
        return [v for v in value if v in allowed]
    return value if value in allowed else None


def pick(label: str, options: dict[int, str], key: str, noun: str, default: int | None = None) -> int:
    """A selectbox of ids (labels shown as plain text) whose value lives in the URL under `key`.
    A link naming an id that is not here says so, then shows the default (the newest) instead."""
    seed(key, next(iter(options)) if default is None else default, int, allowed=list(options), noun=noun)
    chosen = st.selectbox(label, list(options), format_func=options.get, key=key)
    publish(key, chosen)
    return chosen


def follow(body: Callable[..., None], store: Store, run_ids, *args, job_ids=(),
           going: Callable[[], bool] | None = None) -> None:
    """body(store, *args) in a fragment that redraws every REFRESH_S seconds while any of run_ids
    is queued, training or interrupted, or any of job_ids (averages, geometries) is queued or being
    computed, or going() says so (a study that makes new runs as old ones end), and stops once all of
    them have ended (one last whole-page rerun draws the final state, static)."""
    def active() -> bool:
        if going is not None and going():
            return True
        if run_ids and any(not r.is_terminal for r in store.list_runs(ids=list(run_ids))):
            return True
        return bool(job_ids) and bool({j.id for j in store.list_jobs(status=JOB_PENDING)} & set(job_ids))
    live = active()

    def tick(*inner) -> None:
        body(store, *inner)
        if live and not active():
            st.rerun(scope="app")
    st.fragment(guarded(tick), run_every=REFRESH_S if live else None)(*args)


def chart(fig, key: str, **kwargs):
    return st.plotly_chart(fig, key=key, config=PLOT_CONFIG, **kwargs)


def selected_run(event) -> int | None:
    """The run id (the point's customdata) of the first point selected on a chart, if any."""
    for point in (event or {}).get("selection", {}).get("points", []):
        custom = point.get("customdata")
        if custom is not None:
            return int(custom[0] if isinstance(custom, list) else custom)
    return None


# ---- small displays -----------------------------------------------------------------------------
def regime_label(regime: str | None) -> str:
    return (regime or "undetermined").replace("_", " ")


def regime_badge(regime: str | None) -> None:
    st.badge(md(regime_label(regime)), color=REGIME_BADGES.get(regime or "undetermined", "gray"))


def no_runs(what: str = "runs") -> None:
    st.info(f"No {what} in this database yet. Queue one on the Launch page (a preset is one click), "
            "or from a shell: `python -m engine submit --elr 1e-3 1e-2 --epochs 5`.")
    st.page_link(LAUNCH_PAGE, label="Go to Launch", icon=":material/rocket_launch:")


def downloads(csv_label: str, make_csv: Callable[[], bytes | str], stem: str, fig) -> None:
    """CSV of the data and the figure (PNG + SVG with kaleido, else HTML), made only when clicked."""
    formats = export.figure_formats()
    columns = st.columns(1 + len(formats))
    columns[0].download_button(csv_label, make_csv, file_name=f"{stem}.csv", mime="text/csv",
                               icon=":material/download:", on_click="ignore")
    for column, fmt in zip(columns[1:], formats):
        column.download_button(f"Figure as {fmt.label}",
                               lambda fmt=fmt: export.figure_bytes(charts.for_export(fig), fmt),
                               file_name=f"{stem}.{fmt.extension}", mime=fmt.mime, icon=":material/download:",
                               on_click="ignore")
    if not export.static_images_available():
        st.caption("Figures download as interactive HTML (kaleido, which makes PNG and SVG, is not installed).")


# ---- workers ------------------------------------------------------------------------------------
def worker_panel(store: Store) -> None:
    """Whether a worker is alive, what is queued, and a button that starts a worker when none is."""
    workers = store.live_workers()
    queued = len(store.list_runs(status="queued"))
    jobs = store.list_jobs(status=JOB_PENDING)
    computing = sum(j.status == "running" for j in jobs)
    waiting = " ".join(part for part in (f"{queued} run(s) queued." if queued else "",
                                         f"{len(jobs) - computing} job(s) queued." if len(jobs) > computing else "")
                       if part)
    waiting = f" {waiting}" if waiting else ""
    if workers:
        held = sum(len(w["run_ids"]) for w in workers)
        names = ", ".join(md(f"{w['host']} pid {w['pid']} ({w['device']}, up to {w['max_parallel']} at once)")
                          for w in workers)
        busy = [f"training {held} run(s)" if held else "", f"computing {computing} job(s)" if computing else ""]
        # queued work with nothing held yet: the worker takes it at its next poll (a second or so)
        doing = " and ".join(b for b in busy if b) or ("taking the queued work" if queued or jobs else "idle")
        st.success(f"Worker alive: {names}; {doing}.{waiting}", icon=":material/memory:")
        return
    started = st.session_state.get("worker_started")
    if started and time.time() - started["at"] < 30:
        st.info(f"Starting a worker (pid {started['pid']}); it shows up here within a few seconds. "
                f"Its log: {md(started['log'])}.{waiting}", icon=":material/hourglass_top:")
        return
    st.warning(f"No worker is running, so queued runs wait.{waiting} Start one here, or in a shell:",
               icon=":material/warning:")
    from storage.artifacts import ENV_VAR, root_for
    from storage.urls import sqlite_file
    root = root_for(store.url)
    artifacts = "" if sqlite_file(store.url) is not None and not os.environ.get(ENV_VAR) else \
        f" --artifacts {root or 'ROOT'}"      # a PostgreSQL store's workers need its checkpoints' root
    st.code(f"python -m engine worker --db {display_url(store.url)}{artifacts} --max-parallel 2", language="bash")
    if st.button("Start a worker", icon=":material/play_arrow:", key="start_worker"):
        pid, log = launch.start_worker(store.url)
        st.session_state["worker_started"] = {"pid": pid, "log": str(log), "at": time.time()}
        st.rerun()


# ---- run controls -------------------------------------------------------------------------------
def run_controls(store: Store, run: RunInfo) -> None:
    """Pause / resume / stop and a new ELR (sphere) or LR (lrwd), sent as commands the worker obeys
    between two steps. Queued runs can only be cancelled; ended runs take no commands."""
    if run.status == "queued":
        if st.button("Cancel", key=f"cancel-{run.id}", icon=":material/cancel:"):
            _act(lambda: store.cancel(run.id), "cancelled")
        return
    if run.status == "interrupted" and run.waiting_for:     # its checkpoint is missing: no worker takes it
        st.warning(md(run.error or f"waiting for its checkpoint {run.waiting_for}"))
        if st.button("Resume", key=f"resume-{run.id}", icon=":material/play_arrow:",
                     help="once the checkpoint is back under the artifact root: the workers take the run up again"):
            _act(lambda: store.resume_run(run.id), "the workers will resume it")
        return
    if run.status not in LIVE_STATUSES:
        return
    rate_key, rate = data.rate_of(run.config)
    pause, resume, stop, value, apply = st.columns([1, 1, 1, 2, 1], vertical_alignment="bottom")
    if pause.button("Pause", key=f"pause-{run.id}", icon=":material/pause:", disabled=run.status == "paused"):
        _act(lambda: store.send_command(run.id, "pause"), "pause sent")
    if resume.button("Resume", key=f"resume-{run.id}", icon=":material/play_arrow:", disabled=run.status != "paused"):
        _act(lambda: store.send_command(run.id, "resume"), "resume sent")
    if stop.button("Stop", key=f"stop-{run.id}", icon=":material/stop:"):
        _act(lambda: store.send_command(run.id, "stop"), "stop sent")
    new_rate = value.number_input(f"new {rate_key}", min_value=0.0, value=float(rate), format="%.3g",
                                  key=f"rate-{run.id}")
    if apply.button(f"Set {rate_key}", key=f"set-{run.id}"):
        _act(lambda: store.send_command(run.id, f"set_{rate_key}", {"value": float(new_rate)}),
             f"{rate_key} → {new_rate:.3g} sent")


def _act(send: Callable[[], Any], done: str) -> None:
    try:
        send()
    except StoreError as exc:
        st.error(md(exc))
        return
    st.toast(done, icon=":material/check:")
