"""``stablejax.debug.lint``: real NaN bugs flagged at their line, clean models left alone.

The suites are in ``tests/lint_zoo.py``; each program is linted once (module
fixtures) and the assertions read the results.
"""

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from rich.console import Console

import stablejax
from stablejax import nn as snn
from stablejax.debug import LintTraceError, Risk, Risks, lint

sys.path.insert(0, os.path.dirname(__file__))
import lint_zoo  # noqa: E402  (tests/lint_zoo.py: the user's code lint reads)


@pytest.fixture(scope="module")
def bug_results():
    out = {}
    for name, build in lint_zoo.BUGS.items():
        fn, args, marker = build()
        out[name] = (lint(fn)(*args), marker)
    return out


@pytest.fixture(scope="module")
def clean_results():
    out = {}
    for name, build in lint_zoo.CLEAN.items():
        fn, args = build()
        out[name] = lint(fn)(*args)
    return out


def _flags_line(risks, marker):
    return any(r.line.endswith(f"# {marker}") and r.source.startswith("tests") for r in risks)


def test_flags_the_faulty_line_of_at_least_80_percent_of_bugs(bug_results):
    hits = [n for n, (risks, marker) in bug_results.items() if _flags_line(risks, marker)]
    assert len(bug_results) >= 15
    missed = sorted(set(bug_results) - set(hits))
    assert len(hits) >= 0.8 * len(bug_results), f"missed: {missed}"


def test_tracker_bugs_flagged_and_misses_known(bug_results):
    """The bugs from the trackers (tests/nan_bugs.py): flagged exactly where expected."""
    import nan_bugs

    flagged = {b.name for b in nan_bugs.BUGS
               if _flags_line(*bug_results[f"tracker: {b.name}"])}
    assert len(nan_bugs.BUGS) >= 12
    assert flagged == {b.name for b in nan_bugs.BUGS if b.linted}
    assert len(flagged) >= 0.8 * len(nan_bugs.BUGS)


def test_high_alarms_on_at_most_20_percent_of_clean_models(clean_results):
    assert len(clean_results) >= 16
    alarmed = {n: [str(r) for r in risks.high] for n, risks in clean_results.items() if risks.high}
    assert len(alarmed) <= 0.2 * len(clean_results), alarmed


@pytest.mark.parametrize(
    "name, primitive, phase, category",
    [
        ("unit_norm", "div", "forward", "forward_singularity"),
        ("std_pool", "sqrt", "backward", "derivative_singularity"),
        ("where_log", "log", "backward", "derivative_singularity"),
        ("masked_mean", "div", "forward", "forward_singularity"),
        ("naive_softmax", "div", "forward", "loss_nan"),
        ("fp16_square", "mul", "forward", "overflow_low_precision"),
        ("scan_rnn_norm", "div", "forward", "forward_singularity"),
        ("while_power_iteration", "div", "forward", "forward_singularity"),
        ("vmap_std", "sqrt", "backward", "derivative_singularity"),
        ("remat_rms", "sqrt", "backward", "derivative_singularity"),
    ],
)
def test_risk_fields(bug_results, name, primitive, phase, category):
    risks, marker = bug_results[name]
    (risk,) = [r for r in risks if r.primitive == primitive and r.line.endswith(f"# {marker}")
               and r.phase == phase and r.category == category]
    assert risk.severity == "high"
    assert risk.suggestion and risk.why


def test_module_paths_linen_and_nnx(bug_results):
    (risk,) = [r for r in bug_results["unit_norm"][0] if r.primitive == "div"]
    assert risk.module == "_UnitNorm"
    (risk,) = [r for r in bug_results["std_pool"][0] if r.primitive == "sqrt"]
    assert risk.module == "_StdPool"
    (risk,) = [r for r in bug_results["nnx_norm"][0] if r.primitive == "div"]
    assert risk.module == "_NNXNorm"


def _f(x):
    return jax.ShapeDtypeStruct(x, jnp.float32)


