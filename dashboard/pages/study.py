"""Study: a learning-rate study (the large-LR paper's protocol) — pre-training over a PLR grid, fine-tuning, averaging and
the geometry between solutions — its progress, followed live while the workers train it, and its
report as charts, a table and a summary in words."""
import streamlit as st

from dashboard import study, ui, views
from dashboard.plain import md
from storage import Store


def main(store: Store) -> None:
    studies = store.list_studies()
    if not studies:
        st.info("No study in this database yet. Launch one on the Launch page (the *Study* tab: a preset is one "
                "click), from Teach's last step, or from a shell: `python -m engine study --submit …`.")
        st.page_link(ui.LAUNCH_PAGE, label="Go to Launch", icon=":material/rocket_launch:")
        return
    study_id = ui.pick("Study", {s.id: study.study_label(s) for s in studies}, "study", "study")
    info = store.get_study(study_id)
    st.caption(md(study.pieces(info.spec)) + " · " + md(f"pre-training {info.spec['pretrain_epochs']} epochs, "
               f"fine-tuning {info.spec['finetune_epochs']}, average of the last {info.spec['average']}"))
    ui.follow(views.study_result, store, [], study_id, going=lambda: store.get_study(study_id).status == "running")
    links = st.columns(2)
    if info.sweep_id:
        links[0].page_link(ui.REGIME_PAGE, label="The pre-training sweep's regime map", icon=":material/scatter_plot:",
                           query_params={"sweep": str(info.sweep_id)})
    links[1].page_link(ui.LIVE_PAGE, label="Its runs on Live", icon=":material/monitoring:")
    if info.status == "running" and info.owner is None:   # the workers advance it: is one alive?
        ui.follow(ui.worker_panel, store, [], going=lambda: store.get_study(study_id).status == "running")


ui.run_page("Study", main, "Where do large learning rates lead us? Pre-train over a grid of ELRs (PLR), fine-tune "
            "each end point at small ELRs (FLR), average its last checkpoints, and compare the solutions.")
