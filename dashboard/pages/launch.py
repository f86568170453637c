"""Launch: queue a preset, a run or a sweep for the worker, and see whether a worker is alive."""
import streamlit as st

from dashboard import estimate, launch, ui
from dashboard import study as studies
from dashboard.plain import md
from engine.config import (CHECKPOINTS, DATASETS, IMAGE_DATASETS, MEASUREMENT, MODEL_DATA, MODELS, NORMS, OPTIMISATION,
                           OPTIONS, WHERE, ConfigError, Option)
from engine.presets import PRESETS, STUDY_PRESETS
from engine.submission import queue_runs
from storage import Store

# Upper bounds on the sweep builder's and the study form's numbers: what a laptop-and-lecture tool can
# sensibly queue in one click.
MAX_POINTS, MAX_SEEDS, MAX_EPOCHS, MAX_WIDTH, MAX_DEPTH = 64, 20, 100_000, 4096, 64


def show_queued(store: Store, run_ids: list[int]) -> None:
    first = store.get_run(run_ids[0])
    where = f" as sweep #{first.sweep_id}" if first.sweep_id else ""
    st.success(f"Queued {len(run_ids)} run(s){where}: #{', #'.join(map(str, run_ids))}.")
    live, sweep_map = st.columns(2)
    live.page_link(ui.LIVE_PAGE, label="Watch them on Live", icon=":material/monitoring:")
    if first.sweep_id:
        sweep_map.page_link(ui.REGIME_PAGE, label="Regime map of this sweep", icon=":material/scatter_plot:",
                            query_params={"sweep": str(first.sweep_id)})


def submit(store: Store, make) -> None:
    """Build and queue; bad input (including a missing CIFAR folder) is one message, nothing written."""
    try:
        configs, swept, name = make()
        with st.spinner("Checking and queueing…"):
            run_ids = queue_runs(store, configs, swept, name)
    except ConfigError as exc:
        st.error(f"Not queued: {md(launch.form_message(exc))}")
        return
    show_queued(store, run_ids)


def preset_section(store: Store) -> None:
    names = list(PRESETS)
    ui.seed("preset", names[0], allowed=names)
    preset = PRESETS[st.selectbox("Preset", names, key="preset")]
    ui.publish("preset", preset.name, names[0])
    st.write(preset.description)
    configs = preset.configs() if not preset.needs_data_dir else []
    if preset.swept:
        swept = ", ".join(f"{key} ∈ {{{', '.join(f'{v:g}' for v in values)}}}" for key, values in preset.swept.items())
        st.caption(f"{len(configs) or 'several'} runs: {swept}")
    if preset.expected_regimes:
        st.caption("Expected regimes: " + ", ".join(r.replace("_", " ") for r in preset.expected_regimes))
    if configs:
        st.caption(estimate.describe(configs))
    data_dir = ""
    if preset.needs_data_dir:
        data_dir = st.text_input("Data folder (holding cifar-10-batches-py/)", key="preset_data_dir",
                                 placeholder="/data/cifar")
    if st.button(f"Queue “{preset.name}”", type="primary", key="queue_preset", icon=":material/send:"):
        submit(store, lambda: (preset.configs(**({"data_dir": data_dir.strip() or None}
                                                 if preset.needs_data_dir else {})),
                               preset.swept, preset.name))


# The form's numbers stay within what a browser holds exactly (2**53 - 1); the checks made when the
# config is created say what is allowed beyond that.
BROWSER_MAX_INT = 2**53 - 1


def option_field(form: launch.LaunchForm, opt: Option) -> None:
    """The field of one run option, made from its declaration (engine.config.OPTIONS)."""
    key, label, start = f"f_{opt.name}", f"{opt.label} ({opt.hint})" if opt.hint else opt.label, launch.form_start(opt)
    if opt.choices:
        if opt.widget == "radio":
            value = st.radio(label, opt.choices, key=key, horizontal=True, help=opt.help)
        else:
            value = st.selectbox(label, opt.choices, key=key, help=opt.help)
    elif opt.kind is bool:
        value = st.checkbox(label, value=start, key=key, help=opt.help)
    elif opt.kind is int:
        low = 0 if opt.default is None else opt.low
        high = min(opt.high, BROWSER_MAX_INT) if opt.high is not None else None
        value = st.number_input(label, min_value=low, max_value=high, value=start, key=key, help=opt.help)
    elif opt.kind is float:
        low = opt.low if opt.low is not None else opt.above
        value = st.number_input(label, min_value=None if low is None else float(low), value=float(start), key=key,
                                help=opt.help, format="%.2e" if opt.widget == "log" else None)
    elif opt.kind == "tags":
        value = ui.str_list(st.text_input(label, key=key, help=opt.help))
    else:
        value = st.text_input(label, value=start, key=key, help=opt.help, max_chars=200)
    form.values[opt.name] = value


