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