SAFE = {
    "x / (norm + eps)": lambda x: x / (jnp.linalg.norm(x, axis=-1, keepdims=True) + 1e-6),
    "rsqrt(max(var, 0) + eps)": lambda x: jax.lax.rsqrt(
        jnp.maximum(jnp.mean(x**2, -1) - jnp.mean(x, -1) ** 2, 0.0) + 1e-6
    ),
    "log_softmax": jax.nn.log_softmax,
    "logsumexp": jax.nn.logsumexp,
    "softmax": jax.nn.softmax,
    "double where": lambda x: jnp.where(x > 0, jnp.sqrt(jnp.where(x > 0, x, 1.0)), 0.0),
    "optax.safe_norm": lambda x: x / optax.safe_norm(x, 1e-6, axis=-1, keepdims=True),
    "optax xent": lambda x: optax.softmax_cross_entropy(x, jax.nn.softmax(x)).mean(),
    "optax sigmoid bce": lambda x: optax.sigmoid_binary_cross_entropy(x, x > 0).mean(),
    "stablejax ops": lambda x: stablejax.safe_normalize(x) + stablejax.safe_std(x)
    + stablejax.safe_log(x) + stablejax.safe_sqrt(x) + stablejax.safe_div(x, x),
}


@pytest.mark.parametrize("name", sorted(SAFE))
def test_safe_by_construction_raises_nothing_high(name):
    fn = SAFE[name]
    risks = lint(jax.grad(lambda x: jnp.sum(fn(x))))(_f((4, 5)))
    assert risks.high == [], [str(r) for r in risks.high]


def test_safe_norm_plus_eps_keeps_only_a_low_risk_of_the_norm():
    risks = lint(jax.grad(lambda x: jnp.sum(SAFE["x / (norm + eps)"](x))))(_f((4, 5)))
    assert [(r.primitive, r.phase, r.severity) for r in risks] == [("sqrt", "backward", "low")]


def test_unsafe_counterparts_are_high():
    for fn in (
        lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True),
        lambda x: jax.lax.rsqrt(jnp.mean(x**2, -1) - jnp.mean(x, -1) ** 2),
        lambda x: jnp.where(x > 0, jnp.sqrt(x), 0.0),
        lambda x: jnp.log(x),
        lambda x: jnp.arccos(x),
    ):
        assert lint(jax.grad(lambda x, fn=fn: jnp.sum(fn(x))))(_f((4, 5))).high


def test_where_trap_only_for_the_value_jnp_where_masks():
    labels = jax.ShapeDtypeStruct((4,), jnp.int32)

    def loss(x, y):  # log_softmax inside holds a jnp.where, downstream of a reduction
        x = x / jnp.linalg.norm(x, axis=-1, keepdims=True)
        return optax.softmax_cross_entropy_with_integer_labels(x, y).mean()

    (div,) = [r for r in lint(jax.grad(loss))(_f((4, 5)), labels) if r.primitive == "div"]
    assert (div.phase, div.category) == ("forward", "forward_singularity")
    (trap,) = lint(lambda x: jnp.where(x > 0, jnp.log(x), 0.0))(_f((4,)))
    assert (trap.phase, trap.category) == ("backward", "derivative_singularity")
    assert "double-branch" in trap.why


def test_reads_shapes_only_arrays_and_specs_agree():
    def fn(x):
        return jnp.sum(jnp.sqrt(x))

    a = lint(fn)(jnp.full((3,), 4.0))  # positive values: lint does not look at them
    b = lint(fn)(_f((3,)))
    assert a == b and a[0].phase == "forward" and a[0].severity == "high"


