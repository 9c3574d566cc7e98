"""locate's compiled pass: the full walk's answers, in-place outputs, no side effects."""

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
import pytest
from flax import nnx
from jax.experimental import io_callback

from stablejax._src.debug import compiled, interpreter, search
from stablejax.debug import locate

_SRC = open(__file__).read().splitlines()
_FILE = os.path.relpath(__file__)


def line(tag: str) -> str:
    hits = [i + 1 for i, text in enumerate(_SRC) if text.rstrip().endswith(f"# L:{tag}")]
    assert len(hits) == 1, tag
    return f"{_FILE}:{hits[0]}"


def _fields(r):
    return (r.primitive, r.kind, r.phase, r.module, r.source, r.category, r.op, r.reaches_output)


def _flatten(fn, *args):
    """``fn``'s program on ``args`` as the compiled pass flattens it."""
    walker = interpreter.Walker()
    closed = jax.make_jaxpr(fn)(*args)
    return compiled.flatten(walker, closed, interpreter.CALL_PARAMS, walker.root_site())


@pytest.fixture
def no_full_walk(monkeypatch):
    """Fails the test if locate falls back to walking the whole program op by op."""

    def refuse(self, *a, **k):
        raise AssertionError("locate walked the whole program")

    monkeypatch.setattr(interpreter.Walker, "run", refuse)


# ------------------------------------------------- a small transformer, both engines


class Block(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.LayerNorm()(x)
        q = nn.Dense(8, name="q")(h)
        q = q / (jnp.linalg.norm(q, axis=-1, keepdims=True) + 1e-6)  # L:qknorm
        att = jax.nn.softmax(jnp.einsum("btd,bsd->bts", q, h) * 4.0, axis=-1)
        return x + nn.Dense(8)(jnp.einsum("bts,bsd->btd", att, h))


class Tiny(nn.Module):
    @nn.compact
    def __call__(self, x):
        for _ in range(2):
            x = Block()(x)
        return nn.Dense(2)(x)


@pytest.fixture(scope="module")
def tiny():
    model, tx = Tiny(), optax.adamw(1e-2)
    x = jax.random.normal(jax.random.key(0), (2, 5, 8))
    params = model.init(jax.random.key(1), x)
    q = params["params"]["Block_1"]["q"]
    params["params"]["Block_1"]["q"] = jax.tree.map(jnp.zeros_like, q)

    def step(params, opt_state, x):
        loss, grads = jax.value_and_grad(lambda p: jnp.mean(model.apply(p, x) ** 2))(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return jax.jit(step), (params, tx.init(params), x)


def test_compiled_pass_agrees_with_full_walk(tiny, monkeypatch):
    step, args = tiny
    fast = locate(step)(*args)
    assert fast.source == line("qknorm") and fast.module == "Tiny/Block_1", str(fast)
    assert (fast.primitive, fast.phase, fast.op) == ("div", "backward", "sqrt")
    monkeypatch.setattr(search, "search", lambda *a, **k: search.FALLBACK)
    full = locate(step)(*args)
    assert _fields(fast) == _fields(full)
    assert [s.to_dict() for s in fast.inputs] == [s.to_dict() for s in full.inputs]


def test_compiled_pass_in_blocks_alone(tiny, no_full_walk, monkeypatch):
    monkeypatch.setattr(compiled, "SMALL", 0)  # flag per block of BLOCK equations
    monkeypatch.setattr(compiled, "BLOCK", 24)
    step, args = tiny
    r = locate(step)(*args)
    assert (r.primitive, r.module, r.source, r.op) == (
        "div",
        "Tiny/Block_1",
        line("qknorm"),
        "sqrt",
    )
    assert r.phase == "backward" and r.reaches_output
    healthy = jax.tree.map(lambda a: a + 0.1, args[0])
    assert locate(step)(healthy, *args[1:]) is None


# ------------------------------------------------- in-place updates are outputs


class Net(nnx.Module):
    def __init__(self, rngs):
        self.lin = nnx.Linear(3, 1, rngs=rngs)
        self.w = nnx.Param(jnp.zeros(3))

    def __call__(self, x):
        # A harmless masked NaN first (0/0 replaced before use) ...
        ratio = jnp.sum(x, axis=0) / jnp.sum(x * 0.0, axis=0)
        clean = jnp.where(jnp.isfinite(ratio), ratio, 0.0)
        # ... then the real bug: sqrt at w == 0 has an infinite gradient.
        return jnp.mean(self.lin(x)) + jnp.sum(jnp.sqrt(self.w[...])) + 0.0 * clean.sum()  # L:nnx


def test_nnx_step_as_users_write_it():
    model = Net(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, x):
        loss, grads = nnx.value_and_grad(lambda m: m(x))(model)
        optimizer.update(model, grads)
        return loss

    x = jnp.ones((4, 3))
    before = jax.tree.map(lambda a: a.copy(), nnx.state(model))
    r = locate(step)(model, optimizer, x)
    assert r.reaches_output, str(r)
    assert (r.primitive, r.op, r.phase, r.source) == ("div", "sqrt", "backward", line("nnx"))
    assert r.origins >= 2  # the masked 0/0 was seen and passed over
    after = nnx.state(model)
    assert all(
        jnp.array_equal(a, b) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after))
    )


class StatNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        masked = jnp.where(x > 100.0, jnp.log(-x), 0.0)  # NaN everywhere, never selected
        spread = self.variable("batch_stats", "spread", jnp.zeros, (3,))
        spread.value = jnp.std(x, axis=0) / jnp.std(x, axis=0)  # L:stats
        return jnp.mean(nn.Dense(1)(x)) + masked.sum()


def test_linen_mutable_collection_is_an_output():
    model = StatNet()
    x = jnp.ones((4, 3))  # constant columns: std is 0, the statistic is 0/0
    variables = model.init(jax.random.key(0), x)

    @jax.jit
    def step(variables, x):
        loss, updates = model.apply(variables, x, mutable=["batch_stats"])
        return loss, updates["batch_stats"]

    r = locate(step)(variables, x)
    assert r.reaches_output, str(r)
    assert (r.primitive, r.source, r.module) == ("div", line("stats"), "StatNet"), str(r)


def test_masked_nan_alone_does_not_reach():
    def fn(x):
        return jnp.where(x > 0, x, 0.0).sum() + 0.0 * jnp.where(x > 5, jnp.log(x - 10), 0.0).sum()

    r = locate(jax.jit(fn))(jnp.arange(3.0))
    assert r is not None and not r.reaches_output and r.primitive == "log"


# ------------------------------------------------- no side effects, nothing left behind


def test_io_callback_not_run_again_unless_asked():
    calls = []

    def record(x):
        calls.append(1)
        return x

    def fn(x):
        y = io_callback(record, jax.ShapeDtypeStruct(x.shape, x.dtype), x)
        return jnp.log(x - 1.0).sum() + y.sum()

    x = jnp.zeros(3)
    r = locate(jax.jit(fn))(x)
    assert calls == [] and r.callbacks_skipped == 1 and r.primitive == "log"
    assert "not re-evaluated" in str(r)
    r = locate(jax.jit(fn), run_callbacks=True)(x)
    assert calls and r.callbacks_skipped == 0 and r.primitive == "log"
    with pytest.raises(TypeError, match="run_callbacks"):
        locate(fn, run_callbacks="yes")


class Pool(nn.Module):
    @nn.compact
    def __call__(self, h):
        return jnp.std(h, axis=0)


def test_no_root_name_leaks_between_calls():
    class Net(nnx.Module):  # an NNX root class named like the linen model below
        def __call__(self, x):
            return jnp.sqrt(x).sum()

    assert locate(jax.grad(Net()))(jnp.zeros(2)).module == "Net"

    class Net(nn.Module):  # noqa: F811 - the point is the same name
        @nn.compact
        def __call__(self, x):
            return Pool()(x).sum()

    net = Net()
    x = jnp.ones((3, 2))
    params = net.init(jax.random.key(0), x)
    r = locate(jax.grad(lambda x: net.apply(params, x)))(x)
    assert r.module == "Net/Pool_0", str(r)


