"""Every URL parameter of every page is clamped or refused with a note (issue 17 item 8): the one reader
(ui.read_param) exactly, then each page opened with bad values for each of its parameters through
Streamlit's AppTest — no exception, a note naming the parameter, and the widget on a sane value."""
import math
import re

import pytest

from dashboard import ui
from storage import Store
from tests.test_dashboard import open_app
from tests.test_dashboard_solutions import every_end, family  # noqa: F401  (fixtures)


# ---- the reader --------------------------------------------------------------------------------------
def test_numbers_are_clamped_to_their_range_and_non_numbers_refused():
    assert ui.read_param("smooth", "-5", ui.finite, lo=0.0, hi=0.99) == (0.0, "The link's “smooth=-5” is outside "
                                                                                "0–0.99: using 0.")
    assert ui.read_param("smooth", "1e308", ui.finite, lo=0.0, hi=0.99)[0] == 0.99
    assert ui.read_param("smooth", "inf", ui.finite, lo=0.0, hi=0.99)[0] == 0.99
    assert ui.read_param("smooth", "0.5", ui.finite, lo=0.0, hi=0.99) == (0.5, None)
    assert ui.read_param("smooth", "nan", ui.finite, lo=0.0, hi=0.99) == (None, "Ignored the link's “smooth=nan”: "
                                                                                "not a number.")
    assert ui.read_param("points", "2.5", int, lo=2, hi=201) == (None, "Ignored the link's “points=2.5”: not a "
                                                                         "whole number.")
    assert ui.read_param("points", "9" * 40, int, lo=2, hi=201)[0] == 201
    assert ui.read_param("at", "-1", int, lo=0) == (0, "The link's “at=-1” is below 0: using 0.")
    assert ui.read_param("at", "12", int, hi=10) == (10, "The link's “at=12” is above 10: using 10.")


def test_ids_and_choices_that_are_not_here_are_left_out_with_a_note():
    assert ui.read_param("runs", "3,99999,abc", ui.int_list, allowed=[1, 2, 3], noun="run") == \
        ([3], "Left out of the link's “runs”: 99999, abc (not in this database).")
    value, note = ui.read_param("runs", "99999,abc", ui.int_list, allowed=[1, 2, 3], noun="run")
    assert value is None and note.startswith("The link's “runs” names no run here (99999, abc")
    assert ui.read_param("runs", "2,1", ui.int_list, allowed=[1, 2, 3], noun="run") == ([2, 1], None)
    assert ui.read_param("run", "7", int, allowed=[1, 2], noun="run")[1].startswith("Run 7 is not in this database")
    assert ui.read_param("x", "bogus", allowed=["step", "epoch"]) == (None, "Ignored the link's “x=bogus”: not one of "
                                                                            "step, epoch.")
    assert ui.read_param("seeds", "1", ui.flag) == (True, None) and ui.read_param("seeds", "0", ui.flag) == (False, None)
    assert ui.read_param("seeds", "maybe", ui.flag) == (None, "Ignored the link's “seeds=maybe”: not 1 or 0.")


# ---- every page --------------------------------------------------------------------------------------
def notes(at) -> str:
    return re.sub(r"\\(.)", r"\1", "\n".join(w.value for w in at.warning))


@pytest.fixture
def store_ids(every_end):
    """The every-end store (runs with kept checkpoints, branches, a study, geometries) plus a sweep."""
    db, parent, forks, pre, study_id = every_end
    store = Store(db)
    sweep_id, [swept] = store.create_sweep_runs("sweep", {}, [{"config": {"elr": 0.01, "sharpness_every": 10},
                                                                "name": "in a sweep"}])
    store.log_metrics(swept, [(s, s / 10, s / 10, {"train_loss": 1 / (s + 1), "sharpness": 50.0 + s,
                                                   "sharpness_threshold": 200.0}) for s in range(0, 100, 10)])
    geometry = store.list_jobs(kind="geometry")[0].id
    return db, {"parent": parent, "fork": forks[0], "pre": pre, "study": study_id, "sweep": sweep_id, "job": geometry}


