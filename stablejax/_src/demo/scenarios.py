"""The demo's six scenarios: one cause of NaN each, a naive recipe and the fixed one.

Every scenario is a small real training run on synthetic data generated here
(numpy, seeded: no downloads). The fault is part of the data or the model, at
a step proportional to the run's length, so ``--steps`` scales everything.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from stablejax._src.demo import zoo as models
from stablejax._src.demo.train import Batch, Recipe
from stablejax._src.optim.clipping import clip_by_global_norm
from stablejax._src.optim.guard import guard

BATCH = 32


@dataclasses.dataclass(frozen=True)
class Scenario:
    """One cause of NaN, shown by a naive run and fixed by stablejax.

    Attributes:
      name: the name given to ``--scenario``.
      title: a short human title.
      cause: one sentence on what goes wrong.
      fix: the stablejax change between the naive and the fixed run.
      short_fix: the fix in a few words, for the summary table.
      expected_category: the category ``locate`` should give.
      build: ``build(steps) -> (batches, naive recipe, fixed recipe)``.
      in_code: whether the cause is in the code, so that ``lint`` should flag the
        naive loss before any run (not for bad data or a learning-rate explosion).
    """

    name: str
    title: str
    cause: str
    fix: str
    short_fix: str
    expected_category: str
    build: Callable[[int], tuple[list[Batch], Recipe, Recipe]]
    in_code: bool = True


def _init(model, batch: Batch, key: str) -> dict:
    # Jitted: one compilation instead of one per op of an eager init.
    init = jax.jit(lambda x: model.init(jax.random.key(0), x)["params"])
    return init(jnp.asarray(batch[key][:2]))


def _xent(model) -> Callable[[dict, Batch], jax.Array]:
    def loss_fn(params, batch):
        logits = model.apply({"params": params}, batch["x"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()

    return loss_fn


def _mse(model) -> Callable[[dict, Batch], jax.Array]:
    def loss_fn(params, batch):
        pred = model.apply({"params": params}, batch["x"])
        return jnp.mean((pred - batch["y"]) ** 2)

    return loss_fn


def _regression(steps: int, seed: int, features: int = 16) -> list[Batch]:
    rng = np.random.default_rng(seed)
    w = rng.normal(size=features).astype(np.float32) / np.sqrt(features)
    out = []
    for _ in range(steps):
        x = rng.normal(size=(BATCH, features)).astype(np.float32)
        out.append({"x": x, "y": np.sin(2.0 * x @ w).astype(np.float32)})
    return out


def _classifier_recipes(model_cls, batches: list[Batch]) -> tuple[list[Batch], Recipe, Recipe]:
    """Naive and fixed (``safe=True``) classifiers from the same initial params, Adam 1e-2."""
    naive_model, fixed_model = model_cls(), model_cls(safe=True)
    params = _init(naive_model, batches[0], "x")
    tx = optax.adam(1e-2)
    return batches, Recipe(_xent(naive_model), tx, params), Recipe(_xent(fixed_model), tx, params)


def _explosion(steps: int) -> tuple[list[Batch], Recipe, Recipe]:
    batches = _regression(steps, seed=1)
    model = models.DeepMLP()
    params = _init(model, batches[0], "x")
    lr = 0.3
    naive = optax.sgd(lr, momentum=0.9)
    # The same optimizer at the same rate, with the guard and the safe clip around it.
    fixed = guard(optax.chain(clip_by_global_norm(1.0), optax.sgd(lr, momentum=0.9)))
    return batches, Recipe(_mse(model), naive, params), Recipe(_mse(model), fixed, params)


def _zero_norm(steps: int) -> tuple[list[Batch], Recipe, Recipe]:
    rng = np.random.default_rng(2)
    vocab, classes = 64, 4
    topics = rng.dirichlet(np.full(vocab, 0.2), size=classes)
    batches = []
    for i in range(steps):
        y = rng.integers(0, classes, size=BATCH)
        counts = np.stack([rng.multinomial(20, topics[c]) for c in y]).astype(np.float32)
        if i >= steps // 3 and i % 7 == 0:
            counts[5] = 0.0  # an empty document
        batches.append({"x": counts, "y": y.astype(np.int32)})
    return _classifier_recipes(models.DocClassifier, batches)


def _silent_std(steps: int) -> tuple[list[Batch], Recipe, Recipe]:
    rng = np.random.default_rng(3)
    frames, feats, speakers = 16, 8, 4
    centers = rng.normal(size=(speakers, feats)).astype(np.float32)
    scales = rng.uniform(0.3, 2.0, size=(speakers, feats)).astype(np.float32)
    batches = []
    for i in range(steps):
        y = rng.integers(0, speakers, size=BATCH)
        x = centers[y][:, None] + scales[y][:, None] * rng.normal(size=(BATCH, frames, feats))
        x = x.astype(np.float32)
        if i >= steps // 3 and i % 5 == 0:
            x[2] = 0.0  # a silent utterance
        batches.append({"x": x, "y": y.astype(np.int32)})
    return _classifier_recipes(models.SpeakerNet, batches)


def _sqrt_loss(steps: int) -> tuple[list[Batch], Recipe, Recipe]:
    rng = np.random.default_rng(4)
    features = 8
    w = rng.normal(size=features).astype(np.float32)
    batches = []
    for _ in range(steps):
        x = rng.normal(size=(BATCH, features)).astype(np.float32)
        rain = np.maximum(x @ w, 0.0).astype(np.float32)  # dry days are exactly 0
        batches.append({"x": x, "y": rain})
    model = models.RainNet()
    params = _init(model, batches[0], "x")

    def naive_loss(params, batch):
        return models.sqrt_mae_loss(model.apply({"params": params}, batch["x"]), batch["y"])

    def fixed_loss(params, batch):
        return models.mae_loss(model.apply({"params": params}, batch["x"]), batch["y"])

    tx = optax.adam(1e-2)
    return batches, Recipe(naive_loss, tx, params), Recipe(fixed_loss, tx, params)


def _nan_batch(steps: int) -> tuple[list[Batch], Recipe, Recipe]:
    batches = _regression(steps, seed=5)
    bad = steps // 2
    batches[bad]["x"][[3, 17]] = np.nan  # a corrupted sensor reading in two examples
    model = models.DeepMLP(depth=2, width=32)
    params = _init(model, batches[0], "x")
    tx = optax.adam(3e-3)
    return (
        batches,
        Recipe(_mse(model), tx, params),
        Recipe(_mse(model), guard(tx), params),
    )


def _fp16_overflow(steps: int) -> tuple[list[Batch], Recipe, Recipe]:
    batches = _regression(steps, seed=6)
    loud = steps // 2
    for i in range(loud, steps - steps // 10, 9):
        batches[i]["x"] = batches[i]["x"] * np.float32(400.0)  # a loud (unnormalised) batch
    naive_model, fixed_model = models.EnergyNet(jnp.float16), models.EnergyNet(jnp.float32)
    params = _init(fixed_model, batches[0], "x")
    tx = optax.adam(3e-3)
    return (
        batches,
        Recipe(_mse(naive_model), tx, params),
        Recipe(_mse(fixed_model), tx, params),
    )


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in [
        Scenario(
            "explosion",
            "Gradient explosion",
            "a deep ReLU MLP trained with SGD+momentum at a learning rate it cannot survive",
            "the same SGD wrapped as guard(chain(clip_by_global_norm(1.0), sgd))",
            "guard + clip",
            "grad_explosion",
            _explosion,
            in_code=False,
        ),
        Scenario(
            "zero_norm",
            "x / ||x|| on a zero vector",
            "bag-of-words counts normalised with x / ||x||; an empty document is 0/0",
            "stablejax.nn.L2Normalize (safe_normalize)",
            "nn.L2Normalize",
            "forward_singularity",
            _zero_norm,
        ),
        Scenario(
            "silent_std",
            "std-pooling on a silent utterance",
            "x-vector mean+std pooling with jnp.std; a silent utterance has std 0: "
            "finite loss, NaN gradient",
            "stablejax.nn.StdPool",
            "nn.StdPool",
            "derivative_singularity",
            _silent_std,
        ),
        Scenario(
            "sqrt_loss",
            "sqrt((pred - y)**2) at a perfect prediction",
            "MAE written as sqrt((pred - y)**2); the output, clamped at 0, "
            "predicts a dry day exactly",
            "stablejax.losses.mae",
            "losses.mae",
            "loss_nan",
            _sqrt_loss,
        ),
        Scenario(
            "nan_batch",
            "NaN in a batch's inputs",
            "one batch carries NaN in two examples (a corrupted sensor reading)",
            "stablejax.optim.guard skips the step; locate names the input and rows",
            "guard skips it",
            "bad_input",
            _nan_batch,
            in_code=False,
        ),
        Scenario(
            "fp16_overflow",
            "float16 overflow",
            "a float16 projection's energy h*h overflows 65504 on a loud batch; "
            "float32 holds it",
            "keep that layer in float32 (dtype=jnp.float32)",
            "layer in float32",
            "overflow_low_precision",
            _fp16_overflow,
        ),
    ]
}
