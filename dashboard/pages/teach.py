"""Teach: a guided walkthrough — scale invariance, ELR = lr/ρ², the three regimes, periodic
behaviour, sharpness — each with its formulas and, where it has one, a one-click digits demo."""
import streamlit as st

from engine.submission import queue_runs
from dashboard import launch, ui
from engine.config import ConfigError
from engine.presets import PRESETS
from storage import Store

TOPICS = {"invariance": "1 · Scale invariance", "elr": "2 · Effective learning rate",
          "regimes": "3 · Three regimes", "periodic": "4 · Periodic behaviour", "sharpness": "5 · Sharpness"}
DEMOS = {"regimes": "Three regimes on digits", "periodic": "Periodic behaviour", "sharpness": "Sharpness vs 2/ELR"}


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
                "Watch `si_norm` and `elr` on the Live page while any lrwd run trains.")


def regimes() -> None:
    st.markdown("Sweep the ELR and a scale-invariant network lands in one of three regimes:")
    st.markdown("- **convergence** (small ELR): the train loss keeps falling towards 0.\n"
                "- **chaotic equilibrium** (medium ELR): the loss settles at a non-zero level and "
                "fluctuates; norm-free quantities (effective gradient norm, angular update) become stationary.\n"
                "- **divergence** (large ELR): the network never learns — accuracy stays at chance.")
    st.latex(r"\text{effective gradient norm} = \|\nabla L(w)\|\cdot\rho \quad\text{(scale-free)}")
    st.markdown("The label comes from each run's logged trace only, never from its ELR. The demo runs an MLP on "
                "the 8×8 digits at three ELRs; then the regime map shows the boundaries.")


def periodic() -> None:
    st.markdown("With weight decay, training after the loss gets small is periodic: weight decay shrinks ρ, "
                "so the ELR grows until a step is too large for the curvature; the loss spikes, the large "
                "gradients blow ρ up, the ELR drops, and the cycle starts again.")
    st.latex(r"\rho \downarrow \;\Rightarrow\; \mathrm{ELR} = \frac{\eta}{\rho^2} \uparrow \;\Rightarrow\;"
             r"\text{instability: loss spike, } \rho \uparrow \;\Rightarrow\; \mathrm{ELR} \downarrow")
    st.markdown("On the Periodic page the spikes in `train_loss` line up with jumps in `si_norm` and drops "
                "in `elr`, and the period is estimated from their spacing.")


def sharpness() -> None:
    st.markdown("A gradient step of size ELR (at unit norm) is stable only where the curvature is below "
                "2/ELR. The sharpness — the top Hessian eigenvalue at unit norm — is pushed up to that line "
                "and cannot stay above it.")
    st.latex(r"\text{sharpness} = \lambda_{\max}\!\left(\nabla^2 L\right)\rho^2 \;\lesssim\; "
             r"\frac{2(1+\mu)}{\mathrm{ELR}}")
    st.markdown("The demo measures the sharpness during three digits runs; the Periodic page draws it "
                "against `sharpness_threshold`.")


SECTIONS = {"invariance": invariance, "elr": effective_lr, "regimes": regimes, "periodic": periodic,
            "sharpness": sharpness}


def demo(store: Store, topic: str) -> None:
    preset = PRESETS.get(DEMOS[topic])
    if preset is None:
        return
    st.markdown(f"**Demo — {preset.name}.** {preset.description}")
    queued = st.session_state.setdefault("demo_runs", {})
    if st.button("Run this demo", type="primary", key=f"demo-{topic}", icon=":material/play_arrow:"):
        try:
            queued[topic] = queue_runs(store, preset.configs(), preset.swept, preset.name)
        except ConfigError as exc:
            st.error(f"Not queued: {exc}")
    if topic in queued:
        first = store.get_run(queued[topic][0])
        st.success(f"Queued {len(queued[topic])} run(s). A worker trains them; watch them arrive.")
        links = st.columns(2)
        links[0].page_link(ui.LIVE_PAGE, label="Watch on Live", icon=":material/monitoring:")
        if first.sweep_id:
            links[1].page_link(ui.REGIME_PAGE, label="Regime map", icon=":material/scatter_plot:",
                               query_params={"sweep": str(first.sweep_id)})
        else:
            links[1].page_link(ui.PERIODIC_PAGE, label="Periodic view", icon=":material/waves:",
                               query_params={"run": str(first.id)})


def main(store: Store) -> None:
    ui.seed("topic", "invariance", allowed=list(TOPICS))
    topic = st.segmented_control("Topic", list(TOPICS), format_func=TOPICS.get, key="topic", required=True)
    ui.publish("topic", topic, "invariance")
    st.divider()
    SECTIONS[topic]()
    if topic in DEMOS:
        st.divider()
        ui.worker_panel(store)
        demo(store, topic)
    order = list(TOPICS)
    if topic != order[-1]:
        upcoming = order[order.index(topic) + 1]
        st.button(f"Next: {TOPICS[upcoming]}", key="next", icon=":material/arrow_forward:",
                  on_click=lambda: st.session_state.update(topic=upcoming))


ui.run_page("Teach", main, "Scale-invariant networks in five short steps. Each demo trains a small MLP on "
            "the 8×8 digits on this machine's CPU.")
