"""locate inside shard_map and pmap bodies: the body's equation and the shard where it was born."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from stablejax._src.debug import shards
from stablejax.debug import locate

N = 8


@pytest.fixture(scope="module")
def mesh():
    if jax.device_count() < N:
        pytest.skip("needs 8 (virtual) devices")
    return jax.sharding.Mesh(np.array(jax.devices()[:N]), ("data",))


@pytest.fixture(scope="module")
def mesh2():
    if jax.device_count() < N:
        pytest.skip("needs 8 (virtual) devices")
    return jax.sharding.Mesh(np.array(jax.devices()[:N]).reshape(4, 2), ("data", "model"))


def _line(fn, text):
    import inspect

    lines, start = inspect.getsourcelines(fn)
    (k,) = [i for i, s in enumerate(lines) if text in s]
    return f"tests/test_debug_shards.py:{start + k}"


def normalized_sum(x):
    """Per-shard normalization of each row, summed over every shard by a psum."""
    norm = jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True))
    y = x / norm
    return jax.lax.psum(jnp.sum(y), "data")[None]


def _zero_row(row=3):
    return jnp.ones((N, 4)).at[row].set(0.0)


@pytest.mark.parametrize("jitted", [True, False])
def test_forward_nan_named_in_the_body_on_its_shard(mesh, jitted):
    f = jax.shard_map(normalized_sum, mesh=mesh, in_specs=P("data"), out_specs=P("data"))
    f = jax.jit(f) if jitted else f
    x = _zero_row(3)
    assert np.isnan(np.asarray(f(x))).all()  # the psum spreads it to every shard
    r = locate(f)(x)
    assert (r.primitive, r.kind, r.phase) == ("div", "nan", "forward")
    assert r.source == _line(normalized_sum, "y = x / norm")
    assert r.mesh_axes == ["data"] and r.shard_index == {"data": 3}
    assert (r.shards_affected, r.num_shards) == (1, N)
    assert r.device == mesh.devices[3].id and r.process == 0 and r.origin_local
    assert r.reaches_output
    # The operands are the bad shard's: its one zero row, not the 8-row batch.
    assert r.inputs[1].shape == (1, 1) and r.inputs[1].zeros == 1
    assert "on shard data=3 of 8 (device 3), 1 of 8 shards" in str(r)


def test_backward_nan_through_shard_map(mesh):
    f = jax.shard_map(normalized_sum, mesh=mesh, in_specs=P("data"), out_specs=P("data"))
    grad = jax.jit(jax.grad(lambda x: f(x).sum()))
    x = jnp.ones((N, 4)).at[6].set(0.0)
    r = locate(grad)(x)
    assert (r.phase, r.op, r.category) == ("backward", "sqrt", "derivative_singularity")
    assert r.source == _line(normalized_sum, "jnp.sqrt(")
    assert r.shard_index == {"data": 6} and r.device == mesh.devices[6].id
    assert r.shards_affected == 1


def test_two_axis_mesh(mesh2):
    def body(x):
        return jax.lax.psum(jnp.log(x), ("data", "model"))

    f = jax.jit(jax.shard_map(body, mesh=mesh2, in_specs=P("data", "model"), out_specs=P()))
    x = jnp.ones((8, 6)).at[5, 4].set(0.0)  # block (2, 1): rows 4-5, columns 3-5
    r = locate(f)(x)
    assert (r.primitive, r.kind) == ("log", "inf")
    assert r.mesh_axes == ["data", "model"]
    assert r.shard_index == {"data": 2, "model": 1}
    assert r.device == mesh2.devices[2, 1].id and r.num_shards == 8
    assert "on shard data=2, model=1 of 8" in r.headline


def test_pmap(mesh):
    f = jax.pmap(lambda x: jax.lax.psum(jnp.log(x), "i"), axis_name="i")
    x = jnp.ones((N, 3)).at[5, 1].set(0.0)
    r = locate(f)(x)
    assert (r.primitive, r.kind) == ("log", "inf")
    assert r.mesh_axes == ["i"] and r.shard_index == {"i": 5}
    assert r.shards_affected == 1


def test_collectives_are_followed(mesh):
    """axis_index, ppermute and all_gather run per shard, as the devices run them."""

    def body(x):
        i = jax.lax.axis_index("data")
        y = x / (i - 2.0)  # an Inf born on shard 2 only
        y = jax.lax.ppermute(y, "data", [(k, (k + 1) % N) for k in range(N)])
        return jax.lax.all_gather(jnp.sum(y), "data")[None]

    f = jax.jit(
        jax.shard_map(body, mesh=mesh, in_specs=P("data"), out_specs=P("data"), check_vma=False)
    )
    r = locate(f)(jnp.ones((N, 2)))
    assert (r.primitive, r.kind) == ("div", "inf")
    assert r.shard_index == {"data": 2} and r.shards_affected == 1
    assert r.source == _line(body, "y = x / (i - 2.0)")


def test_masked_nan_in_a_body_is_not_chosen(mesh):
    def body(x):
        harmless = jnp.where(x > 0, jnp.log(x), 0.0)  # log(-1) on shard 1, masked
        real = x / jnp.sum(x * x)  # 0/0 on shard 6
        return (harmless + real).sum(axis=-1)

    f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P("data"), out_specs=P("data")))
    x = jnp.ones((N, 2)).at[1, 0].set(-1.0).at[6].set(0.0)
    r = locate(f)(x)
    assert (r.primitive, r.shard_index, r.reaches_output) == ("div", {"data": 6}, True)
    assert r.origins == 2
    # With only the masked one left, it is reported as not reaching the outputs.
    only_masked = locate(f)(x.at[6].set(1.0))
    assert only_masked.primitive == "log" and only_masked.shard_index == {"data": 1}
    assert not only_masked.reaches_output


def test_scan_inside_a_body(mesh):
    def body(x):
        def step(c, k):
            return c * jnp.sqrt(x[0, 0] - k), None  # sqrt(-1) at k = 2 on shard 4

        c, _ = jax.lax.scan(step, jnp.ones(()), jnp.arange(4.0))
        return c[None]

    f = jax.jit(
        jax.shard_map(body, mesh=mesh, in_specs=P("data"), out_specs=P("data"), check_vma=False)
    )
    x = jnp.full((N, 1), 5.0).at[4].set(1.0)
    r = locate(f)(x)
    assert r.primitive == "sqrt" and r.iteration == 2
    assert r.shard_index == {"data": 4}


def test_finite_body_gives_none(mesh):
    f = jax.jit(jax.shard_map(normalized_sum, mesh=mesh, in_specs=P("data"), out_specs=P("data")))
    assert locate(f)(jnp.ones((N, 4))) is None


@pytest.mark.parametrize(
    "spec", [P("data", "model"), P(None, "model"), P(("data", "model")), P(), P("model", "data")]
)
def test_stacked_blocks_are_the_devices_blocks(mesh2, spec):
    x = jnp.arange(8 * 8, dtype=jnp.float32).reshape(8, 8)
    sizes = {"data": 4, "model": 2}
    stacked = shards.to_stacked(x, spec, ("data", "model"), sizes)
    placed = jax.device_put(x, NamedSharding(mesh2, spec))
    blocks = {s.device.id: np.asarray(s.data) for s in placed.addressable_shards}
    for i in range(4):
        for j in range(2):
            np.testing.assert_array_equal(stacked[i, j], blocks[mesh2.devices[i, j].id])
    aval = jax.core.ShapedArray(x.shape, x.dtype)
    back = shards.from_stacked(stacked, spec, ("data", "model"), aval)
    np.testing.assert_array_equal(back, x)


def test_taints_are_per_shard(mesh):
    """A NaN on shard 1 that is masked later does not own a new NaN born on shard 6."""

    def body(x):
        a = jnp.sqrt(x)  # NaN on shard 1 (sqrt(-1)), masked below
        b = a / jnp.sum(a * a, axis=-1, keepdims=True)  # 0/0 on shard 6: the real one
        return jnp.where((x < 0).any(axis=-1, keepdims=True), 0.0, b).sum(axis=-1)

    f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P("data"), out_specs=P("data")))
    x = jnp.ones((N, 2)).at[1, 0].set(-1.0).at[6].set(0.0)
    r = locate(f)(x)
    assert (r.primitive, r.kind, r.shard_index) == ("div", "nan", {"data": 6})
    assert r.reaches_output and r.shards_affected == 1
    assert r.source == _line(body, "b = a / jnp.sum(")


def test_explicit_mesh_from_make_mesh():
    """jax.make_mesh gives Explicit axes: forward, and grad under jax.set_mesh."""
    if jax.device_count() < N:
        pytest.skip("needs 8 (virtual) devices")
    mesh = jax.make_mesh((N,), ("data",))
    f = jax.jit(jax.shard_map(normalized_sum, mesh=mesh, in_specs=P("data"), out_specs=P("data")))
    x = jax.device_put(_zero_row(2), NamedSharding(mesh, P("data")))
    r = locate(f)(x)
    assert (r.primitive, r.shard_index, r.device) == ("div", {"data": 2}, mesh.devices[2].id)
    with jax.set_mesh(mesh):
        r = locate(jax.jit(jax.grad(lambda x: f(x).sum())))(x)
    assert (r.phase, r.op, r.shard_index) == ("backward", "sqrt", {"data": 2})


def test_nan_trap_reports_the_shard(mesh):
    from stablejax.debug import NonFiniteError, nan_trap

    f = jax.jit(jax.shard_map(normalized_sum, mesh=mesh, in_specs=P("data"), out_specs=P("data")))
    with pytest.raises(NonFiniteError) as err, nan_trap():
        f(_zero_row(3))
    r = err.value.report
    assert (r.primitive, r.shard_index, r.device) == ("div", {"data": 3}, mesh.devices[3].id)
