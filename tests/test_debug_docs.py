"""The first snippet of docs/debug.md runs and says what the doc says it prints."""

import contextlib
import io
import os

from stablejax.debug import locate

DOC = os.path.join(os.path.dirname(__file__), "..", "docs", "debug.md")


def test_docs_snippet_runs():
    text = open(DOC).read()
    code = text.split("```python\n", 1)[1].split("```", 1)[0]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "snippet.py", "exec"), {"__name__": "snippet"})
    printed = out.getvalue()
    assert "SpeakerNet/StatsPooling_0 backward derivative_singularity" in printed
    assert "Inf born in div (derivative of sqrt)" in printed.splitlines()[0]


def test_nonfinite_python_float_argument():
    r = locate(lambda x, lr: x * lr)(1.0, float("nan"))
    assert (r.category, r.input_path, r.primitive) == ("bad_input", "lr", None)
