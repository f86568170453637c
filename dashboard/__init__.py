"""The Streamlit dashboard: pages (pages/), store reads (data.py), figures (charts.py), computations
on metric frames (series.py), queueing runs (launch.py), shared widgets (ui.py), downloads (export.py)."""
