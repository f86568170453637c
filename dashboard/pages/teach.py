"""Teach: a guided walkthrough — scale invariance, ELR = lr/ρ², the three regimes, periodic
behaviour, sharpness — each with its formulas and, where it has one, a one-click digits demo."""
import re
from collections import Counter

import streamlit as st

from dashboard import data, estimate, solutions, ui, views
from dashboard import study as studies
from dashboard.plain import md
from engine.config import ConfigError
from engine.presets import PRESETS, STUDY_PRESETS
from engine.study import BASIN_BARRIER, BASIN_LOSS_BARRIER
from engine.submission import queue_runs
from storage import Store

TOPICS = {"invariance": "1 · Scale invariance", "elr": "2 · Effective learning rate",
          "regimes": "3 · Three regimes", "periodic": "4 · Periodic behaviour", "sharpness": "5 · Sharpness",
          "solutions": "6 · Branch, average, compare solutions", "study": "7 · Where do large learning rates lead us?"}
DEMOS = {"regimes": "Three regimes on digits", "periodic": "Periodic behaviour", "sharpness": "Sharpness vs 2/ELR"}
SHARPNESS_TOP = max(PRESETS[DEMOS["sharpness"]].swept["elr"])    # the demo's ELR that hovers at its line


def invariance() -> None:
    st.markdown("Put a BatchNorm without learned scale right after every weight layer and freeze the "
                "classifier head: the network's output no longer depends on the length of its weight "
                "vector *w*, only on its direction.")
    st.latex(r"f(\alpha w) = f(w) \quad \text{for every } \alpha > 0")
    st.markdown("Two consequences you can check numerically: the gradient is tangent to the sphere, and "
                "it shrinks as the weights grow.")
    st.latex(r"\langle \nabla L(w),\, w \rangle = 0, \qquad \nabla L(\alpha w) = \frac{\nabla L(w)}{\alpha},"
             r"\qquad \nabla^2 L(\alpha w) = \frac{\nabla^2 L(w)}{\alpha^2}")
    st.markdown("So the norm ρ = ‖w‖ does not change what the network computes — it only changes how far a "
                "gradient step moves the *direction*. That is the next step.")


def effective_lr() -> None:
    st.markdown("A step of size η at norm ρ turns the direction w/ρ by about η‖∇L(w/ρ)‖/ρ². What matters "
                "is the **effective learning rate**:")
    st.latex(r"\mathrm{ELR} = \frac{\eta}{\rho^2}")
    st.markdown("**sphere** mode fixes the ELR: after each step the weights go back onto the sphere of "
                "their initial radius ρ₀, with η = ELR·ρ₀². **lrwd** mode is plain SGD with weight decay λ: "
                "the ELR is measured, and moves because ρ does.")
    st.latex(r"\rho_{t+1}^2 = (1-\eta\lambda)^2 \rho_t^2 + \eta^2 \|g_t\|^2"
             r"\qquad\Longrightarrow\qquad \mathrm{ELR}\cdot\|\tilde g\| \approx \sqrt{2\eta\lambda}"
             r"\ \text{at equilibrium}")
    st.markdown("Weight decay shrinks the norm, gradients grow it; where they balance, the ELR settles. "
                "Watch `si_norm` and `elr` in the periodic behaviour demo (step 4).")


def regimes() -> None:
    st.markdown("Sweep the ELR and a scale-invariant network lands in one of three regimes:")
    st.markdown("- **convergence** (small ELR): the train loss keeps falling towards 0.\n"
                "- **chaotic equilibrium** (medium ELR): the loss settles at a non-zero level and "
                "fluctuates; norm-free quantities (effective gradient norm, angular update) become stationary.\n"
                "- **divergence** (large ELR): the network never learns — accuracy stays at chance.")
    st.latex(r"\text{effective gradient norm} = \|\nabla L(w)\|\cdot\rho \quad\text{(scale-free)}")
    st.markdown("The label comes from each run's logged trace only, never from its ELR. The demo trains an MLP on "
                "the 8×8 digits at three ELRs and draws them here as they learn, then their regime map.")


