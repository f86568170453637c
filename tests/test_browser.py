"""End to end in a real browser: the real app and a real worker on a temporary store; launch a short
digits run from the Launch page, watch its curves arrive on Live, and screenshot every page into
artifacts/screenshots/; the teacher's path (each Teach demo drawn on the Teach page itself, timed
into artifacts/demo_timings.json); Live's overview of a 16-run sweep; user text that must stay text.

Drives Debian's Chromium (/usr/bin/chromium) through Playwright; never `playwright install`.
Skipped when that browser is missing, except under CI=true, where that is a failure.
"""
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from engine.presets import PRESETS
from engine.submission import queue_runs
from dashboard import launch
from storage import Store

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
SHOTS = ROOT / "artifacts" / "screenshots"
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


@pytest.fixture
def served(tmp_path):
    """(base URL, store): the dashboard and a worker, both real processes, on a fresh store."""
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
    app = _start([sys.executable, "-m", "streamlit", "run", "streamlit_app.py", "--server.headless", "true",
                  "--server.port", str(port), "--server.address", "127.0.0.1",
                  "--browser.gatherUsageStats", "false"], env, tmp_path / "streamlit.log")
    worker = _start([sys.executable, "-m", "engine", "worker", "--db", store.url, "--max-parallel", "2"],
                    env, tmp_path / "worker.log")
    try:
        _wait_healthy(f"http://127.0.0.1:{port}", app, tmp_path / "streamlit.log")
        yield f"http://127.0.0.1:{port}", store
    finally:
        _stop(worker)
        _stop(app)


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


