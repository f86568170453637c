"""spherelab dashboard: `streamlit run streamlit_app.py`.

The store is $SPHERELAB_DB (a path or SQLAlchemy URL), else ~/.spherelab/spherelab.db. Pages live in
dashboard/pages/; they read the store through dashboard/data.py and draw with dashboard/charts.py.
"""
import streamlit as st

st.set_page_config(page_title="spherelab", page_icon=":material/public:", layout="wide")

LAUNCH = st.Page("dashboard/pages/launch.py", title="Launch", icon=":material/rocket_launch:")


def _home() -> None:
    # The root opens Launch. Launch itself is not the default page: Streamlit serves the default page at
    # "/" only, so a bookmarked /launch would answer "Page not found".
    st.switch_page(LAUNCH, query_params=st.query_params.to_dict())   # shared links (?preset=…) still work


PAGES = {
    "": [st.Page(_home, title="spherelab", url_path="home", default=True, visibility="hidden")],
    "Run": [
        LAUNCH,
        st.Page("dashboard/pages/live.py", title="Live", icon=":material/monitoring:"),
        st.Page("dashboard/pages/run.py", title="Run", icon=":material/insights:"),
    ],
    "Analyse": [
        st.Page("dashboard/pages/compare.py", title="Compare", icon=":material/stacked_line_chart:"),
        st.Page("dashboard/pages/regime_map.py", title="Regime map", icon=":material/scatter_plot:"),
        st.Page("dashboard/pages/periodic.py", title="Periodic behaviour", icon=":material/waves:"),
        st.Page("dashboard/pages/solutions.py", title="Solutions", icon=":material/straighten:"),
        st.Page("dashboard/pages/study.py", title="Study", icon=":material/science:"),
    ],
    "Learn": [
        st.Page("dashboard/pages/teach.py", title="Teach", icon=":material/school:"),
    ],
}

st.navigation(PAGES).run()