def periodic() -> None:
    st.markdown("With weight decay, training after the loss gets small is periodic: weight decay shrinks ρ, "
                "so the ELR grows until a step is too large for the curvature; the loss spikes, the large "
                "gradients blow ρ up, the ELR drops, and the cycle starts again.")
    st.latex(r"\rho \downarrow \;\Rightarrow\; \mathrm{ELR} = \frac{\eta}{\rho^2} \uparrow \;\Rightarrow\;"
             r"\text{instability: loss spike, } \rho \uparrow \;\Rightarrow\; \mathrm{ELR} \downarrow")
    st.markdown("The demo below reads **periodic**: its `train_loss` spikes, and each spike comes with a jump in "
                "`si_norm` and a drop in `elr` (a loss spike without them would not count). Its period is the "
                "median spacing of the spikes, shown with how much that spacing varies. On the right, the cycle: "
                "`elr` against the effective gradient norm goes round a loop once per period.")


def sharpness() -> None:
    st.markdown("A gradient step of size ELR (at unit norm) is stable only where the curvature is below "
                "2/ELR. Training pushes the sharpness — the top Hessian eigenvalue at unit norm — up towards "
                f"that line. At small ELRs it stays well below it; at a large enough one (here {SHARPNESS_TOP:g}, a "
                "chaotic equilibrium) it reaches the line and **hovers around it**: above it at some measurements, "
                "below it at others.")
    st.latex(r"\text{sharpness} = \lambda_{\max}\!\left(\nabla^2 L\right)\rho^2, \qquad "
             r"\text{stability line} = \frac{2(1+\mu)}{\mathrm{ELR}}")
    st.markdown("The demo measures the sharpness during three digits runs and draws each one against its own "
                "stability line (dashed, same colour); below the chart, how often each run is above its line.")


def branching() -> None:
    st.markdown("Where does a large learning rate lead? Train at a fixed ELR, keep checkpoints along the way, "
                "and then ask three questions of the point the run reached:")
    st.markdown("- **Branch (fine-tune).** Continue from a kept checkpoint at a *smaller* ELR. In a chaotic "
                "equilibrium the large ELR keeps the weights bouncing around a region; the small one descends "
                "into whatever basin that region holds.\n"
                "- **Average (SWA).** Take the mean of the weights of the last K checkpoints, recompute the "
                "BatchNorm statistics, evaluate. The bouncing iterates sit around a basin; their mean can sit "
                "closer to its bottom than any of them.\n"
                "- **Compare solutions.** The angle between two weight vectors, and the loss along the straight "
                "path from one to the other (each point projected to the sphere). The **barrier** is how far the "
                "path rises above the straight line between its ends' values:")
    st.latex(r"\text{barrier} = \max_{\alpha\in[0,1]}\Big[L\big(w(\alpha)\big) - (1-\alpha)\,L(a) - \alpha\,L(b)\Big],"
             r"\qquad w(\alpha) = (1-\alpha)\,a + \alpha\,b")
    st.markdown("A barrier near 0 means A and B lie in one basin; a large one, that a ridge separates them. The "
                "paper behind this (Sadrtdinov et al., *Where do large learning rates lead us?*) finds that only "
                "pre-training ELRs slightly above the convergence threshold lead to the best fine-tuned and "
                "averaged models: too small an ELR ends in an unstable minimum, too large a one never finds a good "
                "basin.")


STUDY_DEMO = "Where do large learning rates lead us? (ticks)"