# ------------------------------------------------- flags of large values: NaN is not dropped


def test_flags_see_a_nan_in_a_large_value():
    # XLA's CPU reduce_max drops NaN from 4096 elements on (jnp.max of 8192 zeros and
    # one NaN is 0.0): the flags are booleans, so a NaN-only value is still flagged.
    from stablejax._src.debug import codes

    for n in (3, 4096, 8192 + 5):
        x = jnp.zeros(n).at[n // 2].set(jnp.nan)
        partials, where = jax.jit(lambda x: codes.packed_codes([jnp.ones(7), x, x + jnp.inf]))(x)
        assert codes.decode(partials, where) == [0, 1, 1], n

    def wide_log(x, w):
        return jnp.sum(w * jnp.log(x))  # L:widelog

    x = jnp.ones(8192).at[4000].set(-1.0)  # log(-1) is NaN, never Inf
    r = locate(jax.jit(wide_log))(x, jnp.ones(8192))
    assert (r.primitive, r.kind, r.source, r.category, r.rows) == (
        "log", "nan", line("widelog"), "forward_singularity", None
    ), str(r)


# ------------------------------------------------- fewer flags: codes inferred on the host


def test_thinning_drops_flags_and_keeps_the_answer(tiny, no_full_walk, monkeypatch):
    from stablejax._src.debug import sparse

    monkeypatch.setattr(compiled, "SMALL", 0)  # a large program's rule: births inferred
    monkeypatch.setattr(compiled, "BLOCK", 24)

    step, args = tiny
    prog = _flatten(step, *args)
    spans = compiled.blocks(prog)
    esc = compiled.escaping(prog, spans)
    flagged, derived = sparse.thin(prog, esc)
    every = [i for e in esc for i in e]
    assert len(flagged) < 0.8 * len(every), (len(flagged), len(every))
    outputs = {i for i in prog.outputs if not isinstance(i, tuple)}
    # Outputs are never inferred, nor flagged: their codes are measured on the host.
    assert not outputs & (set(flagged) | set(derived))
    # The inferred codes are the measured ones.
    measured = compiled.flag_values(prog, list(jax.tree.leaves(args)), False, every)
    thin = compiled.flag_values(prog, list(jax.tree.leaves(args)), False, flagged, outputs=True)
    assert outputs & set(every) <= set(thin)
    assert all(thin[i] == measured[i] for i in outputs & set(every))
    inferred, unknown = sparse.infer(prog, derived, thin, list(jax.tree.leaves(args)))
    assert not unknown
    assert any(measured.values())
    # Inferred codes err only where a value is born non-finite from finite
    # operands (here the QK-norm's division by zero): never a finite value called bad.
    wrong = {i for i in every if inferred[i] != measured[i]}
    assert all(measured[i] and i in derived for i in wrong), wrong
    assert len(wrong) <= 2
    thinned = locate(step)(*args)
    _dense(monkeypatch)
    dense = locate(step)(*args)
    assert _fields(thinned) == _fields(dense)
    assert [s.to_dict() for s in thinned.inputs] == [s.to_dict() for s in dense.inputs]


def _dense(monkeypatch):
    """Every value a block passes on flagged: no code inferred from another."""
    from stablejax._src.debug import sparse

    every = lambda prog, esc, births=True: ([i for e in esc for i in e], {})  # noqa: E731
    monkeypatch.setattr(sparse, "thin", every)
    monkeypatch.setattr(sparse, "imply", lambda prog, f, d, depth=6: (list(f), {}))
    monkeypatch.setattr(sparse, "witnessed", lambda prog, f, phase="forward": (list(f), {}))


def _planned_large(monkeypatch, step, args):
    """``step``'s program planned as a large one is, in blocks of 24 leaves.

    Returns the program, its escaping values and :func:`sparse.plan`'s answer.
    """
    from stablejax._src.debug import sparse

    monkeypatch.setattr(compiled, "SMALL", 0)
    monkeypatch.setattr(compiled, "BLOCK", 24)
    prog = _flatten(step, *args)
    esc = compiled.escaping(prog, compiled.blocks(prog))
    return prog, esc, sparse.plan(prog, esc, births=True)


def test_codes_from_the_outputs_drop_flags_and_keep_the_answer(tiny, no_full_walk, monkeypatch):
    # In a large program the outputs are measured on the host. A gradient read
    # only by the optimizer (its moments are outputs) and a forward activation
    # reaching some output through mul/add/dot_general/... are not flagged: a
    # finite output they reach proves them finite.
    from stablejax._src.debug import sparse

    step, args = tiny
    leaves = list(jax.tree.leaves(args))
    prog, esc, (left, derived, implied, witnessed) = _planned_large(monkeypatch, step, args)
    flagged, _ = sparse.thin(prog, esc)
    phase = {o: leaf.phase for leaf in prog.leaves for o in leaf.outs}
    assert implied and witnessed and len(left) < 0.7 * len(flagged), (len(left), len(flagged))
    assert {phase[i] for i in witnessed} == {"forward"}
    every = [i for e in esc for i in e]
    measured = compiled.flag_values(prog, leaves, False, every)
    thin = compiled.flag_values(prog, leaves, False, left, outputs=True)
    codes, unknown = sparse.infer(prog, derived, thin, leaves, implied, witnessed)
    assert any(measured[i] for i in implied)  # the bad block's gradients
    assert any(not measured[i] for i in implied) and any(not codes[i] for i in witnessed)
    for i in [*implied, *witnessed]:  # decided codes are the measured ones
        assert i in unknown or codes[i] == measured[i], i
    fast = locate(step)(*args)
    _dense(monkeypatch)
    dense = locate(step)(*args)
    assert _fields(fast) == _fields(dense)
    assert [s.to_dict() for s in fast.inputs] == [s.to_dict() for s in dense.inputs]


def test_witnessed_only_through_operations_that_keep_every_element():
    # A NaN in a cropped entry (negative padding) or in a divisor need not reach
    # the output: no finite output may vouch for those values. A gathered entry
    # neither; a padded, multiplied, summed or matmul'ed one always does.
    from stablejax._src.debug import sparse

    def f(x, w, d):
        a = jnp.sin(x)
        cropped = jax.lax.pad(a, 0.0, [(-1, 0, 0)])
        b = jnp.cos(x)
        padded = jax.lax.pad(b, 0.0, [(1, 2, 1)])
        c = jnp.tanh(x)
        e = jnp.exp(d)
        picked = jnp.log1p(w)[0]
        return cropped.sum(), (padded * 2.0).sum() + (c @ jnp.tanh(w)).sum(), (x / e), picked

    x, w, d = jnp.ones(4), jnp.ones((4, 3)), jnp.ones(4)
    prog = _flatten(f, x, w, d)
    made = {leaf.eqn.primitive.name: leaf.outs[0] for leaf in prog.leaves}
    every = [o for leaf in prog.leaves for o in leaf.outs if o is not None]
    _, witnessed = sparse.witnessed(prog, every)
    assert made["sin"] not in witnessed  # cropped
    assert made["exp"] not in witnessed  # a divisor
    assert made["log1p"] not in witnessed  # only one entry read
    assert made["cos"] in witnessed and made["tanh"] in witnessed  # padded / matmul'ed


def test_optimizer_overflow_of_a_finite_gradient(blocks_of_two, monkeypatch):
    # Adam squares a finite gradient of 1e20: g ** 2 overflows to Inf in the
    # second moment, an output. The gradient's code, implied from that output,
    # says non-finite; the block making it shows it finite, so the search takes
    # it as measured and moves on to the optimizer's power.
    from stablejax._src.debug import sparse

    tx = optax.adam(1e-3)

    def step(w, s, x):
        g = jax.grad(lambda w: jnp.sum(jnp.tanh(x @ w)))(w)  # a dot_general: flagged
        u, s = tx.update(g, s, w)
        return optax.apply_updates(w, u), s

    w, x = jnp.zeros(4), jnp.full((3, 4), 1e20)
    s = tx.init(w)
    prog = _flatten(step, w, s, x)
    esc = compiled.escaping(prog, compiled.blocks(prog))
    _, implied = sparse.imply(prog, *sparse.thin(prog, esc))
    pows = [o for leaf in prog.leaves if leaf.eqn.primitive.name == "integer_pow" for o in leaf.ins]
    assert set(pows) & set(implied)  # the gradient adam squares
    calls = []
    values_of = compiled.values_of
    monkeypatch.setattr(
        compiled, "values_of", lambda *a, **k: calls.append(k["block"]) or values_of(*a, **k)
    )
    with monkeypatch.context() as m:
        m.setattr(interpreter.Walker, "run", lambda *a, **k: pytest.fail("full walk"))
        fast = locate(jax.jit(step))(w, s, x)
    assert (fast.primitive, fast.kind, fast.phase) == ("integer_pow", "inf", "update"), str(fast)
    assert len(calls) >= 2  # first the gradient's block, then the power's
    monkeypatch.setattr(search, "search", lambda *a, **k: search.FALLBACK)
    assert _fields(locate(jax.jit(step))(w, s, x)) == _fields(fast)


class LogNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = jnp.log(nn.Dense(4)(x))  # L:fwdlog
        return nn.Dense(2)(h * 2.0 + 1.0)


def _counting(monkeypatch):
    """Records the value ids of each compiled flag pass and the block of each values_of."""
    passes, reads = [], []
    flag_values, values_of = compiled.flag_values, compiled.values_of

    def counted_flags(prog, a, rc, ids, **k):
        passes.append(list(ids))
        return flag_values(prog, a, rc, ids, **k)

    def counted_values(*a, **k):
        reads.append(k.get("block"))
        return values_of(*a, **k)

    monkeypatch.setattr(compiled, "flag_values", counted_flags)
    monkeypatch.setattr(compiled, "values_of", counted_values)
    return passes, reads


@pytest.mark.parametrize("tentative", [True, False])
def test_forward_nan_leaves_witnessed_codes_undecided(blocks_of_two, monkeypatch, tentative):
    # log of a negative pre-activation: the NaN reaches every output, so no finite
    # output proves a forward activation finite. Their codes are undecided: a few
    # are taken as finite and read with the chosen block's operands (here they are
    # not finite, so the search chooses again with them); more are measured in a
    # second compiled pass. Either way the answer is the dense one.
    model, tx = LogNet(), optax.sgd(0.1)
    x = jax.random.normal(jax.random.key(0), (3, 4))
    params = model.init(jax.random.key(1), x)
    opt_state = tx.init(params)

    def step(params, opt_state, x):
        loss, grads = jax.value_and_grad(lambda p: jnp.mean(model.apply(p, x) ** 2))(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    if not tentative:
        monkeypatch.setattr(search, "_TENTATIVE_VALUES", 0)
    passes, reads = _counting(monkeypatch)
    with monkeypatch.context() as m:
        m.setattr(interpreter.Walker, "run", lambda *a, **k: pytest.fail("full walk"))
        fast = locate(jax.jit(step))(params, opt_state, x)
    assert (fast.primitive, fast.phase, fast.source) == ("log", "forward", line("fwdlog"))
    if tentative:
        assert len(passes) == 1 and len(reads) == 2, (passes, reads)
    else:
        assert len(passes) == 2 and passes[1], passes  # the undecided codes, measured
    _dense(monkeypatch)
    assert _fields(locate(jax.jit(step))(params, opt_state, x)) == _fields(fast)


def test_finite_undecided_codes_cost_no_pass_of_their_own(tiny, monkeypatch):
    # The zero query kernel's forward values reach only its NaN gradients: their
    # codes are undecided. Read with the operands of the block chosen first (in
    # the backward pass, later in the program) they are finite: no flag pass of
    # their own (two without the tentative read), and the dense answer.
    from stablejax._src.debug import sparse

    step, args = tiny
    leaves = list(jax.tree.leaves(args))
    prog, _, (left, derived, implied, witnessed) = _planned_large(monkeypatch, step, args)
    measured = compiled.flag_values(prog, leaves, False, left, outputs=True)
    _, unknown = sparse.infer(prog, derived, measured, leaves, implied, witnessed)
    assert unknown and all(u in witnessed for u in unknown)
    passes, reads = _counting(monkeypatch)
    with monkeypatch.context() as m:
        m.setattr(interpreter.Walker, "run", lambda *a, **k: pytest.fail("full walk"))
        fast = locate(step)(*args)
    assert (fast.primitive, fast.phase, fast.op) == ("div", "backward", "sqrt")
    assert len(passes) == 1 and reads, (passes, reads)
    assert all(prog.leaves[k].outs[0] not in unknown for k in reads[0])  # chosen after them
    monkeypatch.setattr(search, "_TENTATIVE_VALUES", 0)
    passes.clear()
    assert _fields(locate(step)(*args)) == _fields(fast) and len(passes) == 2
    _dense(monkeypatch)
    assert _fields(locate(step)(*args)) == _fields(fast)


@pytest.fixture
def blocks_of_two(monkeypatch):
    """A small program thinned as a large one is: blocks of 1-2 leaves, births inferred."""
    monkeypatch.setattr(compiled, "SMALL", 0)
    monkeypatch.setattr(compiled, "BLOCK", 2)


def test_birth_on_an_unflagged_chain(no_full_walk, blocks_of_two, monkeypatch):
    # x + x overflows to Inf from finite operands: an add of an argument, so its
    # code is inferred (finite) and not flagged; sin(Inf) is NaN and flagged. The
    # search must move from sin's block to the add's.
    from stablejax._src.debug import sparse

    def f(x, y):
        big = x + x  # L:overflow
        twice = jnp.reshape(big, (2, 2)) * 2.0
        return jnp.sum(jnp.sin(twice) * y)

    x = jnp.full((4,), 3e38, jnp.float32)
    y = jnp.ones((2, 2))
    prog = _flatten(f, x, y)
    esc = compiled.escaping(prog, compiled.blocks(prog))
    flagged, derived = sparse.thin(prog, esc)
    adds = [o for leaf in prog.leaves if leaf.eqn.primitive.name == "add" for o in leaf.outs]
    assert adds and all(o in derived and o not in flagged for o in adds)
    r = locate(jax.jit(f))(x, y)
    assert (r.primitive, r.kind, r.source) == ("add", "inf", line("overflow")), str(r)
    assert r.reaches_output
    # Without the move, the block chosen first (sin's) shows an operand the codes
    # called finite: the search gives up on the compiled pass.
    monkeypatch.setattr(search, "_MAX_MOVES", 0)
    with pytest.raises(AssertionError, match="walked the whole program"):
        locate(jax.jit(f))(x, y)


def test_birth_on_an_inferred_chain_feeding_an_output(no_full_walk, monkeypatch):
    # A program over compiled.SMALL leaves (births inferred, outputs measured on
    # the host, not flagged): its only non-finite value is born by overflow in a
    # mul of an argument, an inferred (finite) code, and reaches an output
    # through more inferred values only. The output's measured code is the
    # safety net: the search starts at the block making it and moves back.
    from stablejax._src.debug import sparse

    def f(x, w):
        big = x * 1e30  # L:chainbirth
        for _ in range(330):
            w = jnp.sin(w) * 0.5
        return w, jnp.reshape(big, (2, 2)).T * 2.0

    x, w = jnp.full((4,), 1e10, jnp.float32), jnp.ones(3)
    prog = _flatten(f, x, w)
    assert len(prog.leaves) > compiled.SMALL
    spans = compiled.blocks(prog)
    esc = compiled.escaping(prog, spans)
    flagged, derived = sparse.thin(prog, esc, births=True)
    out = prog.outputs[1]
    names = ("reshape", "transpose")
    moves = [leaf.outs[0] for leaf in prog.leaves if leaf.eqn.primitive.name in names]
    born = prog.leaves[0].outs[0]
    assert born in derived and born not in flagged and out not in flagged
    assert len(moves) == 2 and all(o in derived for o in moves)
    measured = compiled.flag_values(prog, [x, w], False, flagged, outputs=True)
    assert measured[out] == 1 and not any(measured[i] for i in flagged)
    codes, _ = sparse.infer(prog, derived, measured, [x, w])
    assert codes[born] == 0  # inferred finite: only the output shows the Inf
    r = locate(jax.jit(f))(x, w)
    assert (r.primitive, r.kind, r.source) == ("mul", "inf", line("chainbirth")), str(r)
    assert r.reaches_output
    # Without the output's measured code, nothing looks non-finite.
    monkeypatch.setattr(compiled, "nonfinite_kind", lambda v: None)
    assert locate(jax.jit(f))(x, w) is None


def test_derivable_rule():
    from stablejax._src.debug import sparse

    def eqn_of(fn, *args):
        return jax.make_jaxpr(fn)(*args).jaxpr.eqns[0]

    x = jnp.ones(3, jnp.float32)
    assert sparse.derivable(eqn_of(lambda a: a.reshape(3, 1), x))
    assert sparse.derivable(eqn_of(lambda a: a.astype(jnp.float32), x.astype(jnp.bfloat16)))
    assert not sparse.derivable(eqn_of(lambda a: a.astype(jnp.bfloat16), x))  # may overflow
    assert not sparse.derivable(eqn_of(lambda a: a.astype(jnp.float16), x))
    assert not sparse.derivable(eqn_of(lambda a: a[:2], x))  # a slice can drop the NaN
    assert not sparse.derivable(eqn_of(lambda a: a**-1, x))
    assert sparse.derivable(eqn_of(lambda a: a**2, x))


def test_birth_by_sqrt_on_an_unflagged_chain(no_full_walk, blocks_of_two):
    def g(x):
        root = jnp.sqrt(x - 2.0)  # L:sqrtbirth
        return jnp.sum(jnp.exp(root.T))

    r = locate(jax.jit(g))(jnp.ones((3, 2)))
    assert (r.primitive, r.kind, r.source) == ("sqrt", "nan", line("sqrtbirth")), str(r)


def test_division_by_a_nonfinite_value_is_measured(no_full_walk, blocks_of_two):
    from stablejax._src.debug import sparse

    def h(x, s):
        return jnp.sum(jnp.sin(x / s) * x)

    x, s = jnp.ones(4), jnp.float32(jnp.inf)
    prog = _flatten(h, x, s)
    esc = compiled.escaping(prog, compiled.blocks(prog))
    flagged, derived = sparse.thin(prog, esc)
    divs = [o for leaf in prog.leaves if leaf.eqn.primitive.name == "div" for o in leaf.outs]
    assert divs and all(o in derived for o in divs)
    measured = compiled.flag_values(prog, [x, s], False, flagged)
    codes, unknown = sparse.infer(prog, derived, measured, [x, s])
    assert unknown == divs  # x / inf is 0: the OR (1) is not the code
    _, unknown = sparse.infer(prog, derived, measured, [x, jnp.float32(2.0)])
    assert not unknown
    r = locate(jax.jit(h))(x, s)  # measured: x / s is finite; s came in non-finite
    assert r.primitive is None and r.kind == "inf" and not r.reaches_output, str(r)
    # A finite numerator over a tensor holding an Inf: x / inf is 0, the sin
    # of it finite; the NaN born later (log of -1) is the one that reaches.

    def h2(x, y):
        q = x / jnp.exp(y)
        return jnp.sum(jnp.sin(q) + jnp.log(x - 2.0))  # L:logbirth

    y = jnp.array([1.0, 1e3, 1.0, 1.0])  # exp(1e3) is Inf: born there, masked by x / inf
    r = locate(jax.jit(h2))(x, y)
    assert (r.primitive, r.kind, r.source) == ("log", "nan", line("logbirth")), str(r)
    assert r.reaches_output


def test_cuts_keep_block_lengths_and_cross_fewer_values(tiny, monkeypatch):
    monkeypatch.setattr(compiled, "SMALL", 0)
    monkeypatch.setattr(compiled, "BLOCK", 24)
    step, args = tiny
    prog = _flatten(step, *args)
    spans = compiled.blocks(prog)
    assert spans[0].start == 0 and spans[-1].stop == len(prog.leaves)
    assert all(a.stop == b.start for a, b in zip(spans, spans[1:]))
    assert all(12 <= len(s) <= 24 for s in spans[:-1]) and 1 <= len(spans[-1]) <= 24
    from stablejax._src.debug import sparse

    made, last = {}, {}
    for k, leaf in enumerate(prog.leaves):
        for i in leaf.ins:
            if not isinstance(i, tuple):
                last[i] = k
        if not sparse.derivable(leaf.eqn):
            made.update((o, k) for o in leaf.outs if o is not None)

    def short_flags(spans):  # what the cuts minimize: short-lived values flagged
        esc = compiled.escaping(prog, spans)
        return sum(1 for e in esc for i in e if i in made and last.get(i, 0) - made[i] < 96)

    n_cut, n_fixed = short_flags(spans), short_flags(compiled.blocks(prog, 24))
    assert n_cut < n_fixed, (n_cut, n_fixed)


def test_block_walk_reads_the_compiled_outputs(tiny, no_full_walk, monkeypatch):
    # The chosen block's leaves run in values_of's compiled program: the walker
    # binds none of them again (no compile per primitive), and the answer holds.
    monkeypatch.setattr(compiled, "SMALL", 0)
    monkeypatch.setattr(compiled, "BLOCK", 24)
    calls = []
    real = interpreter.bind_equation

    def counted(eqn, vals):
        calls.append(eqn.primitive.name)
        return real(eqn, vals)

    monkeypatch.setattr(interpreter, "bind_equation", counted)
    step, args = tiny
    r = locate(step)(*args)
    want = ("div", "Tiny/Block_1", line("qknorm"), "sqrt")
    assert (r.primitive, r.module, r.source, r.op) == want
    assert calls == []
    monkeypatch.setattr(search.compiled, "values_of", _without_block(compiled.values_of))
    again = locate(step)(*args)  # bound eagerly: the same report
    assert calls and _fields(again) == _fields(r)
    assert [s.to_dict() for s in again.inputs] == [s.to_dict() for s in r.inputs]


def _without_block(values_of):
    def run(prog, args, ids, upto, run_callbacks, block=None):
        return values_of(prog, args, ids, upto, run_callbacks), None

    return run


def test_small_program_infers_no_births():
    # Up to compiled.SMALL leaves every value is flagged, so that a NaN born and
    # masked is seen: only moves and copies are inferred there.
    from stablejax._src.debug import sparse

    def f(x):
        r = jnp.sum(x) / jnp.sum(x * 0.0)  # 0/0, masked below
        return jnp.reshape(x * 2.0, (2, 2)).T + jnp.where(jnp.isfinite(r), r, 0.0)

    prog = _flatten(f, jnp.ones(4))
    esc = compiled.escaping(prog, compiled.blocks(prog))
    names = {o: leaf.eqn.primitive.name for leaf in prog.leaves for o in leaf.outs}
    _, derived = sparse.thin(prog, esc, births=False)
    small = {names[o] for o in derived}
    assert "reshape" in small and small <= sparse.EXACT | {"convert_element_type"}, small
    _, derived = sparse.thin(prog, esc)
    assert {"div", "mul", "reshape"} <= {names[o] for o in derived}
    r = locate(jax.jit(f))(jnp.ones(4))
    assert r.primitive == "div" and not r.reaches_output and r.origins == 1, str(r)