def test_cond_and_custom_vjp():
    @jax.custom_vjp
    def clipped_sqrt(x):
        return jnp.sqrt(x)

    clipped_sqrt.defvjp(lambda x: (jnp.sqrt(x), x), lambda x, g: (g,))

    def fn(x, flag):
        return jax.lax.cond(flag, lambda x: jnp.log(x).sum(), lambda x: x.sum(), x)

    (risk,) = lint(fn)(_f((3,)), jax.ShapeDtypeStruct((), jnp.bool_))
    assert risk.primitive == "log"
    # The custom_vjp's derivative is its author's: the sqrt at 0 is not a backward risk,
    # the negative input is a forward one.
    risks = lint(lambda x: clipped_sqrt(x).sum())(_f((3,)))
    assert [(r.primitive, r.phase) for r in risks] == [("sqrt", "forward")]
    assert lint(lambda x: clipped_sqrt(x**2).sum())(_f((3,))) == []
    assert lint(lambda x: jnp.sqrt(x**2).sum())(_f((3,)))[0].phase == "backward"


def test_stablejax_layers_are_trusted():
    import flax.linen as nn

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            return snn.StdPool()(snn.L2Normalize()(nn.Dense(4)(x)))

    x = _f((2, 3, 5))
    params = jax.eval_shape(lambda x: Net().init(jax.random.key(0), x), x)
    assert lint(jax.grad(lambda p, x: Net().apply(p, x).sum()))(params, x) == []


def test_printing_and_json(bug_results):
    risks, _ = bug_results["unit_norm"]
    assert isinstance(risks, Risks) and isinstance(risks, list)
    assert all(isinstance(r, Risk) for r in risks)
    data = json.loads(risks.to_json())
    assert data[0]["severity"] == "high" and set(data[0]) >= {
        "primitive", "source", "module", "phase", "category", "severity", "suggestion"}
    assert json.loads(risks[0].to_json()) == data[0]
    console = Console(width=200, record=True)
    console.print(risks)
    text = console.export_text()
    assert "lint_zoo.py:" in text and "high" in text
    assert "lint_zoo.py:" in str(risks)
    assert str(Risks()) == "lint: no risk found"


def test_bad_input():
    with pytest.raises(TypeError, match="must be callable"):
        lint(3)
    with pytest.raises(LintTraceError, match="could not trace"):
        lint(lambda x: x @ x)(_f((2, 3)))


def test_float16_exp_is_high_float32_low():
    for dtype, sev in ((jnp.float16, "high"), (jnp.float32, "low")):
        (risk,) = lint(jnp.exp)(jax.ShapeDtypeStruct((3,), dtype))
        assert risk.severity == sev
    assert lint(lambda x: jnp.exp(x - jnp.max(x)))(jax.ShapeDtypeStruct((3,), jnp.float16)) == []


def test_concrete_results_match_the_static_claims():
    # The flagged programs do go non-finite on the values lint says can reach them.
    x = np.zeros((4, 3), np.float32)
    assert not np.isfinite(jax.grad(lambda x: jnp.std(x, axis=1).sum())(x)).all()
    assert not np.isfinite(jax.grad(lambda x: jnp.where(x > 0, jnp.log(x), 0.0).sum())(x)).all()


def _cli(*argv):
    import contextlib
    import io

    from stablejax.__main__ import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


ZOO = os.path.join(os.path.dirname(__file__), "lint_zoo.py")


def test_cli_lint_exit_status_and_output():
    code, out, err = _cli("lint", f"{ZOO}:cli_std_pool")
    assert code == 4 and err == ""
    assert "lint_zoo.py" in out
    assert "sqrt" in out and "high" in out
    code, out, _ = _cli("lint", "--json", f"{ZOO}:clean_mlp")
    assert code == 0 and not [r for r in json.loads(out) if r["severity"] == "high"]


@pytest.mark.parametrize(
    "target, message",
    [
        ("no_colon", "expected MODULE:FUNCTION"),
        ("nonexistent_module_xyz:f", "cannot import"),
        (f"{ZOO}:missing", "has no function"),
        (f"{ZOO}:bug_std_pool", "must return args as a tuple and kwargs as a dict"),
        (f"{ZOO}:_spec", "must return (fn, args) or (fn, args, kwargs)"),
    ],
)
def test_cli_lint_bad_target_one_line_on_stderr(target, message):
    code, out, err = _cli("lint", target)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and message in err and err.startswith("stablejax: error:")