def large_lr() -> None:
    st.markdown("Step 6 asked the question for one run. The paper's protocol (Sadrtdinov et al.) asks it for a whole "
                "grid of learning rates, each with several seeds, and compares:")
    st.markdown("1. **Pre-train** on the sphere at each ELR of a log grid — the *PLR* — for a fixed number of "
                "iterations, once per run seed and data seed. Each run lands in a regime, read from its own trace: "
                "convergence (1), chaotic equilibrium (2) or divergence (3). Once the grid is done, the study adds "
                "PLRs at 1, 1.15, 1.33, 1.5 and 2× the estimated convergence threshold (*refinement*).\n"
                "2. **Fine-tune** every end point at small ELRs — the *FLR* — so that the weights descend into "
                "whatever basin the pre-training reached.\n"
                "3. **Average** the last K checkpoints of each pre-training (SWA; BatchNorm statistics, where the model "
                "has them, recomputed).\n"
                "4. **Compare**: the angle and barriers between each run's solutions, and test accuracy of the "
                "pre-trained, fine-tuned and averaged models against the PLR. Which model is best is decided on a "
                "separate **validation** split; the accuracy reported is on **test**, which the choice never saw.\n"
                "5. **Pair up**: a run's outcome just above the threshold is a coin toss (it locks onto a few "
                "features or it does not), so the unit of evidence is a (data seed, run seed) pair. For each pair: "
                "its best 2A model minus its best model from a PLR where its own run converged. The mean of those "
                "gains with a bootstrap 95% interval decides: a **win** only when the whole interval is above 0, "
                "otherwise **not separated** (with the fraction of pairs that gained) or a **loss**.")
    st.markdown("The **convergence threshold** is estimated between the largest PLR that converged and the "
                "smallest that did not; a PLR is then read as a multiple of it (the paper's best PLR is ≈ 3× it):")
    st.latex(r"\mathrm{PLR}^{*} \approx \sqrt{\mathrm{PLR}_{\text{last converging}}\cdot"
             r"\mathrm{PLR}_{\text{first non-converging}}},\qquad \text{ratio} = \frac{\mathrm{PLR}}{\mathrm{PLR}^{*}}")
    st.markdown("**Sub-regimes 2A and 2B.** Inside the chaotic equilibrium, the geometry splits the PLRs: in **2A** "
                "the fine-tuned models and the average of one pre-training run lie in one basin (every barrier between "
                f"them at most {BASIN_BARRIER:.0%} validation error and {BASIN_LOSS_BARRIER:g} train loss, limits "
                "measured on this toy); in **2B** a barrier separates them — the large PLR keeps the weights moving "
                "between basins. Each pair gets its own sub-regime; a PLR's is shown only when all its pairs agree.")
    st.markdown("**Features.** The toy data (*ticks*) has 16 independent features, each alone enough to classify. "
                "A probe set per feature keeps only that feature informative; the accuracy on it says how much the "
                "model relies on it — strongly on a few features, or weakly on many.")
    st.markdown("**What to look for** in the charts below, as the study fills them in: which regime the best "
                "model's PLR is in, and how far above the convergence threshold (the star's label says); whether "
                "fine-tuning and averaging help more at some PLRs than at others; whether the barriers stay near 0 "
                "just above the threshold and grow further up; and whether the feature rows change from one regime "
                "to the next. The paper reports that the best models come from PLRs slightly above the convergence "
                "threshold (2A); this toy, with its seeds, may or may not show the same — the summary and the "
                "paired-gain chart say what the numbers here show, and how sure they are.")


SECTIONS = {"invariance": invariance, "elr": effective_lr, "regimes": regimes, "periodic": periodic,
            "sharpness": sharpness, "solutions": branching, "study": large_lr}


