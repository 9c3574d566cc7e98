"""A zoo of NaN/Inf bugs: locate must name the exact primitive, phase, module and line.

Expected lines are found from ``# L:<tag>`` marker comments in this file, so the
tests keep passing when lines move.
"""

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from stablejax.debug import locate

_SRC = open(__file__).read().splitlines()
_FILE = os.path.relpath(__file__)


def line(tag: str) -> str:
    """``'file:line'`` of the line holding the marker ``# L:<tag>``."""
    hits = [i + 1 for i, text in enumerate(_SRC) if text.rstrip().endswith(f"# L:{tag}")]
    assert len(hits) == 1, tag
    return f"{_FILE}:{hits[0]}"


def maybe_jit(fn, jit):
    return jax.jit(fn) if jit else fn


def check(report, *, primitive, phase, module, tag, category, kind=None):
    assert report is not None
    got = (report.primitive, report.phase, report.module, report.source, report.category)
    want = (primitive, phase, module, line(tag), category)
    assert got == want, str(report)
    if kind is not None:
        assert report.kind == kind


# ---------------------------------------------------------------- linen models


class Normalize(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Dense(4)(x)
        return x / jnp.linalg.norm(x, axis=-1, keepdims=True)  # L:l2norm


class NormNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        return Normalize()(x).sum()


class StatsPooling(nn.Module):
    @nn.compact
    def __call__(self, h):
        return jnp.concatenate([h.mean(axis=1), jnp.std(h, axis=1)], -1)  # L:std


class SpeakerNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.Dense(3)(x)
        return nn.Dense(2)(StatsPooling()(h))


def _zero_dense(params):
    return jax.tree.map(jnp.zeros_like, params)


@pytest.mark.parametrize("jit", [False, True])
def test_forward_div_by_zero_norm_linen(jit):
    m = NormNet()
    x = jnp.ones((2, 3))
    p = _zero_dense(m.init(jax.random.key(0), x))
    r = locate(maybe_jit(m.apply, jit))(p, x)
    check(r, primitive="div", phase="forward", module="NormNet/Normalize_0", tag="l2norm",
          category="forward_singularity", kind="nan")
    assert "safe_normalize" in r.suggestion
    assert r.inputs[1].zeros == 2


@pytest.mark.parametrize("jit", [False, True])
def test_backward_std_pooling_linen(jit):
    m = SpeakerNet()
    x = jnp.ones((2, 5, 4))
    p = m.init(jax.random.key(0), x)
    p = jax.tree.map(lambda a: a, p)
    p["params"]["Dense_0"]["kernel"] = jnp.zeros_like(p["params"]["Dense_0"]["kernel"])

    def step(p, x):
        return jax.grad(lambda p: jnp.sum(m.apply(p, x) ** 2))(p)

    r = locate(maybe_jit(step, jit))(p, x)
    check(r, primitive="div", phase="backward", module="SpeakerNet/StatsPooling_0", tag="std",
          category="derivative_singularity")
    assert r.op == "sqrt"
    assert "stablejax.safe_std" in r.suggestion and "StdPool" in r.suggestion
    # Same model, no gradient: nothing breaks in the forward pass.
    assert locate(m.apply)(p, x) is None


# ---------------------------------------------------------------- plain functions


def log_features(x):
    return jnp.log(x) * 2.0  # L:log


def sqrt_features(x):
    return jnp.sqrt(x - 1.0)  # L:sqrtneg


def angle(u, v):
    return jnp.arccos(jnp.sum(u * v) * 1.0001)  # L:acos


@pytest.mark.parametrize("jit", [False, True])
def test_forward_singularities_plain(jit):
    r = locate(maybe_jit(log_features, jit))(jnp.array([1.0, 0.0]))
    check(r, primitive="log", phase="forward", module=None, tag="log",
          category="forward_singularity", kind="inf")
    assert "safe_log" in r.suggestion
    r = locate(maybe_jit(sqrt_features, jit))(jnp.array([2.0, 0.5]))
    check(r, primitive="sqrt", phase="forward", module=None, tag="sqrtneg",
          category="forward_singularity", kind="nan")
    u = jnp.array([1.0, 0.0])
    r = locate(maybe_jit(angle, jit))(u, u)
    check(r, primitive="acos", phase="forward", module=None, tag="acos",
          category="forward_singularity", kind="nan")


def norm_feature(x):
    return jnp.sum(jnp.linalg.norm(x, axis=-1))  # L:norm


def where_sqrt(x):
    return jnp.sum(jnp.where(x > 0, jnp.sqrt(x), 0.0))  # L:where


@pytest.mark.parametrize("jit", [False, True])
def test_derivative_singularities_plain(jit):
    r = locate(maybe_jit(jax.grad(norm_feature), jit))(jnp.zeros((2, 3)))
    check(r, primitive="div", phase="backward", module=None, tag="norm",
          category="derivative_singularity")
    assert "stablejax.safe_norm" in r.suggestion
    r = locate(maybe_jit(jax.grad(where_sqrt), jit))(jnp.array([0.0, 4.0]))
    check(r, primitive="div", phase="backward", module=None, tag="where",
          category="derivative_singularity", kind="inf")
    assert "double-branch" in r.suggestion


# ---------------------------------------------------------------- the loss


class Regressor(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(1)(x)[:, 0]


def mae_loss(params, model, x, y):
    pred = model.apply(params, x)
    return jnp.mean(jnp.sqrt((pred - y) ** 2))  # L:mae


def xent_loss(logits, labels):
    probs = jax.nn.softmax(logits)
    return -jnp.mean(jnp.log(probs[jnp.arange(2), labels]))  # L:xent


@pytest.mark.parametrize("jit", [False, True])
def test_loss_nan(jit):
    m = Regressor()
    x = jnp.ones((2, 3))
    p = _zero_dense(m.init(jax.random.key(0), x))
    grad = jax.grad(mae_loss)
    r = locate(maybe_jit(lambda p, x, y: grad(p, m, x, y), jit))(p, x, jnp.zeros(2))
    check(r, primitive="div", phase="backward", module=None, tag="mae", category="loss_nan")
    assert "stablejax.losses.mae" in r.suggestion
    logits = jnp.array([[0.0, 200.0], [1.0, 0.0]])
    r = locate(maybe_jit(xent_loss, jit))(logits, jnp.array([0, 0]))
    check(r, primitive="log", phase="forward", module=None, tag="xent", category="loss_nan",
          kind="inf")
    assert "log_softmax" in r.suggestion


# ---------------------------------------------------------------- precision and growth


def f16_energy(x):
    return jnp.sum(jnp.exp(x))  # L:f16


def deep_product(w, x):
    return jnp.sum((x * w) * w)  # L:explode


@pytest.mark.parametrize("jit", [False, True])
def test_overflow_low_precision_and_explosion(jit):
    r = locate(maybe_jit(f16_energy, jit))(jnp.array([1.0, 12.0], jnp.float16))
    check(r, primitive="exp", phase="forward", module=None, tag="f16",
          category="overflow_low_precision", kind="inf")
    assert "float32" in r.suggestion
    history = [{"loss": 1.0, "grad_norm": g} for g in (1.0, 1.2, 0.9, 1.1, 8.0, 60.0, 900.0)]
    r = locate(maybe_jit(deep_product, jit), history=history)(
        jnp.full(3, 1e20), jnp.ones(3)
    )
    check(r, primitive="mul", phase="forward", module=None, tag="explode",
          category="grad_explosion", kind="inf")
    assert "clip_by_global_norm(1.2)" in r.suggestion


# ---------------------------------------------------------------- bad inputs


def batch_loss(params, batch):
    return jnp.mean((batch["x"] @ params - batch["y"]) ** 2)


class TokenModel(nn.Module):
    @nn.compact
    def __call__(self, ids):
        return nn.Embed(10, 4)(ids).sum()


@pytest.mark.parametrize("jit", [False, True])
def test_bad_input(jit):
    x = np.ones((5, 3), np.float32)
    x[1, 0] = np.nan
    x[3, 2] = np.inf
    batch = {"x": jnp.asarray(x), "y": jnp.zeros(5)}
    r = locate(maybe_jit(batch_loss, jit))(jnp.ones(3), batch)
    assert (r.primitive, r.category, r.input_path, r.rows) == (
        None, "bad_input", "batch['x']", [1, 3]
    ), str(r)
    m = TokenModel()
    ids = jnp.array([[1, 2], [3, 12]])
    p = m.init(jax.random.key(0), jnp.zeros((2, 2), jnp.int32))
    r = locate(maybe_jit(m.apply, jit))(p, ids)
    assert (r.primitive, r.category, r.input_path, r.rows) == (
        "gather", "bad_input", "args[1]", [1]
    ), str(r)
    assert "[0, 10)" in r.suggestion


# ---------------------------------------------------------------- control flow


def scan_decay(c0):
    def body(c, _):
        c = c - 1.0
        return c, jnp.log(c)  # L:scan

    return jax.lax.scan(body, c0, None, length=6)[1].sum()


def while_halving(x):
    def body(s):
        i, v = s
        return i + 1, jnp.sqrt(v - 0.5)  # L:while

    return jax.lax.while_loop(lambda s: s[0] < 4, body, (0, x))[1]


def cond_branch(x):
    return jax.lax.cond(
        x[0] > 0,
        lambda v: jnp.log(v - 1.0),  # L:cond
        lambda v: v * 2.0,
        x,
    ).sum()


def remat_layer(x):
    return jax.checkpoint(lambda v: jnp.sqrt(v) * v)(x).sum()  # L:remat


@pytest.mark.parametrize("jit", [False, True])
def test_control_flow(jit):
    r = locate(maybe_jit(scan_decay, jit))(jnp.float32(3.5))
    check(r, primitive="log", phase="forward", module=None, tag="scan",
          category="forward_singularity", kind="nan")
    assert r.iteration == 3
    r = locate(maybe_jit(while_halving, jit))(jnp.float32(1.0))
    check(r, primitive="sqrt", phase="forward", module=None, tag="while",
          category="forward_singularity", kind="nan")
    assert r.iteration == 2  # v: 1 -> 0.707 -> 0.455 -> sqrt(-0.045)
    r = locate(maybe_jit(cond_branch, jit))(jnp.array([0.5, 3.0]))
    check(r, primitive="log", phase="forward", module=None, tag="cond",
          category="forward_singularity", kind="nan")
    r = locate(maybe_jit(jax.grad(remat_layer), jit))(jnp.array([0.0, 1.0]))
    check(r, primitive="div", phase="backward", module=None, tag="remat",
          category="derivative_singularity")


@jax.custom_vjp
def clipped_sqrt(x):
    return jnp.sqrt(x)


def clipped_sqrt_fwd(x):
    y = jnp.sqrt(x)
    return y, y


def clipped_sqrt_bwd(y, g):
    return (g / (2.0 * y),)


clipped_sqrt.defvjp(clipped_sqrt_fwd, clipped_sqrt_bwd)


def sqrt_sum(x):
    return clipped_sqrt(x).sum()  # L:vjpcall


@pytest.mark.parametrize("jit", [False, True])
def test_custom_vjp_backward_rule(jit):
    # jax traces a custom_vjp's bwd under the call site's source info, so the
    # line is the call of the custom_vjp function (the forward op), as for any
    # backward value.
    r = locate(maybe_jit(jax.grad(sqrt_sum), jit))(jnp.array([0.0, 1.0]))
    check(r, primitive="div", phase="backward", module=None, tag="vjpcall",
          category="derivative_singularity", kind="inf")


class Layer(nn.Module):
    @nn.compact
    def __call__(self, c, _):
        c = nn.Dense(3, kernel_init=nn.initializers.constant(2.0))(c)
        return c, jnp.log(jnp.abs(c) - 20.0)  # L:nnscan


class Stack(nn.Module):
    @nn.compact
    def __call__(self, x):
        scan = nn.scan(Layer, variable_axes={"params": 0}, split_rngs={"params": True},
                       length=4)
        return scan()(x, None)[1].sum()


@pytest.mark.parametrize("jit", [False, True])
def test_linen_scan_over_layers(jit):
    m = Stack()
    x = jnp.full((1, 3), 0.1)
    p = m.init(jax.random.key(0), x)
    p = jax.tree.map(lambda a: jnp.full_like(a, 1.0) if a.ndim == 3 else jnp.zeros_like(a), p)
    r = locate(maybe_jit(m.apply, jit))(p, x)
    check(r, primitive="log", phase="forward", module="Stack/ScanLayer_0", tag="nnscan",
          category="forward_singularity", kind="nan")
    # layer outputs |c| = 0.3, 0.9, 2.7, 8.1, ...: log(|c| - 20) is NaN from layer 0
    assert r.iteration == 0


# ---------------------------------------------------------------- NNX


class Pool(nnx.Module):
    def __call__(self, h):
        return jnp.std(h, axis=0)  # L:nnxstd


class Block(nnx.Module):
    def __init__(self, rngs):
        self.lin = nnx.Linear(3, 3, rngs=rngs)
        self.pool = Pool()

    def __call__(self, x):
        return self.pool(self.lin(x))


class Encoder(nnx.Module):
    def __init__(self, rngs):
        self.blocks = nnx.List([Block(rngs) for _ in range(3)])

    def __call__(self, x):
        out = 0.0
        for b in self.blocks:
            out = out + b(x).sum()
        return out


class Model(nnx.Module):
    def __init__(self, rngs):
        self.encoder = Encoder(rngs)

    def __call__(self, x):
        return self.encoder(x)


@pytest.mark.parametrize("jit", [False, True])
def test_nnx_module_path_backward(jit):
    model = Model(nnx.Rngs(0))
    model.encoder.blocks[2].lin.kernel[...] = jnp.zeros((3, 3))

    def step(model, x):
        return nnx.grad(lambda m: m(x))(model)

    fn = nnx.jit(step) if jit else step
    x = jax.random.normal(jax.random.key(1), (4, 3))
    if jit:
        fn(model, x)  # compiled and cached before locate sees it
    r = locate(fn)(model, x)
    check(r, primitive="div", phase="backward", module="encoder.blocks.2.pool", tag="nnxstd",
          category="derivative_singularity")
    assert float(model.encoder.blocks[2].lin.kernel[...].sum()) == 0  # untouched


# ---------------------------------------------------------------- optimizer update


def train_step(params, x, tx, opt_state):
    grads = jax.grad(lambda p: jnp.sum(jnp.tanh(x @ p)))(params)
    updates, opt_state = tx.update(grads, opt_state)  # L:update
    return optax.apply_updates(params, updates), opt_state


@pytest.mark.parametrize("jit", [False, True])
def test_update_phase(jit):
    tx = optax.adam(1e-3, eps=0.0)
    params = jnp.ones(3)
    opt_state = tx.init(params)
    x = jnp.zeros((2, 3))  # zero gradients: adam's m / sqrt(v) is 0 / 0
    step = lambda p, x, s: train_step(p, x, tx, s)
    r = locate(maybe_jit(step, jit))(params, x, opt_state)
    check(r, primitive="div", phase="update", module=None, tag="update",
          category="forward_singularity", kind="nan")
    assert "eps" in r.suggestion and "stablejax.optim" in r.suggestion


def per_example(x):
    return jnp.log(x).sum()  # L:vmap


@pytest.mark.parametrize("jit", [False, True])
def test_vmap(jit):
    r = locate(maybe_jit(jax.vmap(per_example), jit))(jnp.array([[1.0, 2.0], [3.0, -1.0]]))
    check(r, primitive="log", phase="forward", module=None, tag="vmap",
          category="forward_singularity", kind="nan")


# ---------------------------------------------------------------- more user-report shapes


def masked_attention(scores, mask):
    s = jnp.where(mask, scores, -jnp.inf)
    return jax.nn.softmax(s, axis=-1).sum()  # L:softmax


def biased_attention(scores, bias):
    return jax.nn.softmax(scores + bias, axis=-1).sum()  # L:bias


def power_feature(x):
    return jnp.sum(x**1.5)  # L:pow


def masked_mean_loss(pred, y, mask):
    err = jnp.sum(jnp.where(mask, (pred - y) ** 2, 0.0))
    return err / jnp.sum(mask)  # L:emptymask


def manual_layernorm(x):
    var = jnp.mean(x**2, -1, keepdims=True) - jnp.mean(x, -1, keepdims=True) ** 2
    return (x - x.mean(-1, keepdims=True)) * jax.lax.rsqrt(var)  # L:rsqrt


def int_labels_loss(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


@pytest.mark.parametrize("jit", [False, True])
def test_user_report_shapes(jit):
    mask = jnp.array([[True, False], [False, False]])
    r = locate(maybe_jit(masked_attention, jit))(jnp.ones((2, 2)), mask)
    check(r, primitive="sub", phase="forward", module=None, tag="softmax",
          category="forward_singularity", kind="nan")
    assert "finfo" in r.suggestion
    bias = jnp.array([[0.0, -jnp.inf], [-jnp.inf, -jnp.inf]])  # a -inf mask passed in
    r = locate(maybe_jit(biased_attention, jit))(jnp.ones((2, 2)), bias)
    check(r, primitive="sub", phase="forward", module=None, tag="bias",
          category="forward_singularity", kind="nan")
    r = locate(maybe_jit(power_feature, jit))(jnp.array([-1.0, 2.0]))
    check(r, primitive="pow", phase="forward", module=None, tag="pow",
          category="forward_singularity", kind="nan")
    assert "jnp.abs" in r.suggestion
    r = locate(maybe_jit(masked_mean_loss, jit))(jnp.ones(3), jnp.ones(3), jnp.zeros(3, bool))
    check(r, primitive="div", phase="forward", module=None, tag="emptymask",
          category="loss_nan", kind="nan")
    r = locate(maybe_jit(manual_layernorm, jit))(jnp.full((2, 4), 3.0))  # var is exactly 0
    check(r, primitive="rsqrt", phase="forward", module=None, tag="rsqrt",
          category="forward_singularity", kind="inf")
    assert "LayerNorm" in r.suggestion
    r = locate(maybe_jit(int_labels_loss, jit))(jnp.zeros((3, 5)), jnp.array([1, 7, 2]))
    assert (r.primitive, r.category, r.input_path, r.rows) == (
        "gather", "bad_input", "labels", [1]
    ), str(r)


def test_captured_nan_params_and_huge_values():
    w = jnp.array([1.0, jnp.nan])
    r = locate(lambda x: jnp.sum(w * x))(jnp.ones(2))
    assert (r.primitive, r.category) == (None, "bad_input"), str(r)
    assert "captured" in r.input_path
    r = locate(deep_product)(jnp.full(3, 1e20), jnp.ones(3))
    check(r, primitive="mul", phase="forward", module=None, tag="explode",
          category="grad_explosion", kind="inf")
    assert "clip_by_global_norm(1.0)" in r.suggestion


@pytest.mark.parametrize("jit", [False, True])
def test_forward_nan_under_grad_stays_forward(jit):
    # The primal sqrt runs in the forward sweep of the gradient: phase 'forward',
    # although only its derivative coefficient and the backward read it after.
    r = locate(maybe_jit(jax.grad(lambda x: jnp.sum(sqrt_features(x))), jit))(
        jnp.array([0.5, 2.0])
    )
    check(r, primitive="sqrt", phase="forward", module=None, tag="sqrtneg",
          category="forward_singularity", kind="nan")


def bare_sqrt(x):
    return jnp.sqrt(x)  # L:bare


@pytest.mark.parametrize("jit", [False, True])
def test_discarded_primal_output(jit):
    # grad drops the primal result; the sqrt that made it is still forward.
    r = locate(maybe_jit(jax.grad(bare_sqrt), jit))(jnp.float32(-1.0))
    check(r, primitive="sqrt", phase="forward", module=None, tag="bare",
          category="forward_singularity", kind="nan")
    r = locate(maybe_jit(jax.vmap(jax.grad(bare_sqrt)), jit))(jnp.array([1.0, 0.0]))
    check(r, primitive="div", phase="backward", module=None, tag="bare",
          category="derivative_singularity", kind="inf")
    assert r.op == "sqrt"


class StdLayer(nn.Module):
    @nn.compact
    def __call__(self, c, _):
        c = nn.Dense(3)(c)
        return c, jnp.std(c)  # L:remscan


class RematStack(nn.Module):
    @nn.compact
    def __call__(self, x):
        scan = nn.scan(nn.remat(StdLayer), variable_axes={"params": 0},
                       split_rngs={"params": True}, length=4)
        return scan()(x, None)[1].sum()


@pytest.mark.parametrize("jit", [False, True])
def test_linen_scan_of_remat_backward(jit):
    m = RematStack()
    x = jnp.ones((1, 3))
    p = m.init(jax.random.key(0), x)
    (name,) = p["params"]
    kernel = p["params"][name]["Dense_0"]["kernel"]
    bias = p["params"][name]["Dense_0"]["bias"]
    # layer 1 outputs the constant vector (1, 1, 1): only its std is 0
    p["params"][name]["Dense_0"]["kernel"] = kernel.at[1].set(0.0)
    p["params"][name]["Dense_0"]["bias"] = bias.at[1].set(1.0)
    r = locate(maybe_jit(jax.grad(lambda p, x: m.apply(p, x)), jit))(p, x)
    check(r, primitive="div", phase="backward", module=f"RematStack/{name}", tag="remscan",
          category="derivative_singularity", kind="inf")
    assert r.iteration == 1 and r.op == "sqrt"


def bce(x, y):
    p = jax.nn.sigmoid(x)
    return -jnp.mean(y * jnp.log(p) + (1 - y) * jnp.log(1 - p))  # L:bce


def f16_attention(q, k):
    return jax.nn.softmax(q @ k.T, axis=-1).sum()  # L:f16attn


def test_sigmoid_bce_and_f16_attention():
    r = locate(jax.jit(bce))(jnp.array([-200.0, 3.0]), jnp.array([1.0, 0.0]))
    check(r, primitive="log", phase="forward", module=None, tag="bce", category="loss_nan",
          kind="inf")
    assert "log_sigmoid" in r.suggestion
    q = jnp.full((4, 64), 40.0, jnp.float16)
    r = locate(jax.jit(f16_attention))(q, q)
    check(r, primitive="dot_general", phase="forward", module=None, tag="f16attn",
          category="overflow_low_precision", kind="inf")


# ---------------------------------------------------------------- bad inputs: who reads them


class BatchReader(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.Dense(4)(x)  # L:badbatch
        return nn.Dense(1)(jax.nn.relu(h)).sum()


class Head(nnx.Module):
    def __init__(self, rngs):
        self.lin = nnx.Linear(2, 3, rngs=rngs)

    def __call__(self, x):
        return self.lin(x)  # L:badparam


class TwoStage(nnx.Module):
    def __init__(self, rngs):
        self.pre = nnx.Linear(2, 2, rngs=rngs)
        self.head = Head(rngs)

    def __call__(self, x):
        return self.head(self.pre(x)).sum()


def scanned_scale(w, xs):
    def body(c, x):
        return c + jnp.sum(w * x), None  # L:badscan

    return jax.lax.scan(body, 0.0, xs)[0]


@pytest.mark.parametrize("jit", [False, True])
def test_bad_input_names_the_first_reader(jit):
    m = BatchReader()
    x = jnp.ones((3, 2))
    p = m.init(jax.random.key(0), x)
    r = locate(maybe_jit(lambda p, batch: m.apply(p, batch["x"]), jit))(
        p, {"x": x.at[1, 0].set(jnp.nan)}
    )
    check(r, primitive=None, phase="forward", module="BatchReader/Dense_0", tag="badbatch",
          category="bad_input", kind="nan")
    assert (r.input_path, r.rows) == ("batch['x']", [1])

    net = TwoStage(nnx.Rngs(0))
    net.head.lin.kernel[...] = net.head.lin.kernel[...].at[0, 1].set(jnp.inf)
    r = locate(nnx.jit(lambda n, x: n(x)) if jit else (lambda n, x: n(x)))(net, x)
    check(r, primitive=None, phase="forward", module="head.lin", tag="badparam",
          category="bad_input", kind="inf")
    assert r.input_path.startswith("n.head.lin.kernel") and r.rows == [0]

    r = locate(maybe_jit(scanned_scale, jit))(jnp.array([1.0, jnp.nan]), jnp.ones((3, 2)))
    check(r, primitive=None, phase="forward", module=None, tag="badscan",
          category="bad_input", kind="nan")


def test_nan_trap_names_the_first_reader_of_a_bad_batch():
    from stablejax.debug import nan_trap

    m = BatchReader()
    x = jnp.ones((3, 2))
    p = m.init(jax.random.key(0), x)
    step = jax.jit(lambda p, x: m.apply(p, x))
    bad = x.at[2, 1].set(jnp.nan)
    with pytest.raises(FloatingPointError) as info:
        with nan_trap():
            step(p, bad)
    r = info.value.report
    assert (r.category, r.module, r.source, r.rows) == (
        "bad_input", "BatchReader/Dense_0", line("badbatch"), [2]
    ), str(r)
