"""watch / watch_loop / nan_trap: arguments checked at the call; first bad module in the flags."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from stablejax.debug import nan_trap, watch_loop


def _step(w, x):
    return w * x, jnp.log(x).sum()


@pytest.mark.parametrize("bad", ["missing_dir/r.json", "."])
def test_watch_loop_unwritable_report_path_fails_at_the_call(tmp_path, bad):
    path = os.path.join(tmp_path, bad)
    with pytest.raises(ValueError, match="report_path"):
        watch_loop(_step, report_path=path)
    with pytest.raises(TypeError, match="report_path"):
        watch_loop(_step, report_path=3)
    fine = watch_loop(_step, report_path=os.path.join(tmp_path, "r.json"))  # the fix is accepted
    assert fine.report_path.endswith("r.json")


def test_watch_loop_history_size_checked():
    with pytest.raises(ValueError, match="history_size"):
        watch_loop(_step, report_path=None, history_size=-1)
    for bad in ("10", 2.5, True):
        with pytest.raises(TypeError, match="history_size"):
            watch_loop(_step, report_path=None, history_size=bad)
    with pytest.raises(TypeError, match="metrics"):
        watch_loop(_step, report_path=None, metrics="loss")
    run = watch_loop(
        _step, report_path=None, history_size=np.int64(2), metrics=lambda o: {"loss": o[1]}
    )
    for v in (1.0, 2.0, 3.0):
        run(jnp.ones(2), jnp.full(2, v))
    assert [round(h["loss"], 3) for h in run.history] == [1.386, 2.197]
    none = watch_loop(_step, report_path=None, history_size=0, metrics=lambda o: {"loss": o[1]})
    none(jnp.ones(2), jnp.ones(2))
    assert none.history == []


def test_nan_trap_bad_history_fails_at_the_call():
    flags = (jax.config.jax_debug_nans, jax.config.jax_debug_infs)
    with pytest.raises(TypeError, match="history"):
        nan_trap(history="abc")
    with pytest.raises(TypeError, match="history"):
        nan_trap(history=[1.0, object()])
    assert (jax.config.jax_debug_nans, jax.config.jax_debug_infs) == flags
    with nan_trap(history=[1.0, {"loss": 2.0, "grad_norm": 0.5}]):
        pass


# ---------------------------------------------------------------- first bad module

import flax.linen as nn  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from stablejax.debug import watch  # noqa: E402


class Pool(nn.Module):
    @nn.compact
    def __call__(self, h):
        return jnp.std(h, axis=1)


class Normalize(nn.Module):
    @nn.compact
    def __call__(self, h):
        return h / jnp.linalg.norm(h, axis=-1, keepdims=True)


class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        pooled = nn.Dense(2)(Pool()(nn.Dense(3)(x)))
        return pooled.sum() + Normalize()(nn.Dense(3)(x.mean(axis=1))).sum()


_NET, _TX = Net(), optax.adam(1e-2)
_X_SILENT = jnp.ones((2, 5, 4))  # identical frames: std 0, backward NaN in Pool_0
_X_OK = jax.random.normal(jax.random.key(1), (2, 5, 4))
_P = _NET.init(jax.random.key(0), _X_OK)


def linen_step(p, s, x):
    loss, g = jax.value_and_grad(lambda p: _NET.apply(p, x))(p)
    u, s = _TX.update(g, s, p)
    return optax.apply_updates(p, u), s, loss


@pytest.fixture(scope="module")
def watched_linen():
    return jax.jit(watch(jax.jit(linen_step)))


def test_watch_names_the_first_bad_module_linen(watched_linen):
    s = _TX.init(_P)
    out, flags = watched_linen(_P, s, _X_OK)
    assert flags.first_bad_module is None and all(bool(v) for v in flags.modules.values())
    ref = jax.jit(linen_step)(_P, s, _X_OK)
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), out, ref))
    out, flags = watched_linen(_P, s, _X_SILENT)
    assert flags.first_bad_module == "Net/Pool_0 (backward)"
    assert not bool(flags.modules["Net/Pool_0 (backward)"])
    # Dense_0 is the head (constructed first), Dense_1 the projection before the pool.
    assert bool(flags.modules["Net/Pool_0 (forward)"])
    assert bool(flags.modules["Net/Dense_0 (backward)"])
    assert not bool(flags.modules["Net/Dense_1 (backward)"])  # downstream of the birth
    assert not bool(flags["[0]['params']['Dense_1']"])  # the output groups are still there
    assert bool(flags["[0]['params']['Dense_0']"])
    zero = jax.tree.map(jnp.zeros_like, _P)  # Dense_0 gives 0: std 0, norm 0 -> 0/0 forward
    _, flags = watched_linen(zero, s, _X_OK)
    assert flags.first_bad_module == "Net/Normalize_0 (forward)"
    assert "callback" not in watched_linen.lower(_P, s, _X_OK).as_text()  # no host round trip


def test_watch_loop_reports_the_first_bad_module(tmp_path):
    path = os.path.join(tmp_path, "r.json")
    printed = []
    run = watch_loop(linen_step, report_path=path, printer=printed.append)
    s = _TX.init(_P)
    run(_P, s, _X_OK)
    run(_P, s, _X_SILENT)
    assert run.first_bad_module == "Net/Pool_0 (backward)" and run.bad_steps == [1]
    assert "first bad module Net/Pool_0 (backward)" in printed[0]
    import json

    with open(path) as f:
        saved = json.load(f)
    assert saved["first_bad_module"] == "Net/Pool_0 (backward)"
    assert saved["module"] == "Net/Pool_0"  # locate says the same module


class NnxPool(nnx.Module):
    def __call__(self, h):
        return jnp.std(h, axis=1)


class NnxNet(nnx.Module):
    def __init__(self, rngs):
        self.proj = nnx.Linear(4, 3, rngs=rngs)
        self.pool = NnxPool()
        self.head = nnx.Linear(3, 2, rngs=rngs)

    def __call__(self, x):
        return self.head(self.pool(self.proj(x))).sum()


@nnx.jit
def nnx_step(model, optimizer, x):
    loss, grads = nnx.value_and_grad(lambda m: m(x))(model)
    optimizer.update(model, grads)
    return loss


def test_watch_and_watch_loop_on_the_nnx_step():
    def fresh():
        model = NnxNet(nnx.Rngs(0))
        return model, nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)

    model, opt = fresh()
    ref_model, ref_opt = fresh()
    step = watch(nnx_step)
    loss, flags = step(model, opt, _X_OK)
    ref_loss = nnx_step(ref_model, ref_opt, _X_OK)
    assert flags.first_bad_module is None
    assert float(loss) == float(ref_loss)
    assert jnp.array_equal(model.proj.kernel[...], ref_model.proj.kernel[...])
    assert not jnp.array_equal(model.proj.kernel[...], fresh()[0].proj.kernel[...])
    _, flags = step(model, opt, _X_SILENT)
    assert flags.first_bad_module == "pool (backward)"
    assert not bool(flags["updated [0][0]['proj']"])  # the in-place update is flagged

    # watch_loop on the same step: updates in place, reports the module.
    model, opt = fresh()
    before = jnp.array(model.proj.kernel[...])
    printed = []
    run = watch_loop(nnx_step, report_path=None, printer=printed.append)
    run(model, opt, _X_OK)
    assert not jnp.array_equal(model.proj.kernel[...], before) and run.bad_steps == []
    run(model, opt, _X_SILENT)
    assert run.bad_steps == [1] and run.first_bad_module == "pool (backward)"
    assert run.report is not None and "pool (backward)" in printed[0]