def regimes_view(store: Store, run_ids: list[int]) -> None:
    """The demo's runs overlaid as they train, each curve ending in its regime, with the reading
    guide beside them; then the regime map of the same sweep."""
    runs = sorted(store.list_runs(ids=run_ids), key=lambda r: r.id)
    chart, words = st.columns([3, 1])
    with chart:
        views.runs_overlay(store, runs, ["train_loss", "eff_grad_norm"], cols=1, row_height=300, key="teach-overlay")
    with words:
        st.markdown("**How to read it**")
        st.markdown("- **convergence**: the train loss keeps falling, and so does the effective gradient norm.\n"
                    "- **chaotic equilibrium**: the loss stops at a level above zero and jitters; the effective "
                    "gradient norm goes flat.\n"
                    "- **divergence**: the loss stays at its untrained level; the gradient norm is huge.")
        for run in runs:
            ui.regime_badge(run.regime)
            st.caption(md(f"{data.run_label(run)}: {run.status}, {run.progress:.0%}"))
    sweep_id = runs[0].sweep_id if runs else None
    if sweep_id is not None:
        st.markdown("**The regime map of this sweep**: each run's tail loss against its ELR.")
        views.sweep_map(store, sweep_id, compact=True)


def periodic_view(store: Store, run_ids: list[int]) -> None:
    views.periodic_part(store, run_ids[0])


def sharpness_view(store: Store, run_ids: list[int]) -> None:
    views.sharpness_part(store, run_ids)


VIEWS = {"regimes": regimes_view, "periodic": periodic_view, "sharpness": sharpness_view}


def demo(store: Store, topic: str) -> list[int]:
    """The demo's button, then its runs drawn here as they train (and the links to the full pages);
    returns the demo's run ids."""
    preset = PRESETS.get(DEMOS[topic])
    if preset is None:
        return []
    st.markdown(f"**Demo — {preset.name}.** {preset.description}")
    st.caption(estimate.describe(preset.configs()))
    queued = st.session_state.setdefault("demo_runs", {})
    param = f"runs_{topic}"   # the demo's runs in the URL: a shared link shows them
    ui.seed(param, queued.get(topic, []), ui.int_list, allowed=[r.id for r in store.list_runs()], noun="run")
    if st.session_state[param]:
        queued[topic] = st.session_state[param]
    if st.button("Run this demo", type="primary", key=f"demo-{topic}", icon=":material/play_arrow:"):
        try:
            queued[topic] = queue_runs(store, preset.configs(), preset.swept, preset.name)
        except ConfigError as exc:
            st.error(f"Not queued: {md(exc)}")
    run_ids = [i for i in queued.get(topic, []) if store.list_runs(ids=[i])]
    ui.publish(param, run_ids)
    if not run_ids:
        return []
    first = store.get_run(run_ids[0])
    st.success(demo_status(store.list_runs(ids=run_ids)))
    ui.follow(VIEWS[topic], store, run_ids, run_ids)
    links = st.columns(3)
    links[0].page_link(ui.LIVE_PAGE, label="Controls on Live", icon=":material/monitoring:")
    if first.sweep_id:
        links[1].page_link(ui.REGIME_PAGE, label="Full regime map", icon=":material/scatter_plot:",
                           query_params={"sweep": str(first.sweep_id)})
    links[2].page_link(ui.PERIODIC_PAGE, label="Periodic page", icon=":material/waves:",
                       query_params={"run": str(first.id)})
    return run_ids