def rate_range(form: launch.LaunchForm) -> None:
    start, stop, points = st.columns(3)
    form.rate_start = start.number_input(f"{form.rate_key.upper()} from", min_value=0.0, value=1e-4,
                                         format="%.1e", key="f_start")
    form.rate_stop = stop.number_input("to", min_value=0.0, value=1.0, format="%.1e", key="f_stop")
    form.rate_points = points.number_input("points", min_value=2, max_value=MAX_POINTS, value=6, key="f_points",
                                           help="log-spaced, both ends included")


def group_fields(form: launch.LaunchForm, group: str) -> None:
    """The fields of one group of options that apply to what the form says so far (the rate range in
    place of the rate while sweeping it, seeds per point after the seed). Folded options wait for
    More options."""
    for opt in OPTIONS:
        if opt.group != group or opt.widget == "more" or not opt.applies(form.values):
            continue
        if opt.name == form.rate_key and form.sweep_rate:
            rate_range(form)
            continue
        option_field(form, opt)
        if opt.name == "mode":
            form.sweep_rate = st.toggle(f"Sweep the {form.rate_key.upper()} over a log range", key="f_sweep")
        if opt.name == "seed":
            form.seeds = st.number_input("Seeds per point", min_value=1, max_value=MAX_SEEDS, value=1, key="f_seeds",
                                         help="seed, seed+1, …: every point repeated")


def more_options(form: launch.LaunchForm) -> None:
    with st.expander("More options"):
        for opt in OPTIONS:
            if opt.widget == "more" and opt.applies(form.values):
                option_field(form, opt)


def custom_section(store: Store) -> None:
    form = launch.LaunchForm()
    left, middle, right = st.columns(3)
    with left:
        st.markdown("**Model and data**")
        group_fields(form, MODEL_DATA)
    with middle:
        st.markdown("**Optimisation**")
        group_fields(form, OPTIMISATION)
        st.markdown("**Checkpoints**")
        group_fields(form, CHECKPOINTS)
    with right:
        st.markdown("**Measurement (in optimizer steps)**")
        group_fields(form, MEASUREMENT)
        group_fields(form, WHERE)
        form.sweep_name = st.text_input("Sweep name (optional)", key="f_sweep_name", max_chars=200)
        more_options(form)
    try:
        configs, swept = launch.configs_of(form)
    except ConfigError as exc:
        st.error(md(exc))
        return
    st.caption(estimate.describe(configs))
    with st.expander(f"{len(configs)} run(s) will be queued", expanded=len(configs) > 1):
        st.dataframe({"name": [c.display_name() for c in configs]}, hide_index=True, width="stretch")
    if st.button(f"Queue {len(configs)} run(s)", type="primary", key="queue_custom", icon=":material/send:"):
        submit(store, lambda: (configs, swept, form.sweep_name.strip() or None))


def show_study(store: Store, study_id: int) -> None:
    info = store.get_study(study_id)
    st.success(f"Study #{info.id} created: {md(studies.pieces(info.spec))}. Its pre-training sweep is queued; the "
               "workers fine-tune, average and measure as each run ends.")
    st.page_link(ui.STUDY_PAGE, label="Follow it on the Study page", icon=":material/science:",
                 query_params={"study": str(info.id)})


def launch_study(store: Store, make) -> None:
    """Create a study; bad input is one line naming the form's field, nothing written."""
    try:
        with st.spinner("Checking and queueing…"):
            study_id = make()
    except ConfigError as exc:
        st.error(f"Not queued: {md(exc)}")
        return
    show_study(store, study_id)


def study_presets(store: Store) -> None:
    st.markdown("**Study presets** — one click each")
    for i, preset in enumerate(STUDY_PRESETS.values()):
        with st.container(border=True):
            st.markdown(f"**{md(preset.name)}**")
            st.write(preset.description)
            spec = {"pretrain_elrs": preset.pretrain_elrs, "seeds": preset.seeds, "data_seeds": preset.data_seeds,
                    "finetune_elrs": preset.finetune_elrs, "refine": preset.refine}
            st.caption(f"{studies.pieces(spec)}; PLRs {', '.join(f'{e:g}' for e in preset.pretrain_elrs)}")
            if st.button(f"Start “{preset.name}”", key=f"study_preset_{i}", icon=":material/science:"):
                launch_study(store, lambda preset=preset: studies.launch_preset(store, preset))


