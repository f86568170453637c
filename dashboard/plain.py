"""User text (run and sweep names, tags, notes, error messages, config values) shown as plain text.

Streamlit renders markdown in most strings it is given (titles, captions, alerts, labels, toasts):
a run named `[x](http://evil)` would become a live link, `![](http://evil/i.png)` an image the
viewer's browser fetches. Plotly renders a subset of HTML in trace names, hover labels and titles
(`<a href>`, `<b>`, `<br>`). So every user-controlled string goes through one of these two on its
way to the screen; widgets that take plain text (selectbox and multiselect options, dataframe
cells, st.text, st.code) need neither.
"""
from __future__ import annotations

import html as _html
import re
import string

# CommonMark lets any ASCII punctuation be backslash-escaped: escaping all of it leaves no link,
# image, emphasis, directive (:red[...]), math ($) or HTML to form.
_MARKDOWN = str.maketrans({c: "\\" + c for c in string.punctuation})
# GitHub's bare-URL autolinks (http://…, www.…, name@host) are found in the text after escapes are
# resolved, so escaping cannot stop them (Chromium showed `http\://evil.example` as a live link).
# An invisible WORD JOINER (U+2060) inside "://", after "www" and before "@" breaks the pattern
# without changing what the reader sees.
JOINER = "\u2060"
_AUTOLINK = re.compile(r"(?i)(?<=:)(?=//)|(?<=www)(?=\.)|(?=@)")


def md(text) -> str:
    """`text` for a Streamlit markdown context, shown literally."""
    return _AUTOLINK.sub(JOINER, str(text)).translate(_MARKDOWN).replace("\n", " ")


def html(text) -> str:
    """`text` for a Plotly label (trace name, hover text, title, annotation), shown literally."""
    return _html.escape(str(text), quote=False)