# (page, query, widget kind and key, the value it must show ({…} from store_ids), a piece of the note)
CASES = [
    ("run", {"run": "99999"}, ("selectbox", "run"), None, "Run 99999 is not in this database"),
    ("run", {"run": "abc"}, ("selectbox", "run"), None, "“run=abc”: not a whole number"),
    ("run", {"run": "{parent}", "metric": "bogus,train_loss"}, ("multiselect", "metric"), ["train_loss"],
     "Left out of the link's “metric”: bogus"),
    ("compare", {"runs": "99999,abc"}, ("multiselect", "runs"), None, "names no run here (99999, abc"),
    ("compare", {"runs": "{parent},99999"}, ("multiselect", "runs"), ["{parent}"], "Left out of the link's “runs”: 99999"),
    ("compare", {"runs": "{parent},{fork}", "smooth": "-5"}, ("slider", "smooth"), 0.0, "“smooth=-5” is outside 0–0.99"),
    ("compare", {"runs": "{parent}", "smooth": "1e308"}, ("slider", "smooth"), 0.99, "using 0.99"),
    ("compare", {"runs": "{parent}", "smooth": "nan"}, ("slider", "smooth"), 0.0, "“smooth=nan”: not a number"),
    ("compare", {"runs": "{parent}", "seeds": "maybe"}, ("toggle", "seeds"), False, "“seeds=maybe”: not 1 or 0"),
    ("compare", {"runs": "{fork}", "ancestors": "2"}, ("toggle", "ancestors"), False, "“ancestors=2”: not 1 or 0"),
    ("compare", {"runs": "{parent}", "x": "bogus"}, ("selectbox", "x"), "step", "“x=bogus”: not one of step"),
    ("compare", {"runs": "{parent}", "metric": "nope"}, ("multiselect", "metric"), ["train_loss"],
     "names no value here (nope"),
    ("live", {"metric": "nope,train_loss"}, ("multiselect", "metric"), None, "Left out of the link's “metric”: nope"),
    ("launch", {"preset": "nope"}, ("selectbox", "preset"), "Three regimes on digits", "“preset=nope”: not one of"),
    ("regime_map", {"sweep": "99999"}, ("selectbox", "sweep"), "{sweep}", "Sweep 99999 is not in this database"),
    ("periodic", {"run": "x1"}, ("selectbox", "run"), None, "“run=x1”: not a whole number"),
    ("periodic", {"run": "{parent}", "sharp": "99999"}, None, None, "“sharp” names no value here (99999"),
    ("solutions", {"job": "99999"}, ("selectbox", "job"), None, "Measurement 99999 is not in this database"),
    ("solutions", {"a": "abc"}, ("selectbox", "a"), None, "“a=abc”: not a whole number"),
    ("solutions", {"a": "{parent}", "ae": "7"}, ("selectbox", "ae"), "last", "“ae=7”: not one of last, 2, 4"),
    ("solutions", {"points": "100000"}, ("number_input", "points"), 201, "“points=100000” is outside 2–201"),
    ("solutions", {"points": "-3"}, ("number_input", "points"), 2, "using 2"),
    ("solutions", {"points": "1e3"}, ("number_input", "points"), 21, "“points=1e3”: not a whole number"),
    ("study", {"study": "99999"}, ("selectbox", "study"), "{study}", "Study 99999 is not in this database"),
    ("teach", {"topic": "nope"}, ("segmented_control", "topic"), "invariance", "“topic=nope”: not one of"),
    ("teach", {"topic": "periodic", "runs_periodic": "99999,abc"}, None, None, "“runs_periodic” names no run here"),
    ("teach", {"topic": "solutions", "runs_solutions": "abc"}, None, None, "“runs_solutions” names no run here"),
    ("teach", {"topic": "study", "study_demo": "99999"}, None, None, "Study 99999 is not in this database"),
]


@pytest.mark.parametrize("page, query, widget, expected, note", CASES,
                         ids=[f"{c[0]}-{'&'.join(f'{k}={v}' for k, v in c[1].items())}" for c in CASES])
def test_a_bad_url_parameter_is_clamped_or_refused_with_a_note(store_ids, monkeypatch, page, query, widget, expected,
                                                               note):
    db, ids = store_ids
    at = open_app(db, monkeypatch, page, **{k: v.format(**ids) for k, v in query.items()})
    assert note in notes(at), notes(at)
    assert len(at.warning) <= 2                      # one note per bad parameter, no cascade
    if widget is not None:
        kind, key = widget
        value = getattr(at, kind)(key=key).value
        if expected is None:                         # the page's default: the newest, whatever it is
            assert value not in (None, []) and "99999" not in str(value)
        else:
            want = ([int(v.format(**ids)) if "{" in v else v for v in expected] if isinstance(expected, list)
                    else int(expected.format(**ids)) if isinstance(expected, str) and "{" in expected else expected)
            assert value == want or (isinstance(want, float) and math.isclose(value, want)), (value, want)


def test_a_good_link_shows_no_note(store_ids, monkeypatch):
    db, ids = store_ids
    at = open_app(db, monkeypatch, "compare", runs=f"{ids['parent']},{ids['fork']}", smooth="0.5", seeds="1")
    assert not at.warning and at.slider(key="smooth").value == 0.5 and at.toggle(key="seeds").value