def study_form(store: Store) -> None:
    """The flags of `python -m engine study`, as fields."""
    st.markdown("**Custom study** — the fields of `python -m engine study`")
    form = studies.StudyForm()
    left, middle, right = st.columns(3)
    with left:
        st.markdown("*Pre-training*")
        form.pretrain_elrs = st.text_input("Pre-training ELRs (PLR)", value=form.pretrain_elrs, key="s_plr",
                                           help="values separated by spaces, or a log range START:STOP:N")
        form.pretrain_epochs = st.number_input("Pre-training epochs", min_value=1, max_value=MAX_EPOCHS,
                                               value=form.pretrain_epochs, key="s_pre_epochs")
        form.seeds = st.text_input("Seeds", value=form.seeds, key="s_seeds", help="e.g. 0 1 2: every PLR once per seed")
        form.data_seeds = st.text_input("Data seeds", value=form.data_seeds, key="s_data_seeds",
                                        help="e.g. 0 1: every PLR and seed once per data seed (ticks: the data; "
                                             "others: the validation split)")
        form.refine = st.checkbox("Refine around the convergence threshold", value=form.refine, key="s_refine",
                                  help="after the grid, PLRs at 1, 1.15, 1.33, 1.5 and 2x the estimated threshold")
    with middle:
        st.markdown("*Fine-tuning and averaging*")
        form.finetune_elrs = st.text_input("Fine-tuning ELRs (FLR)", value=form.finetune_elrs, key="s_flr",
                                           help="one or more small ELRs, each fine-tunes every pre-training end point")
        form.finetune_epochs = st.number_input("Fine-tuning epochs", min_value=1, max_value=MAX_EPOCHS,
                                               value=form.finetune_epochs, key="s_ft_epochs")
        form.average = st.number_input("Average the last K", min_value=1, max_value=MAX_EPOCHS, value=form.average,
                                       key="s_average", help="SWA of the last K per-epoch checkpoints of pre-training")
        form.points = st.number_input("Points on each path", min_value=2, max_value=201, value=form.points,
                                      key="s_points", help="geometry: α from 0 to 1 between two solutions")
    with right:
        st.markdown("*Model and data*")
        form.model = st.selectbox("Model", MODELS, key="s_model")
        form.dataset = st.selectbox("Dataset", DATASETS, key="s_dataset")
        if form.dataset in IMAGE_DATASETS:
            form.data_dir = st.text_input("Data folder", key="s_data_dir", placeholder="/data/cifar")
        form.norm = st.selectbox("Normalisation", NORMS, key="s_norm", help="mlp_si: batch or layer norm per layer")
        width, depth, batch = st.columns(3, vertical_alignment="bottom")
        form.width = width.number_input("Width (0 = default)", min_value=0, max_value=MAX_WIDTH, value=0, key="s_width")
        form.depth = depth.number_input("Depth", min_value=1, max_value=MAX_DEPTH, value=3, key="s_depth")
        form.batch_size = batch.number_input("Batch size (0 = default)", min_value=0, max_value=100_000, value=0,
                                             key="s_batch")
        form.log_every = st.number_input("Log every (steps)", min_value=1, value=10, key="s_log_every")
        form.name = st.text_input("Study name (optional)", key="s_name", max_chars=200)
    if st.button("Start the study", type="primary", key="start_study", icon=":material/science:"):
        launch_study(store, lambda: studies.launch(store, form))


def study_section(store: Store) -> None:
    st.write("A learning-rate study (the large-LR paper's protocol): pre-train over a grid of ELRs, fine-tune every "
             "end point at small ELRs, average its last checkpoints, and measure the geometry between the "
             "solutions. The workers do every step; the Study page follows it.")
    study_presets(store)
    study_form(store)


def main(store: Store) -> None:
    ui.worker_panel(store)
    presets, custom, study = st.tabs(["Presets", "Custom run or sweep", "Study"])
    with presets:
        preset_section(store)
    with custom:
        custom_section(store)
    with study:
        study_section(store)


ui.run_page("Launch", main, "Runs are queued in the database; a worker process trains them. "
            "The dashboard itself never trains.")