def _settle(page, timeout_s: float = 20) -> None:
    """Wait until the script has finished and every Plotly chart on the page has been drawn."""
    page.wait_for_selector("h1", timeout=timeout_s * 1000)
    page.wait_for_function(
        """() => !document.querySelector('[data-testid="stStatusWidget"]')
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
    page.screenshot(path=str(path), full_page=True)
    page.set_viewport_size({"width": 1400, "height": 900})
    return path


def _queue(store: Store, **form) -> None:
    """Queue more short runs the way the Launch page does (one epoch, logged every 5 steps)."""
    configs, swept = launch.configs_of(launch.LaunchForm(epochs=1, log_every=5, **form))
    queue_runs(store, configs, swept)


def test_launch_watch_live_and_screenshot_every_page(served):
    base, store = served
    with _browser_page() as page:
        # Launch: a 3-epoch digits run through the custom form
        page.goto(base)
        _settle(page)
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

        # more real runs for the other pages: a sweep for the regime map, an lrwd run for periodic
        _queue(store, sweep_rate=True, rate_start=1e-3, rate_stop=0.2, rate_points=3)
        _queue(store, mode="lrwd", rate=0.3, wd=0.01, sharpness_every=10)

        # Live: the launched run's curves arrive without a reload
        page.goto(f"{base}/live")
        page.get_by_text(f"#{run.id} {run.name}").first.wait_for(timeout=60_000)
        # _fullData: the traces as Plotly drew them (decoded from the figure's binary arrays)
        page.wait_for_function(
            """() => Array.from(document.querySelectorAll('.js-plotly-plot'))
                          .some(plot => (plot._fullData || []).some(trace => trace._length > 1))""",
            timeout=90_000)
        _settle(page)
        _screenshot(page, "live")

        deadline = time.monotonic() + 120
        while any(not r.is_terminal for r in store.list_runs()) and time.monotonic() < deadline:
            time.sleep(1)
        assert all(r.status == "finished" for r in store.list_runs()), [(r.id, r.status) for r in store.list_runs()]
        ids = ",".join(str(r.id) for r in store.list_runs())
        sweep = store.list_sweeps()[0]
        lrwd = [r for r in store.list_runs() if r.config["mode"] == "lrwd"][0]
        views = {"run": f"run?run={run.id}", "compare": f"compare?runs={ids}&metric=train_loss,test_acc&log=y",
                 "regime_map": f"regime_map?sweep={sweep.id}", "periodic": f"periodic?run={lrwd.id}",
                 "teach": "teach?topic=regimes"}
        for name, path in views.items():
            page.goto(f"{base}/{path}")
            _settle(page)
            assert not page.locator('[data-testid="stException"]').count(), f"{name} shows a traceback"
            _screenshot(page, name)
    assert sorted(p.stem for p in SHOTS.glob("*.png")) >= sorted(["launch", "live", *views])


# ---- the teacher's path -----------------------------------------------------------------------------
EVIL = "[click](http://evil.example) ![x](http://evil.example/i.png) <a href=\"http://evil.example\">y</a>"

# every log axis Plotly drew: each rendered tick label must read as the tick's own value
LOG_TICKS_JS = """() => Array.from(document.querySelectorAll('.js-plotly-plot')).flatMap(plot =>
    Object.values(plot._fullLayout || {}).filter(a => a && a.type === 'log' && a._vals)
        .flatMap(a => a._vals.map(t => [t.x, String(t.text)])))"""


def _labelled_curves(page) -> list[str]:
    """The regime labels written at the end of the curves of the first chart on the page."""
    return page.evaluate("""() => {
        const plot = document.querySelector('.js-plotly-plot');
        return plot ? (plot._fullData || []).filter(t => t.mode === 'text').map(t => String(t.text[0])) : [];
    }""")


def _check_log_ticks(page) -> int:
    ticks = page.evaluate(LOG_TICKS_JS)
    for exponent, text in ticks:
        assert float(text.replace("−", "-")) == pytest.approx(10 ** exponent, rel=1e-3), (text, exponent)
    return len(ticks)


def _run_demo(page, base: str, store: Store, topic: str, timeout_s: float) -> tuple[float, list]:
    """Open Teach on the topic, click its demo, wait on that page until its runs have ended and the
    page drew them; returns (seconds from the click, the runs)."""
    page.goto(f"{base}/teach?topic={topic}")
    _settle(page)
    before = {r.id for r in store.list_runs()}
    page.get_by_role("button", name="Run this demo").click()
    started = time.monotonic()
    page.get_by_text("run(s) queued; a worker trains them").wait_for(timeout=30_000)
    deadline = started + timeout_s
    runs = []
    while time.monotonic() < deadline:
        runs = [r for r in store.list_runs() if r.id not in before]
        if runs and all(r.is_terminal for r in runs):
            break
        time.sleep(0.5)
    took = time.monotonic() - started
    assert runs and all(r.status == "finished" for r in runs), [(r.id, r.status) for r in runs]
    page.wait_for_timeout(2500)   # the fragment's last refresh, then the static redraw
    _settle(page)
    assert page.url.startswith(f"{base}/teach"), "the demo must not send the teacher to another page"
    return took, runs


def test_teacher_runs_every_demo_on_the_teach_page_and_reads_live_overview(served):
    base, store = served
    timings = {}
    with _browser_page() as page:
        page.goto(base)
        _settle(page)
        page.get_by_text("Worker alive").wait_for(timeout=30_000)

        # three regimes: three labelled curves appear on the Teach page itself
        took, runs = _run_demo(page, base, store, "regimes", 180)
        page.wait_for_function("() => document.querySelectorAll('.js-plotly-plot').length >= 2", timeout=30_000)
        labels = _labelled_curves(page)
        assert sorted(labels) == sorted(r.regime.replace("_", " ") for r in runs) and len(labels) == 3, labels
        assert {"convergence", "divergence"} <= set(labels), labels   # the middle one: see test_presets
        timings["Three regimes on digits"] = round(took, 1)
        assert _check_log_ticks(page) > 0
        _screenshot(page, "teach_regimes")

        took, [run] = _run_demo(page, base, store, "periodic", 240)
        timings["Periodic behaviour"] = round(took, 1)
        assert page.get_by_text("loss spikes").count() and _check_log_ticks(page) > 0
        _screenshot(page, "teach_periodic")

        took, runs = _run_demo(page, base, store, "sharpness", 300)
        timings["Sharpness vs 2/ELR"] = round(took, 1)
        legend = page.evaluate("() => (document.querySelector('.js-plotly-plot')._fullData || [])"
                               ".map(t => t.name)")
        assert sum("2(1+μ)/elr" in name for name in legend) == len(runs) == 3, legend
        _screenshot(page, "teach_sharpness")
        (ROOT / "artifacts" / "demo_timings.json").write_text(json.dumps(timings, indent=2))

        # Live's overview of a 16-run sweep fits in one 1400x900 screen
        page.goto(f"{base}/launch?preset=ELR+sweep+on+digits")
        _settle(page)
        page.get_by_role("button", name="Queue “ELR sweep on digits”").click()
        page.get_by_text("Queued 16 run(s)").wait_for(timeout=30_000)
        page.goto(f"{base}/live")
        _settle(page)
        table = page.locator('[data-testid="stDataFrame"]').first
        table.wait_for(timeout=30_000)
        box = table.bounding_box()
        assert box["y"] + box["height"] <= 900, box
        page.screenshot(path=str(SHOTS / "live_overview_16.png"))   # exactly what one screen shows
        deadline = time.monotonic() + 240
        while any(not r.is_terminal for r in store.list_runs()) and time.monotonic() < deadline:
            time.sleep(1)
        sweep = store.list_sweeps()[0]
        page.goto(f"{base}/regime_map?sweep={sweep.id}")
        _settle(page)
        _check_log_ticks(page)
        _screenshot(page, "regime_map_16")
        page.goto(f"{base}/compare?runs={','.join(map(str, sweep.run_ids[:8]))}&metric=train_loss"
                  "&x=eff_grad_norm&log=x,train_loss")
        _settle(page)
        _check_log_ticks(page)
        _screenshot(page, "compare_phase")
    print("demo timings through the dashboard (s):", timings)


def test_user_text_stays_text_in_the_browser(served):
    base, store = served
    sweep_id, [run_id] = store.create_sweep_runs(EVIL, {}, [{"config": {"mode": "lrwd"}, "name": EVIL, "tags": [EVIL]}])
    store.log_metrics(run_id, [(s, s / 10, s / 10, {"train_loss": 2.0 / (s + 1), "test_acc": 0.5, "si_norm": 3.0,
                                                   "elr": 0.01}) for s in range(0, 200, 10)])
    store.set_notes(run_id, EVIL)
    store.update_run(run_id, status="failed", error=EVIL)
    with _browser_page() as page:
        for path in (f"run?run={run_id}", "live", f"compare?runs={run_id}", f"regime_map?sweep={sweep_id}"):
            page.goto(f"{base}/{path}")
            _settle(page)
            assert page.get_by_text("evil.example").count() > 0, path     # the name is shown, as text
            assert page.locator('a[href^="http://evil.example"]').count() == 0, path
            assert page.locator('img[src^="http://evil.example"]').count() == 0, path
            assert 'href="http://evil.example"' not in page.content(), path
        page.goto(f"{base}/run?run={run_id}")
        _settle(page)
        _screenshot(page, "plain_text_names")
