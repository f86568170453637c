"""End to end in a real browser: the real app and a real worker on a temporary store. Launch a short
digits run from the Launch form and the 16-run ELR sweep from its preset button, watch the run's
curves arrive on Live and the sweep's overview fit one screen, and screenshot every page into
artifacts/screenshots/; the teacher's path (each Teach demo drawn on the Teach page itself, on runs
trained once for the test run; SPHERELAB_DEMO_TIMINGS=1 also times the demos from a click to their end
into artifacts/demo_timings.json); user text that must stay text.

Assertions read what a user sees: visible text, Plotly's drawn traces (_fullData, with points),
element boxes. The demo timings are a measurement for BENCHMARKS-style notes, not a timed assertion.

Drives Debian's Chromium (/usr/bin/chromium) through Playwright; never `playwright install`.
Skipped when that browser is missing, except under CI=true, where that is a failure.
"""
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from engine import registry
from engine.presets import PRESETS
from storage import Store
from tests.helpers import store_traces
from tests.processes import copy_store

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
SHOTS = ROOT / "artifacts" / "screenshots"
FULL_DEMOS = os.environ.get("SPHERELAB_DEMO_TIMINGS", "") == "1"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


def _unavailable(reason: str):
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"the browser test must run in CI but {reason}")
    pytest.skip(reason)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _start(args: list[str], env: dict, log: Path) -> subprocess.Popen:
    with open(log, "wb") as out:
        return subprocess.Popen(args, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)  # its own session: the worker's run processes too
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _wait_healthy(url: str, proc: subprocess.Popen, log: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"streamlit exited ({proc.returncode}): {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as reply:
                if reply.read().strip() == b"ok":
                    return
        except OSError:
            time.sleep(0.3)
    pytest.fail(f"streamlit did not answer at {url}: {log.read_text()[-2000:]}")


@contextlib.contextmanager
def _serve(tmp_path, worker: bool):
    """(base URL, store): the dashboard and, if asked, a worker, both real processes, on a fresh store."""
    if not os.path.exists(CHROMIUM):
        _unavailable(f"{CHROMIUM} is missing (apt-get install chromium)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        _unavailable("the playwright package is not installed (pip install -r requirements-test.txt)")
    db = tmp_path / "browser.db"
    store = Store(db)
    env = {**os.environ, "SPHERELAB_DB": str(db)}
    port = _free_port()
    processes = [_start([sys.executable, "-m", "streamlit", "run", "streamlit_app.py", "--server.headless", "true",
                         "--server.port", str(port), "--server.address", "127.0.0.1",
                         "--browser.gatherUsageStats", "false"], env, tmp_path / "streamlit.log")]
    if worker:
        processes.append(_start([sys.executable, "-m", "engine", "worker", "--db", store.url, "--max-parallel", "2"],
                                env, tmp_path / "worker.log"))
    try:
        _wait_healthy(f"http://127.0.0.1:{port}", processes[0], tmp_path / "streamlit.log")
        yield f"http://127.0.0.1:{port}", store
    finally:
        for process in reversed(processes):
            _stop(process)


@pytest.fixture
def served(tmp_path):
    with _serve(tmp_path, worker=True) as served:
        yield served


@pytest.fixture
def served_without_worker(tmp_path):
    """For pages over runs written straight into the store: no worker to start (it imports torch)."""
    with _serve(tmp_path, worker=False) as served:
        yield served


@pytest.fixture
def served_with_study(tmp_path, small_study):
    """Like served_without_worker, on a copy of the session's small ticks study (conftest.small_study,
    trained once by the CLI for every test that reads it); (base URL, store, the study's id)."""
    copy_store(small_study[0], tmp_path / "browser.db")
    with _serve(tmp_path, worker=False) as served:
        yield (*served, small_study[1])


@contextlib.contextmanager
def _browser_page():
    """A Chromium page at 1400x900, the size a teacher's laptop shows."""
    from playwright.sync_api import sync_playwright

    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser.new_page(viewport={"width": 1400, "height": 900})
        finally:
            browser.close()


def _settle(page, timeout_s: float = 30) -> None:
    """Wait until the page's script has run to its end (the app says so on stApp: the status widget
    only shows after a delay, so its absence proves nothing) and every Plotly chart has been drawn."""
    page.wait_for_selector("h1", timeout=timeout_s * 1000)
    page.wait_for_function(
        """() => document.querySelector('[data-testid="stApp"]')?.dataset.testScriptState === 'notRunning'
                 && Array.from(document.querySelectorAll('[data-testid="stPlotlyChart"]'))
                        .every(chart => chart.querySelector('.js-plotly-plot .main-svg'))""",
        timeout=timeout_s * 1000)
    page.wait_for_timeout(500)


def _screenshot(page, name: str) -> Path:
    """The whole page: Streamlit scrolls inside its main block, so grow the viewport to fit it."""
    height = page.evaluate("() => document.querySelector('[data-testid=\"stMain\"]').scrollHeight")
    page.set_viewport_size({"width": 1400, "height": max(900, int(height) + 40)})
    page.wait_for_timeout(800)
    path = SHOTS / f"{name}.png"
    started = time.time()
    page.screenshot(path=str(path), full_page=True)
    page.set_viewport_size({"width": 1400, "height": 900})
    assert path.stat().st_size > 10_000 and path.stat().st_mtime >= started - 1, path
    return path


def _open(page, url: str) -> None:
    """Go to a page and wait until it is drawn; it must not show a traceback."""
    page.goto(url)
    _settle(page)
    _no_traceback(page, url)


def _no_traceback(page, where: str) -> None:
    assert not page.locator('[data-testid="stException"]').count(), \
        f"{where} shows a traceback: {page.locator('[data-testid=stException]').first.inner_text()[:500]}"


def _wait_until_ended(store: Store, run_ids, timeout_s: float) -> list:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        runs = store.list_runs(ids=list(run_ids))
        if runs and all(r.is_terminal for r in runs):
            break
        time.sleep(0.5)
    runs = store.list_runs(ids=list(run_ids))
    assert runs and all(r.status == "finished" for r in runs), [(r.id, r.status) for r in runs]
    return runs


def _wait_for_curve(page, name: str, timeout_s: float) -> None:
    """Until a chart has drawn the curve named `name` with two or more points and the name is on
    screen (in the chart's legend, or on the run's card where a crowd of runs leaves the legend out)."""
    page.wait_for_function("""name => Array.from(document.querySelectorAll('.js-plotly-plot')).some(plot =>
        (plot._fullData || []).some(t => String(t.name).startsWith(name) && t.visible !== false && t._length > 1))""",
                           arg=name, timeout=timeout_s * 1000)
    page.get_by_text(name).filter(visible=True).first.wait_for(timeout=timeout_s * 1000)


def _regime_labels(page) -> list[dict]:
    """The regime labels written at the curves' ends in the first chart, as drawn: text and box."""
    texts = page.locator(".js-plotly-plot").first.locator("g.textpoint text")
    return [{"text": text.text_content().strip(), **text.bounding_box()} for text in texts.all()]


def _overlapping(boxes: list[dict]) -> list[tuple[str, str]]:
    return [(a["text"], b["text"]) for i, a in enumerate(boxes) for b in boxes[i + 1:]
            if a["x"] < b["x"] + b["width"] and b["x"] < a["x"] + a["width"]
            and a["y"] < b["y"] + b["height"] and b["y"] < a["y"] + a["height"]]


def _overview_box(page, rows: int, timeout_s: float = 60) -> dict:
    """Live's overview once it is tall enough for `rows` runs (header + one line each, ROW_PX high):
    its box, and whether the grid scrolls inside itself."""
    page.wait_for_function("""rows => {
        const table = document.querySelector('[data-testid="stDataFrame"]');
        return table && table.getBoundingClientRect().height >= (rows + 1) * 30;
    }""", arg=rows, timeout=timeout_s * 1000)
    box = page.locator('[data-testid="stDataFrame"]').first.bounding_box()
    scrolls = page.evaluate("""() => Array.from(document.querySelectorAll('[data-testid="stDataFrame"] .dvn-scroller'))
        .some(s => s.scrollHeight > s.clientHeight + 1)""")
    return {**box, "scrolls": scrolls}


def test_launch_watch_live_and_screenshot_every_page(served):
    base, store = served
    with _browser_page() as page:
        # Launch: a 3-epoch digits run through the custom form
        _open(page, base)
        page.get_by_text("Worker alive").wait_for(timeout=30_000)
        page.get_by_role("tab", name="Custom run or sweep").click()
        epochs = page.get_by_label("Epochs", exact=True)
        epochs.fill("3")
        epochs.press("Enter")
        page.get_by_role("button", name="Queue 1 run(s)").click()
        page.get_by_text("Queued 1 run(s)").wait_for(timeout=30_000)
        [run] = store.list_runs()
        assert run.config["epochs"] == 3 and run.config["dataset"] == "digits"
        _screenshot(page, "launch")

        # a bookmarked /launch opens Launch itself, not a "Page not found" dialog over it
        _open(page, f"{base}/launch")
        assert page.get_by_role("tab", name="Custom run or sweep").is_visible()
        assert not page.get_by_text("Page not found").count()

        # the 16-run ELR sweep with its preset's button (a shared link opens the preset)
        _open(page, f"{base}/?preset=ELR+sweep+on+digits")
        page.get_by_role("button", name="Queue “ELR sweep on digits”").click()
        page.get_by_text("Queued 16 run(s)").wait_for(timeout=30_000)
        [sweep] = store.list_sweeps()
        assert len(sweep.run_ids) == 16

        # Live: the launched run's curve arrives without a reload (its name in the overlay's legend)
        page.goto(f"{base}/live")
        _wait_for_curve(page, f"#{run.id} {run.name}", 90)
        _no_traceback(page, "live")

        # Live's overview: once the worker has taken the sweep and it is under way, all 17 runs in one
        # 1400x900 screen, with their progress and time left
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and not all(
                r.is_terminal or (r.status != "queued" and r.progress >= 0.05) for r in store.list_runs()):
            time.sleep(0.5)
        page.wait_for_timeout(1500)   # the overview's next refresh
        box = _overview_box(page, 17)
        assert box["y"] + box["height"] <= 900 and not box["scrolls"], box
        _no_traceback(page, "live")
        page.screenshot(path=str(SHOTS / "live_overview_16.png"))   # exactly what one screen shows

        # leave the page while the sweep trains (redrawing 17 runs every second takes CPU from them);
        # ended runs stay on Live with their final curves
        page.goto("about:blank")
        runs = _wait_until_ended(store, [run.id, *sweep.run_ids], 240)
        _open(page, f"{base}/live")
        _wait_for_curve(page, f"#{sweep.run_ids[-1]} ", 30)
        # the overlay of 17 runs: one label per regime at the curves' ends, none covering another
        labels = _regime_labels(page)
        assert {"convergence", "divergence"} <= {re.sub(r" \(\d+\)$", "", b["text"]) for b in labels}, labels
        assert not _overlapping(labels), labels
        _screenshot(page, "live")

        by_rate = sorted((r for r in runs if r.sweep_id == sweep.id), key=lambda r: r.config["elr"])
        three = [by_rate[i].id for i in (3, 6, 9)]   # ELR 1e-3, 1e-2 and 0.1: one per regime
        views = {"run": f"run?run={run.id}",
                 "compare": f"compare?runs={','.join(map(str, [run.id, *three]))}&metric=train_loss,test_acc",
                 "compare_phase": f"compare?runs={','.join(str(r.id) for r in by_rate[2:14:2])}"
                                  "&metric=train_loss&x=eff_grad_norm&log=x,train_loss",
                 "regime_map_16": f"regime_map?sweep={sweep.id}",
                 "teach": "teach"}
        for name, path in views.items():
            _open(page, f"{base}/{path}")
            assert _check_log_ticks(page) > 0 or name == "teach", name
            _screenshot(page, name)
        # the regime map draws all 16 runs, coloured by regime
        page.goto(f"{base}/regime_map?sweep={sweep.id}")
        _settle(page)
        drawn = page.evaluate("""() => (document.querySelector('.js-plotly-plot')._fullData || [])
            .filter(t => t.xaxis === 'x' && t.yaxis === 'y' && t.mode === 'markers').reduce((n, t) => n + t._length, 0)""")
        assert drawn == 16, drawn


# ---- the teacher's path -----------------------------------------------------------------------------
EVIL = "[click](http://evil.example) ![x](http://evil.example/i.png) <a href=\"http://evil.example\">y</a>"

# every log axis Plotly drew: each rendered tick label must read as the tick's own value
LOG_TICKS_JS = """() => Array.from(document.querySelectorAll('.js-plotly-plot')).flatMap(plot =>
    Object.values(plot._fullLayout || {}).filter(a => a && a.type === 'log' && a._vals)
        .flatMap(a => a._vals.map(t => [t.x, String(t.text)])))"""


def _labelled_curves(page) -> list[str]:
    """The regime of each curve of the first chart, as its end labels read ("convergence (2)" counts
    twice), after checking that the chart drew three curves with points and no label covers another."""
    plot = page.locator(".js-plotly-plot").first
    drawn = plot.evaluate("""plot => (plot._fullData || []).filter(t => t.mode === 'lines' && t.showlegend)
        .map(t => t._length)""")
    assert len(drawn) == 3 and min(drawn) > 10, drawn
    labels = _regime_labels(page)
    assert not _overlapping(labels), labels
    regimes = []
    for label in labels:
        name, _, count = re.fullmatch(r"(.*?)( \((\d+)\))?", label["text"]).groups()
        regimes += [name] * int(count or 1)
    return regimes


def _check_log_ticks(page) -> int:
    ticks = page.evaluate(LOG_TICKS_JS)
    for exponent, text in ticks:
        assert float(text.replace("−", "-")) == pytest.approx(10 ** exponent, rel=1e-3), (text, exponent)
    return len(ticks)


def _click_demo(page, base: str, store: Store, topic: str) -> tuple[float, list[int]]:
    """Open Teach on the topic and click its demo; (the click's wall-clock time, the demo's run ids)."""
    _open(page, f"{base}/teach?topic={topic}")
    before = {r.id for r in store.list_runs()}
    page.get_by_role("button", name="Run this demo").click()
    clicked = time.time()
    page.get_by_text("run(s) queued; a worker trains them").wait_for(timeout=30_000)
    return clicked, [r.id for r in store.list_runs() if r.id not in before]


def _run_demo(page, base: str, store: Store, topic: str, timeout_s: float) -> tuple[float, list]:
    """Click the topic's demo and wait on the Teach page until its runs have ended and the page drew
    them; (seconds from the click until all its runs finished, the runs)."""
    clicked, run_ids = _click_demo(page, base, store, topic)
    runs = _wait_until_ended(store, run_ids, timeout_s)
    took = max(r.finished_at for r in runs) - clicked
    page.wait_for_timeout(2500)   # the fragment's last refresh, then the static redraw
    _settle(page)
    _no_traceback(page, f"teach {topic}")
    assert page.url.startswith(f"{base}/teach"), "the demo must not send the teacher to another page"
    return took, runs


@pytest.fixture
def served_with_demos(tmp_path, preset_traces):
    """Like served_without_worker, on a store holding seed 0 of each Teach demo's runs as a worker
    leaves them (finished, labelled), taken from the runs the preset tests train once for the test run
    (conftest.preset_traces, with their seed lists); (base URL, store, {topic: run ids})."""
    demos = {}
    for topic, preset, seeds in (("regimes", "Three regimes on digits", range(3)),
                                 ("periodic", "Periodic behaviour", range(5)),
                                 ("sharpness", "Sharpness vs 2/ELR", range(3))):
        cfgs, traces = preset_traces(preset, seeds)
        per_seed = len(cfgs) // len(seeds)
        demos[topic] = store_traces(tmp_path / "browser.db", list(zip(cfgs, traces))[:per_seed],
                                    PRESETS[preset].swept, PRESETS[preset].name)
    with _serve(tmp_path, worker=False) as served:
        yield (*served, demos)


def _show_demo(page, base: str, topic: str, run_ids: list[int]) -> None:
    """The Teach page on a topic with its demo's runs, as the demo's link shares them."""
    _open(page, f"{base}/teach?topic={topic}&runs_{topic}={','.join(map(str, run_ids))}")
    assert page.get_by_role("button", name="Run this demo").count() == 1


def test_teacher_sees_every_demo_drawn_on_the_teach_page(served_with_demos):
    """What each demo draws on the Teach page once its runs have trained (a click queues them: AppTest
    test_teach_demo_queues_its_preset; the whole path from a click: test_the_branch_demo_runs_its_steps_
    on_the_teach_page and the launch test): the regimes' labelled curves, the periodic panels and
    cycle, the sharpness runs against their own lines; then the Periodic page of the periodic run."""
    base, store, demos = served_with_demos
    with _browser_page() as page:
        # three regimes: three curves, each labelled with its regime
        _show_demo(page, base, "regimes", demos["regimes"])
        page.wait_for_function("() => document.querySelectorAll('.js-plotly-plot').length >= 2", timeout=30_000)
        labels = _labelled_curves(page)
        runs = store.list_runs(ids=demos["regimes"])
        assert sorted(labels) == sorted(r.regime.replace("_", " ") for r in runs) and len(labels) == 3, labels
        assert {"convergence", "divergence"} <= set(labels), labels   # the middle one: see test_presets
        assert _check_log_ticks(page) > 0
        _screenshot(page, "teach_regimes")

        # periodic behaviour: the aligned panels and the cycle, with the loss spikes counted
        _show_demo(page, base, "periodic", demos["periodic"])
        page.get_by_text("loss spikes", exact=True).wait_for()
        drawn = page.evaluate("""() => Array.from(document.querySelectorAll('.js-plotly-plot'))
            .map(plot => (plot._fullData || []).filter(t => t._length > 100).length)""")
        assert drawn[:2] == [3, 1], drawn   # train_loss, si_norm and elr; the cycle
        assert _check_log_ticks(page) > 0
        _screenshot(page, "teach_periodic")

        # sharpness: each run drawn against its own 2(1+μ)/ELR line (legend: "<run> · <line>")
        line = registry.label("sharpness_threshold")
        _show_demo(page, base, "sharpness", demos["sharpness"])
        legend = page.locator(".js-plotly-plot").first.locator(".legendtext").all_text_contents()
        assert sum(line in name for name in legend) == len(demos["sharpness"]) == 3, legend
        assert len(legend) == 6, legend
        _screenshot(page, "teach_sharpness")

        # the Periodic page on the demo's run
        _open(page, f"{base}/periodic?run={demos['periodic'][0]}")
        assert _check_log_ticks(page) > 0
        _screenshot(page, "periodic")


@pytest.mark.skipif(not FULL_DEMOS, reason="SPHERELAB_DEMO_TIMINGS=1 runs it (a few minutes here); what the demos "
                    "draw is checked on trained runs in test_teacher_sees_every_demo_drawn_on_the_teach_page")
def test_the_demos_run_from_a_click_to_their_end(served):
    """A measurement for the demos' time estimates: each demo from its click to its last run finished,
    with a worker, into artifacts/demo_timings.json."""
    base, store = served
    timings = {}
    with _browser_page() as page:
        _open(page, base)
        page.get_by_text("Worker alive").wait_for(timeout=30_000)
        for topic, preset in (("regimes", "Three regimes on digits"), ("periodic", "Periodic behaviour"),
                              ("sharpness", "Sharpness vs 2/ELR")):
            took, _ = _run_demo(page, base, store, topic, 600)
            timings[preset] = round(took, 1)
    path = ROOT / "artifacts" / "demo_timings.json"
    path.write_text(json.dumps({**(json.loads(path.read_text()) if path.exists() else {}), **timings}, indent=2))
    print("demo timings through the dashboard (s, click to the last run finished):", timings)


# ---- branch, average, compare solutions (issue 9's done-when, from the dashboard) --------------------
def _fill(page, label: str, value) -> None:
    """Type into a number or text field and commit it (Enter), then let the page rerun."""
    field = page.get_by_label(label, exact=True)
    field.fill(str(value))
    field.press("Enter")
    _settle(page)


def _choose(page, label: str, option: str) -> None:
    """Pick an option of a select box (opened again if a rerun of the page closed it)."""
    for attempt in range(3):
        page.get_by_test_id("stSelectbox").filter(has_text=label).click()
        try:
            page.get_by_role("option", name=option, exact=True).click(timeout=5_000)
            break
        except Exception:
            if attempt == 2:
                raise
            _settle(page)
    _settle(page)


def _metric(page, label: str) -> str:
    """The value a st.metric shows under this label."""
    box = page.get_by_test_id("stMetric").filter(has=page.get_by_test_id("stMetricLabel").get_by_text(label, exact=True))
    return box.get_by_test_id("stMetricValue").inner_text().strip()


def _wait_for_jobs(store: Store, job_ids, timeout_s: float) -> list:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and any(store.get_job(j).status in ("queued", "running") for j in job_ids):
        time.sleep(0.5)
    jobs = [store.get_job(j) for j in job_ids]
    assert all(j.status == "finished" for j in jobs), [(j.id, j.status, j.error) for j in jobs]
    return jobs


def test_branch_twice_average_and_measure_the_geometry_from_the_dashboard(served):
    """On digits: a run trained with kept checkpoints (Launch), branched twice at different ELRs and
    its last five checkpoints averaged (Run page), the geometry between the two branches measured
    (Solutions page); each view screenshotted, the figures written to artifacts/branch_session.json."""
    base, store = served
    with _browser_page() as page:
        _open(page, base)
        page.get_by_text("Worker alive").wait_for(timeout=30_000)
        page.get_by_role("tab", name="Custom run or sweep").click()
        _fill(page, "ELR", 0.02)
        _fill(page, "Epochs", 12)
        _fill(page, "Keep checkpoints every (epochs, 0 = only the latest)", 2)
        page.get_by_role("button", name="Queue 1 run(s)").click()
        page.get_by_text("Queued 1 run(s)").wait_for(timeout=30_000)
        [parent] = store.list_runs()
        assert (parent.config["elr"], parent.config["epochs"], parent.config["keep_every"]) == (0.02, 12, 2)
        [parent] = _wait_until_ended(store, [parent.id], 120)
        assert [c.epoch for c in store.checkpoints(parent.id)] == [2, 4, 6, 8, 10, 12]
        assert parent.regime == "chaotic_equilibrium"     # as Teach's demo of the same run says

        # the Run page: kept checkpoints on the curves, then two branches from epoch 8 and an average
        _open(page, f"{base}/run?run={parent.id}")
        page.wait_for_function("""() => { const plot = document.querySelector('.js-plotly-plot');
            const kept = plot ? (plot._fullData || []).filter(t => String(t.name).startsWith('kept checkpoint')) : [];
            return kept.length === 4 && kept.every(t => t._length === 6); }""", timeout=30_000)  # on its 4 panels
        _screenshot(page, "branch_run_form")
        _choose(page, "Branch at epoch", "8")
        _fill(page, "Epochs after the branch", 4)
        for elr in ("0.002", "0.0005"):
            _fill(page, "New ELR", elr)
            page.get_by_role("button", name="Branch: queue the child run").click()
            page.get_by_text(f"with elr {elr} for 4 epoch(s)").wait_for(timeout=30_000)
        page.get_by_role("button", name="Average epochs 4–12").click()
        page.get_by_text("Queued average #").wait_for(timeout=30_000)
        forks = sorted((r for r in store.list_runs() if r.parent_id == parent.id), key=lambda r: r.id)
        assert [(f.fork_epoch, f.config["elr"], f.config["epochs"]) for f in forks] == [(8, 0.002, 12), (8, 0.0005, 12)]
        [average] = store.list_jobs(run_id=parent.id, kind="average")
        assert average.spec["epochs"] == [4, 6, 8, 10, 12]
        page.goto("about:blank")   # leave the CPU to the worker
        forks = sorted(_wait_until_ended(store, [f.id for f in forks], 180), key=lambda r: r.id)
        [average] = _wait_for_jobs(store, [average.id], 120)
        tail = store.read_metrics(parent.id, ["train_loss"])["train_loss"].iloc[-10:].mean()
        assert all(_last(store, f.id, "train_loss") < tail for f in forks)   # a smaller ELR descends

        _open(page, f"{base}/run?run={parent.id}")
        page.get_by_text("Averages (SWA)").wait_for(timeout=30_000)
        for fork in forks:
            page.get_by_text(f"from epoch 8, elr {fork.config['elr']:.3g}, finished").first.wait_for(timeout=30_000)
        _screenshot(page, "branch_parent")
        _open(page, f"{base}/run?run={forks[0].id}")
        page.get_by_text("at epoch 8").first.wait_for()
        _screenshot(page, "branch_child")
        _open(page, f"{base}/compare?runs={forks[0].id},{forks[1].id}&ancestors=1&metric=train_loss,test_acc")
        dotted = page.evaluate("""() => (document.querySelector('.js-plotly-plot')._fullData || [])
            .filter(t => t.line && t.line.dash === 'dot').length""")
        assert dotted == 4, dotted   # each branch's parent part, on both panels
        _screenshot(page, "branch_compare")

        # the Solutions page: the two branches' last checkpoints, measured at 11 points
        _open(page, f"{base}/solutions")
        _fill(page, "Points on the path", 11)
        page.get_by_role("button", name="Measure the geometry").click()
        page.get_by_text("Queued geometry #").wait_for(timeout=30_000)
        [geometry] = store.list_jobs(kind="geometry")
        assert geometry.spec == {"a": {"run": forks[0].id, "epoch": 12}, "b": {"run": forks[1].id, "epoch": 12},
                                 "points": 11}
        # the page follows the measurement until it is done, then draws it: each curve with its straight line
        page.wait_for_function("""() => { const plot = document.querySelector('.js-plotly-plot');
            return plot && (plot._fullData || []).filter(t => String(t.name).endsWith('straight line')).length === 4; }""",
                               timeout=240_000)
        page.wait_for_timeout(2500)   # the fragment's last refresh, then the static redraw
        _settle(page)
        _no_traceback(page, "solutions")
        [geometry] = _wait_for_jobs(store, [geometry.id], 10)
        shown = {"angle": _metric(page, next(t for t in page.get_by_test_id("stMetricLabel").all_inner_texts()
                                             if t.startswith("angle"))),
                 **{f"{key} barrier": _metric(page, f"{registry.label(key)} barrier")
                    for key in ("train_loss", "test_loss", "train_err", "test_err")}}
        assert shown["angle"] == f"{geometry.result['angle']:.3g} rad", shown
        _screenshot(page, "branch_solutions")

    figures = {"parent": {"run": parent.id, "test_acc": _last(store, parent.id, "test_acc")},
               "branches": [{"run": f.id, "elr": f.config["elr"], "test_acc": _last(store, f.id, "test_acc"),
                             "train_loss": _last(store, f.id, "train_loss")} for f in forks],
               "average": {key: average.result[key] for key in ("epochs", "train_acc", "test_acc")},
               "geometry as the page showed it": shown}
    (ROOT / "artifacts" / "branch_session.json").write_text(json.dumps(figures, indent=2))
    print("branch, average, compare from the dashboard:", json.dumps(figures))


@pytest.mark.skipif(not FULL_DEMOS, reason="SPHERELAB_DEMO_TIMINGS=1 runs it (about a minute and a half here); "
                    "its steps are checked without a worker in test_dashboard_solutions.py")
def test_the_branch_demo_runs_its_steps_on_the_teach_page(served):
    """Teach's sixth step: one click, then the page queues the branches, the average and the geometry as
    each step before ends, and draws them; timed into artifacts/demo_timings.json."""
    base, store = served
    with _browser_page() as page:
        _open(page, base)
        page.get_by_text("Worker alive").wait_for(timeout=30_000)
        _open(page, f"{base}/teach?topic=solutions")
        page.get_by_role("button", name="Run this demo").click()
        clicked = time.time()
        page.get_by_text("Done: the two branches").wait_for(timeout=400_000)
        took = time.time() - clicked
        page.wait_for_timeout(2500)
        _settle(page)
        _no_traceback(page, "teach solutions")
        assert len(store.list_runs()) == 3 and [j.status for j in store.list_jobs()] == ["finished", "finished"]
        assert page.evaluate("() => document.querySelectorAll('.js-plotly-plot').length") == 2
        _screenshot(page, "teach_solutions")
    path = ROOT / "artifacts" / "demo_timings.json"
    timings = json.loads(path.read_text()) if path.exists() else {}
    timings["Branch, average, compare"] = round(took, 1)
    path.write_text(json.dumps(timings, indent=2))
    print("branch demo through the dashboard (s, click to the geometry drawn):", round(took, 1))


def _last(store: Store, run_id: int, key: str) -> float:
    return float(store.read_metrics(run_id, [key])[key].dropna().iloc[-1])


def test_user_text_stays_text_in_the_browser(served_without_worker):
    base, store = served_without_worker
    sweep_id, [run_id] = store.create_sweep_runs(EVIL, {}, [{"config": {"mode": "lrwd"}, "name": EVIL, "tags": [EVIL]}])
    store.log_metrics(run_id, [(s, s / 10, s / 10, {"train_loss": 2.0 / (s + 1), "test_acc": 0.5, "si_norm": 3.0,
                                                   "elr": 0.01}) for s in range(0, 200, 10)])
    store.set_notes(run_id, EVIL)
    store.update_run(run_id, status="failed", error=EVIL)
    with _browser_page() as page:
        for path in (f"run?run={run_id}", "live", f"compare?runs={run_id}", f"regime_map?sweep={sweep_id}",
                     f"periodic?run={run_id}"):
            _open(page, f"{base}/{path}")
            # the name is shown, as text a reader sees (or as the value of a visible select box)
            shown = page.get_by_text("evil.example").filter(visible=True).count() + page.locator("input").evaluate_all(
                "inputs => inputs.filter(i => i.offsetParent && i.value.includes('evil.example')).length")
            assert shown > 0, path
            assert page.locator('a[href*="evil.example"]').count() == 0, path
            assert page.locator('img[src*="evil.example"]').count() == 0, path
            html = page.content()   # text is serialised with "<" as "&lt;": a raw "<a" is an element
            assert '<a href="http://evil.example' not in html and '<img src="http://evil.example' not in html, path
        _open(page, f"{base}/run?run={run_id}")
        _screenshot(page, "plain_text_names")


# ---- a learning-rate study (issue 13) ---------------------------------------------------------------
def _progress_text(page) -> str:
    return page.get_by_test_id("stProgress").first.inner_text()


def test_the_study_page_follows_a_study_and_draws_a_finished_one(served_with_study):
    """A queued study's page follows it without a reload (its pieces are moved in the store here, as a
    worker would), stopping when it ends; then a small ticks study trained by the CLI (conftest's
    small_study, on a copy of its store) drawn on its Study page: the accuracy chart with its series,
    bands and best star, the geometry and the feature heatmaps, log ticks that read as their values;
    and on Teach's study step. Screenshots study.png and teach_study.png."""
    from engine.config import RunConfig
    from engine.study import create_study
    base, store, study_id = served_with_study
    queued = create_study(store, RunConfig(dataset="digits"), pretrain_elrs=[1e-3, 1e-2], pretrain_epochs=2,
                          finetune_elrs=[1e-4], finetune_epochs=1, average=1, seeds=[0], name="followed")
    with _browser_page() as page:
        _open(page, f"{base}/study?study={queued}")
        assert _progress_text(page).startswith("Running: 0 of 4 runs ended"), _progress_text(page)
        first, second = store.list_runs(study_id=queued)
        store.update_run(first.id, status="failed")             # no forks, average or geometry from it
        page.get_by_text("Running: 1 of 3 runs ended").wait_for(timeout=15_000)
        store.update_run(second.id, status="failed")
        store.set_study_status(queued, "finished")
        page.get_by_text("Finished: 2 of 2 runs ended").wait_for(timeout=15_000)
        _no_traceback(page, "study (followed)")

        from engine.study import report
        paired = bool(report(store, study_id)["pairs"])   # the per-pair gains chart: only when a pair has both sides
        _open(page, f"{base}/study?study={study_id}")
        page.get_by_text("The best model comes from PLR").wait_for(timeout=30_000)
        page.wait_for_function("() => document.querySelectorAll('.js-plotly-plot').length >= 3", timeout=30_000)
        drawn = page.evaluate("""() => Array.from(document.querySelectorAll('.js-plotly-plot')).map(plot =>
            (plot._fullData || []).filter(t => t._length > 0 || t.type === 'heatmap')
                .map(t => t.type === 'heatmap' ? 'heatmap' : String(t.name)))""")
        if paired:
            accuracy, gains, geometry, features = drawn
            assert "mean gain, bootstrap 95% interval" in gains, gains
        else:
            accuracy, geometry, features = drawn
        assert {"pre-trained", "fine-tuned at FLR 0.0001", "fine-tuned at FLR 0.001", "best model"} <= set(accuracy), accuracy
        assert len(geometry) == 3 * 3 and features.count("heatmap") == 4, (geometry, features)
        bands = page.evaluate("""() => (document.querySelector('.js-plotly-plot')._fullLayout.shapes || [])
            .filter(s => s.type === 'rect').length""")
        assert bands == 3, bands   # one regime band per PLR
        assert _check_log_ticks(page) > 0
        _no_traceback(page, "study")
        _screenshot(page, "study")

        _open(page, f"{base}/teach?topic=study&study_demo={study_id}")
        page.get_by_text("The best model comes from PLR").wait_for(timeout=30_000)
        # the summary is written before Plotly has drawn the charts below it: wait for them, then count
        page.wait_for_function(f"() => document.querySelectorAll('.js-plotly-plot').length >= {3 + paired}",
                               timeout=30_000)
        assert page.evaluate("() => document.querySelectorAll('.js-plotly-plot').length") == 3 + paired
        _screenshot(page, "teach_study")


# ---- blemishes seen at 1400x900 (issue 17 item 12) ---------------------------------------------------------
OVERLAPS_JS = """() => {
    // every pair of tick labels on one axis that overlap on screen, and every chart text past its chart's edge
    const out = {overlaps: [], outside: []};
    for (const plot of document.querySelectorAll('.js-plotly-plot')) {
        // what the reader sees: the chart's element in the page (Plotly's div can be wider than it)
        const box = (plot.closest('[data-testid="stPlotlyChart"]') || plot.querySelector('.main-svg'))
            .getBoundingClientRect();
        const groups = {};
        for (const label of plot.querySelectorAll('g.xtick text, g.ytick text')) {
            const cls = label.parentNode.getAttribute('class');
            const axis = label.closest('g[class$="tick"]') ? label.parentNode.parentNode : null;
            const key = cls + '|' + (axis ? Array.from(axis.parentNode.children).indexOf(axis) : 0);
            (groups[key] = groups[key] || []).push(label.getBoundingClientRect());
        }
        for (const rects of Object.values(groups)) {
            for (let i = 0; i < rects.length; i++) for (let j = i + 1; j < rects.length; j++) {
                const a = rects[i], b = rects[j];
                if (a.width && b.width && a.left < b.right && b.left < a.right && a.top < b.bottom && b.top < a.bottom)
                    out.overlaps.push([a.top, b.top]);
            }
        }
        for (const text of plot.querySelectorAll('g.annotation text, g.g-gtitle text')) {
            const r = text.getBoundingClientRect();
            if (r.width && (r.left < box.left - 1 || r.right > box.right + 1)) out.outside.push(text.textContent);
        }
    }
    return out;
}"""


def test_chart_texts_fit_their_charts_and_log_tick_labels_never_overlap(served_without_worker):
    """At 1400x900 the path chart's right panel title ran past the chart's edge, and log-axis labels
    1, 0.9, 0.8, 0.7 overlapped: a geometry with no barrier in either panel (the longest titles), and
    runs whose losses span a fraction of a decade, on the Solutions, Run and Compare pages."""
    base, store = served_without_worker
    from tests.test_dashboard_solutions import GEOMETRY
    flat = {**GEOMETRY, "train_err": [0.02, 0.02, 0.02, 0.03, 0.04], "test_err": [0.03, 0.03, 0.03, 0.03, 0.04],
            "train_loss": [0.1, 0.1, 0.1, 0.12, 0.2]}
    flat["barrier"] = {key: 0.0 for key in ("train_loss", "test_loss", "train_err", "test_err")}
    [run_id, other] = store.create_runs([{"config": {"elr": 0.01}, "name": "a"}, {"config": {"elr": 0.02}, "name": "b"}])
    for run, top in ((run_id, 1.0), (other, 0.9)):
        store.log_metrics(run, [(s, s / 10, s / 10, {"train_loss": top * (0.26 + 0.74 * 0.97 ** (s / 10)),
                                                     "test_acc": 0.5 + s / 4000, "elr": 0.01, "si_norm": 3.0})
                                for s in range(0, 1000, 10)])
        store.record_checkpoint(run, 2, 20, "/nonexistent.pt", 1)
        store.update_run(run, status="finished", step=990)
    a, b = {"run": run_id, "epoch": 2}, {"run": other, "epochs": [2]}
    job = store.create_job("geometry", run_id, {"a": a, "b": b, "points": 5}, other_run_id=other)
    claim = store.claim_job("test", job_ids=[job]).claim
    store.finish_job(job, {"a": a, "b": b, **flat}, claim=claim)
    with _browser_page() as page:
        for path in (f"solutions?job={job}", f"compare?runs={run_id},{other}", f"run?run={run_id}"):
            _open(page, f"{base}/{path}")
            page.wait_for_function("() => document.querySelectorAll('.js-plotly-plot .main-svg').length >= 1",
                                   timeout=30_000)
            found = page.evaluate(OVERLAPS_JS)
            assert not found["outside"], (path, found["outside"])
            assert not found["overlaps"], (path, found["overlaps"])
            if path.startswith("solutions"):
                _screenshot(page, "solutions_no_barrier")