def solutions_demo(store: Store) -> list[int]:
    """The branch/average/geometry demo: one click queues the parent; this page queues each next step
    as the previous one ends (solutions.advance_demo) and draws them; returns the demo's run ids."""
    fork_elrs = " and ".join(f"{e:g}" for e in solutions.DEMO_FORK_ELRS)
    st.markdown(f"**Demo — branch, average, compare.** An MLP on digits trains {solutions.DEMO_PARENT.epochs} epochs "
                f"at ELR {solutions.DEMO_PARENT.elr:g} (a chaotic equilibrium), keeping a checkpoint every "
                f"{solutions.DEMO_PARENT.keep_every} epochs. At epoch {solutions.DEMO_AT} it branches twice, at ELR "
                f"{fork_elrs}, for {solutions.DEMO_FORK_EPOCHS} epochs each; its last {solutions.DEMO_LAST} "
                f"checkpoints are averaged; then the angle and the path between the two branches are measured "
                f"({solutions.DEMO_POINTS} points). This page queues each step when the one before ends: keep it "
                "open.")
    st.caption(estimate.describe([solutions.DEMO_PARENT]) + " Then the branches, the average and the geometry: "
               "about a minute in all on two CPU cores.")
    param = "runs_solutions"   # the demo's parent in the URL: a shared link shows it
    ui.seed(param, st.session_state.get("demo_runs", {}).get("solutions", []), ui.int_list,
            allowed=[r.id for r in store.list_runs()], noun="run")
    if st.button("Run this demo", type="primary", key="demo-solutions", icon=":material/play_arrow:"):
        st.session_state[param] = [solutions.start_demo(store)]
    parent = [i for i in st.session_state[param][:1] if store.list_runs(ids=[i])]
    st.session_state.setdefault("demo_runs", {})["solutions"] = parent
    ui.publish(param, parent)
    if not parent:
        return []
    state = solutions.advance_demo(store, parent[0])
    st.success(state.stage)
    ids = [state.parent.id, *(f.id for f in state.forks)]
    jobs = [j.id for j in (state.average, state.geometry) if j is not None]
    ui.follow(solutions_view, store, ids, parent[0], tuple(ids), tuple(jobs), job_ids=jobs)
    links = st.columns(3)
    links[0].page_link(ui.RUN_PAGE, label="The parent's Run page", icon=":material/insights:",
                       query_params={"run": str(state.parent.id)})
    if state.forks:
        links[1].page_link(ui.COMPARE_PAGE, label="Compare the branches", icon=":material/stacked_line_chart:",
                           query_params={"runs": ",".join(str(f.id) for f in state.forks), "ancestors": "1",
                                         "metric": "train_loss,test_acc"})
    if state.geometry is not None:
        links[2].page_link(ui.SOLUTIONS_PAGE, label="The geometry on the Solutions page", icon=":material/straighten:",
                           query_params={"job": str(state.geometry.id)})
    return ids


def solutions_view(store: Store, parent_id: int, ids: tuple, jobs: tuple) -> None:
    """The demo as it goes: the parent with its branches continuing it, test accuracies, the geometry."""
    state = solutions.advance_demo(store, parent_id)
    now_ids = (state.parent.id, *(f.id for f in state.forks))
    now_jobs = tuple(j.id for j in (state.average, state.geometry) if j is not None)
    if now_ids != ids or now_jobs != jobs:
        st.rerun(scope="app")   # a step was queued: follow its runs and jobs too
    runs = [state.parent, *state.forks]
    views.family_overlay(store, runs, key="teach-branches")
    cols = st.columns(4)
    cols[0].metric("parent, last test_acc", _acc(views.last_value(store, state.parent.id, "test_acc")))
    for col, fork in zip(cols[1:3], state.forks):
        col.metric(f"branch ELR {fork.config.get('elr'):g}, last test_acc", _acc(views.last_value(store, fork.id, "test_acc")))
    average = state.average.result if state.average is not None and state.average.status == "finished" else None
    cols[3].metric(f"average of the last {solutions.DEMO_LAST}, test_acc", _acc(average and average["test_acc"]))
    if state.geometry is not None:
        views.geometry_result(store, state.geometry.id)


def protocol_text(preset) -> str:
    """What the study preset does, from its fields (its description also says what it should find:
    here the page describes, and the data speak), with the preset's own time estimate."""
    plrs, flrs = preset.pretrain_elrs, preset.finetune_elrs
    steps = preset.base.train_size // preset.base.batch_size if preset.base.train_size and preset.base.batch_size else None
    iterations = f" ({preset.pretrain_epochs * steps:,} iterations)" if steps else ""
    took = re.search(r"About .*?\.(?=\s|$)", preset.description)   # to a sentence's end, past "BENCHMARKS.md"
    return (f"{preset.base.model} on {preset.base.dataset}: pre-train {len(plrs)} PLRs from {min(plrs):g} to "
            f"{max(plrs):g} for {preset.pretrain_epochs} epochs{iterations}, {len(preset.seeds)} run seeds × "
            f"{len(preset.data_seeds)} data seed(s) each"
            + (", then PLRs refined around the convergence threshold" if preset.refine else "")
            + f"; fine-tune every end point at FLR {' and '.join(f'{f:g}' for f in flrs)} for {preset.finetune_epochs} "
            f"epochs; average its last {preset.average} checkpoints; measure the geometry between the solutions; "
            "choose on validation, report on test, and compare per (data seed, seed) pair."
            + (f" {took.group(0)}" if took else ""))


