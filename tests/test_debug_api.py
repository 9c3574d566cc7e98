"""The debug pillar's surface: errors, no side effects, Report, nan_trap, watch, watch_loop."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import stablejax.debug as debug
from stablejax.debug import (
    LocateTraceError,
    NonFiniteError,
    Report,
    locate,
    nan_trap,
    watch,
    watch_loop,
)


def test_public_surface():
    exported = {n for n in dir(debug) if not n.startswith("_")}
    assert set(debug.__all__) == exported
    for name in debug.__all__:
        assert getattr(debug, name) is not None


def test_not_callable_names_the_value():
    with pytest.raises(TypeError, match="callable.*int: 3"):
        locate(3)
    with pytest.raises(TypeError, match="callable"):
        watch("loss")


def test_untraceable_args_name_the_arguments():
    def branchy(x):
        return x if x > 0 else -x  # Python control flow on a traced value

    with pytest.raises(LocateTraceError, match=r"branchy.*x: float32\[3\]"):
        locate(branchy)(jnp.ones(3))
    with pytest.raises(TypeError, match="history"):
        locate(jnp.sin, history="loss")
    with pytest.raises(TypeError, match=r"history\[1\]"):
        locate(jnp.sin, history=[1.0, object()])


def _config_snapshot():
    names = ("jax_debug_nans", "jax_debug_infs", "jax_disable_jit", "jax_enable_x64")
    return {n: getattr(jax.config, n) for n in names}


def test_never_mutates_arrays_or_config():
    x = np.array([[1.0, np.nan], [0.0, 2.0]], np.float32)
    before = x.copy()
    params = {"w": jnp.array([0.0, 1.0])}
    config = _config_snapshot()
    r = locate(lambda p, x: jnp.sum(jnp.sqrt(p["w"])[None, :] * x))(params, x)
    assert r.category == "bad_input" and r.input_path == "x" and r.rows == [0]
    np.testing.assert_array_equal(x, before)
    np.testing.assert_array_equal(params["w"], [0.0, 1.0])
    assert _config_snapshot() == config
    with pytest.raises(LocateTraceError):
        locate(lambda x: x.undefined)(x)
    assert _config_snapshot() == config


def test_finite_returns_none_and_masked_nan_is_reported():
    assert locate(jax.grad(lambda x: jnp.sum(x**2)))(jnp.ones(3)) is None
    masked = lambda x: jnp.where(x > 0, jnp.log(x), 0.0)  # jit output stays finite
    r = locate(jax.jit(masked))(jnp.array([1.0, -1.0]))
    assert (r.primitive, r.kind, r.reaches_output) == ("log", "nan", False)


def test_inf_origin_before_nan():
    # checkify reports the later inf - inf; the origin is the exp overflow.
    r = locate(jax.jit(lambda x: jnp.exp(x) - jnp.exp(x)))(jnp.array([1000.0]))
    assert (r.primitive, r.kind) == ("exp", "inf")


def test_report_dict_and_str():
    r = locate(jax.grad(lambda x: jnp.sum(jnp.sqrt(x))))(jnp.zeros(2))
    d = json.loads(json.dumps(r.to_dict()))
    assert d["primitive"] == "div" and d["phase"] == "backward"
    assert d["inputs"][1]["zeros"] == 2 and d["inputs"][1]["shape"] == [2]
    first = str(r).splitlines()[0]
    for part in ("div", "derivative of sqrt", "backward pass", "test_debug_api.py", "Fix:"):
        assert part in first
    assert isinstance(r, Report) and r.headline == first


def scan_step(x):
    def body(c, xi):
        return c, jnp.log(xi)

    return jax.lax.scan(body, 0.0, x)[1].sum()


def test_nan_trap_reports_inside_scan_and_restores_flags():
    config = _config_snapshot()
    with pytest.raises(NonFiniteError) as info:
        with nan_trap():
            assert jax.config.jax_debug_nans and jax.config.jax_debug_infs
            jax.jit(scan_step)(jnp.array([1.0, 2.0, -1.0]))
    r = info.value.report
    assert (r.primitive, r.iteration, r.phase) == ("log", 2, "forward")  # jax says "scan"
    assert isinstance(info.value, FloatingPointError)
    assert _config_snapshot() == config
    with pytest.raises(ZeroDivisionError):
        with nan_trap():
            raise ZeroDivisionError
    assert _config_snapshot() == config


def test_watch_flags_under_jit():
    def step(params, x):
        grads = jax.grad(lambda p: jnp.sum(jnp.sqrt(p["a"] * x)) + jnp.sum(p["b"]))(params)
        new = jax.tree.map(lambda p, g: p - 0.1 * g, params, grads)
        return new, grads, jnp.sum(x)

    params = {"a": jnp.ones(2), "b": jnp.ones(2)}
    out, flags = jax.jit(watch(step))(params, jnp.array([1.0, 0.0]))
    flags = {k: bool(v) for k, v in flags.items()}
    assert flags == {"[0]['a']": False, "[0]['b']": True, "[1]['a']": False,
                     "[1]['b']": True, "[2]": True}
    jaxpr = jax.make_jaxpr(watch(step))(params, jnp.ones(2))
    assert "callback" not in str(jaxpr)


def test_watch_loop_locates_once_and_saves_json(tmp_path):
    path = tmp_path / "report.json"
    printed = []

    def step(w, x):
        loss, g = jax.value_and_grad(lambda w: jnp.sum(jnp.sqrt(w * x)))(w)
        return w - 0.1 * g, loss

    run = watch_loop(step, report_path=path, printer=printed.append,
                     metrics=lambda out: {"loss": out[1]})
    w = jnp.ones(2)
    for x in ([1.0, 2.0], [1.0, 0.0], [0.0, 0.0]):
        w2, _ = run(w, jnp.array(x))
    assert run.bad_steps == [1, 2] and len(printed) == 1
    saved = json.loads(path.read_text())
    assert (saved["step"], saved["primitive"], saved["phase"]) == (1, "div", "backward")
    assert run.report.category == "derivative_singularity"
    del w2


def test_watch_loop_notices_guard_skip():
    optim = pytest.importorskip("stablejax.optim")
    tx = optim.guard(optax.sgd(0.1))

    def step(w, s, x):
        g = jax.grad(lambda w: jnp.sum(jnp.sqrt(w * x)))(w)
        u, s = tx.update(g, s, w)
        return optax.apply_updates(w, u), s

    run = watch_loop(step, report_path=None, printer=lambda s: None, opt_state=lambda o: o[1])
    w = jnp.ones(2)
    s = tx.init(w)
    w, s = run(w, s, jnp.array([1.0, 2.0]))
    w, s = run(w, s, jnp.array([1.0, 0.0]))  # guard skips: outputs stay finite
    assert run.bad_steps == [1]
    assert run.report is not None and run.report.primitive == "div"
    assert run.report.phase == "backward"


def test_nan_trap_eager_op_keeps_the_user_line():
    with pytest.raises(NonFiniteError) as info:
        with nan_trap():
            jnp.log(jnp.array([-1.0]))  # L:eager
    r = info.value.report
    lineno = next(i + 1 for i, t in enumerate(open(__file__).read().splitlines())
                  if t.rstrip().endswith("# L:eager"))
    assert r.primitive == "log" and r.source.endswith(f"test_debug_api.py:{lineno}"), str(r)