def study_demo(store: Store) -> list[int]:
    """The study demo: one click creates the ticks study for the workers; the page draws the Study
    page's charts as it fills in; returns the study's run ids."""
    preset = STUDY_PRESETS[STUDY_DEMO]
    st.markdown(f"**Demo — {md(preset.name)}.** {md(protocol_text(preset))}")
    spec = {"pretrain_elrs": preset.pretrain_elrs, "seeds": preset.seeds, "data_seeds": preset.data_seeds,
            "finetune_elrs": preset.finetune_elrs, "refine": preset.refine}
    st.caption(studies.pieces(spec) + ". The workers train it; this page follows it (so does the Study page).")
    param = "study_demo"   # the demo's study in the URL: a shared link shows it
    ui.seed(param, st.session_state.get("demo_study"), int, allowed=[s.id for s in store.list_studies()], noun="study")
    if st.button("Run this demo", type="primary", key="demo-study", icon=":material/play_arrow:"):
        try:
            st.session_state[param] = studies.launch_preset(store, preset)
        except ConfigError as exc:
            st.error(f"Not queued: {md(exc)}")
    study_id = st.session_state.get(param)
    if study_id is not None and not any(s.id == study_id for s in store.list_studies()):
        study_id = None
    st.session_state["demo_study"] = study_id
    ui.publish(param, study_id)
    if study_id is None:
        return []
    ui.follow(lambda s, i: views.study_result(s, i, key="teach-study"), store, [], study_id,
              going=lambda: store.get_study(study_id).status == "running")
    st.page_link(ui.STUDY_PAGE, label="The same study on the Study page", icon=":material/science:",
                 query_params={"study": str(study_id)})
    return [r.id for r in store.list_runs(study_id=study_id)]


_acc = data.acc_text


def demo_status(runs) -> str:
    """What the demo's runs are doing, for the line above them (redrawn when they all end)."""
    if all(r.is_terminal for r in runs):
        ended = Counter(r.status for r in runs)
        return f"The demo's {len(runs)} run(s) have ended: " + ", ".join(f"{n} {status}" for status, n in ended.items()) + "."
    return f"{len(runs)} run(s) queued; a worker trains them and they appear below as they learn."


def main(store: Store) -> None:
    ui.seed("topic", "invariance", allowed=list(TOPICS))
    topic = st.segmented_control("Topic", list(TOPICS), format_func=TOPICS.get, key="topic", required=True)
    ui.publish("topic", topic, "invariance")
    st.divider()
    SECTIONS[topic]()
    if topic in DEMOS or topic in ("solutions", "study"):
        st.divider()
        panel = st.container()
        run_ids = demo(store, topic) if topic in DEMOS else solutions_demo(store) if topic == "solutions" \
            else study_demo(store)
        with panel:   # drawn after the button queued the demo, and kept current while it trains
            ui.follow(ui.worker_panel, store, run_ids)
    order = list(TOPICS)
    if topic != order[-1]:
        upcoming = order[order.index(topic) + 1]
        st.button(f"Next: {TOPICS[upcoming]}", key="next", icon=":material/arrow_forward:",
                  on_click=lambda: st.session_state.update(topic=upcoming))


ui.run_page("Teach", main, "Scale-invariant networks in seven short steps. Each demo trains small MLPs on "
            "this machine's CPU: on the 8×8 digits, and on the ticks toy for the study.")
