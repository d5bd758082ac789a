"""Models the executor runs, built stage by stage with flax NNX: a GPT-style transformer and an MLP.

A model is a chain of S stage modules with one signature, `stage(h, x, y) -> out`: the first stage
reads the microbatch input `x` (tokens or features) and ignores `h`; the others read the hidden state
`h` of the stage before; the last one returns the microbatch loss against `y`, the others the next
hidden state. A stage is itself a chain of pieces of that signature (embedding, attention,
feed-forward, head; or MLP layers), the unit a remat option keeps or recomputes. Every parameter
is used by an `Affine` op (output linear in its parameters), which records its input and adds a
zero `Tap` to its output: the gradient of a tap is the op's output gradient, so the weight gradient
can be computed apart from the input gradient (split backward).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

MODELS = ("gpt-tiny", "mlp")
REMAT_OPTIONS = {"gpt-tiny": ("input", "attention"), "mlp": ("input",)}
"""Per model, its remat options (formats.md 1.4) in option order: "input" (option 0) keeps the stage
input and recomputes every piece; another name is a piece role: the pieces of that role keep their
VJP residuals and op inputs, the others are recomputed from the outputs of the kept ones."""


def _array(values: np.ndarray) -> jax.Array:
    """A device array made on the host (no per-op compilation), float64 stored as float32."""
    return jnp.asarray(values.astype(np.float32) if values.dtype == np.float64 else values)


class Tap(nnx.Variable):
    """Zero added to an Affine op's output; its cotangent is the op's output gradient."""


class Input(nnx.Variable):
    """The last input of an Affine op: what its weight gradient needs."""


class Affine(nnx.Module):
    """Base of every parametric op: `op(x)` is linear in the module's parameters."""

    def __init__(self, in_shape: tuple[int, ...], out_shape: tuple[int, ...], in_dtype=np.float32):
        self.input = Input(_array(np.zeros(in_shape, in_dtype)))
        self.tap = Tap(_array(np.zeros(out_shape, np.float32)))

    def __call__(self, x: jax.Array) -> jax.Array:
        self.input.set_value(x)
        return self.op(x) + self.tap[...]


class Linear(Affine):
    def __init__(self, lead: tuple[int, ...], din: int, dout: int, rng: np.random.Generator, gain: float = 1.0):
        super().__init__((*lead, din), (*lead, dout))
        self.kernel = nnx.Param(_array(rng.standard_normal((din, dout)) * gain / np.sqrt(din)))
        self.bias = nnx.Param(_array(np.zeros(dout)))

    def op(self, x: jax.Array) -> jax.Array:
        return x @ self.kernel[...] + self.bias[...]


class Embed(Affine):
    def __init__(self, lead: tuple[int, ...], vocab: int, width: int, rng: np.random.Generator):
        super().__init__(lead, (*lead, width), np.int32)
        self.table = nnx.Param(_array(rng.standard_normal((vocab, width)) * 0.5))

    def op(self, tokens: jax.Array) -> jax.Array:
        return jnp.take(self.table[...], tokens, axis=0)


class Scale(Affine):
    """The affine part of a layer norm: x * scale + bias."""

    def __init__(self, shape: tuple[int, ...]):
        super().__init__(shape, shape)
        self.scale = nnx.Param(_array(np.ones(shape[-1:])))
        self.bias = nnx.Param(_array(np.zeros(shape[-1:])))

    def op(self, x: jax.Array) -> jax.Array:
        return x * self.scale[...] + self.bias[...]


class LayerNorm(nnx.Module):
    def __init__(self, shape: tuple[int, ...]):
        self.affine = Scale(shape)

    def __call__(self, x: jax.Array) -> jax.Array:
        mean = x.mean(-1, keepdims=True)
        var = ((x - mean) ** 2).mean(-1, keepdims=True)
        return self.affine((x - mean) * jax.lax.rsqrt(var + 1e-5))


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Sizes of a model; `microbatch` samples per microbatch, `layers` blocks per stage."""

    name: str = "gpt-tiny"
    microbatch: int = 2
    seq_len: int = 8
    vocab: int = 32
    width: int = 16
    heads: int = 2
    layers: int = 1

    def __post_init__(self) -> None:
        if self.name not in MODELS:
            raise ValueError(f"unknown model {self.name!r}: choose one of {', '.join(MODELS)}")


class Embedding(nnx.Module):
    """The first piece of the first stage: token embedding (ignores `h`)."""

    role = "embed"

    def __init__(self, cfg: ModelConfig, rng: np.random.Generator):
        self.embed = Embed((cfg.microbatch, cfg.seq_len), cfg.vocab, cfg.width, rng)

    def __call__(self, h: jax.Array, tokens: jax.Array, targets: jax.Array) -> jax.Array:
        return self.embed(tokens)


class Attention(nnx.Module):
    """Pre-norm causal self-attention, residual: the first half of a transformer block."""

    role = "attention"

    def __init__(self, cfg: ModelConfig, rng: np.random.Generator):
        lead, d = (cfg.microbatch, cfg.seq_len), cfg.width
        self.heads = cfg.heads
        self.norm = LayerNorm((*lead, d))
        self.qkv = Linear(lead, d, 3 * d, rng)
        self.proj = Linear(lead, d, d, rng)

    def __call__(self, h: jax.Array, tokens: jax.Array, targets: jax.Array) -> jax.Array:
        b, t, d = h.shape
        q, k, v = jnp.split(self.qkv(self.norm(h)), 3, axis=-1)
        q, k, v = (z.reshape(b, t, self.heads, d // self.heads) for z in (q, k, v))
        logits = jnp.einsum("bqhc,bkhc->bhqk", q, k) / np.sqrt(d // self.heads)
        logits = jnp.where(jnp.tril(jnp.ones((t, t), bool)), logits, -1e9)
        att = jnp.einsum("bhqk,bkhc->bqhc", jax.nn.softmax(logits, axis=-1), v).reshape(b, t, d)
        return h + self.proj(att)


class FeedForward(nnx.Module):
    """Pre-norm GELU MLP, residual: the second half of a transformer block."""

    role = "ffn"

    def __init__(self, cfg: ModelConfig, rng: np.random.Generator):
        lead, d = (cfg.microbatch, cfg.seq_len), cfg.width
        self.norm = LayerNorm((*lead, d))
        self.up = Linear(lead, d, 4 * d, rng)
        self.down = Linear(lead, 4 * d, d, rng)

    def __call__(self, h: jax.Array, tokens: jax.Array, targets: jax.Array) -> jax.Array:
        return h + self.down(jax.nn.gelu(self.up(self.norm(h))))


class LMHead(nnx.Module):
    """The last piece of the last stage: final norm, LM head and the mean cross-entropy."""

    role = "head"

    def __init__(self, cfg: ModelConfig, rng: np.random.Generator):
        lead = (cfg.microbatch, cfg.seq_len)
        self.norm = LayerNorm((*lead, cfg.width))
        self.head = Linear(lead, cfg.width, cfg.vocab, rng)

    def __call__(self, h: jax.Array, tokens: jax.Array, targets: jax.Array) -> jax.Array:
        logp = jax.nn.log_softmax(self.head(self.norm(h)), axis=-1)
        return -jnp.take_along_axis(logp, targets[..., None], axis=-1).mean()


class Chain(nnx.Module):
    """A stage: its `pieces` run one after another on (h, x, y). A piece is the unit of
    rematerialization: a remat option keeps or recomputes whole pieces (`REMAT_OPTIONS`)."""

    def __call__(self, h: jax.Array, x: jax.Array, y: jax.Array) -> jax.Array:
        for piece in self.pieces:
            h = piece(h, x, y)
        return h


class GPTStage(Chain):
    """A slice of the transformer: [embedding] + `layers` blocks (attention, feed-forward) + [head]."""

    def __init__(self, cfg: ModelConfig, first: bool, last: bool, rng: np.random.Generator):
        pieces = [Embedding(cfg, rng)] if first else []
        for _ in range(cfg.layers):
            pieces += [Attention(cfg, rng), FeedForward(cfg, rng)]
        self.pieces = nnx.List(pieces + ([LMHead(cfg, rng)] if last else []))


class Layer(nnx.Module):
    """A residual GELU layer of the MLP regressor; the first one of the model reads `x`."""

    role = "layer"

    def __init__(self, cfg: ModelConfig, first: bool, rng: np.random.Generator):
        self.linear = Linear((cfg.microbatch,), cfg.width, cfg.width, rng, gain=0.5)
        self.first = first

    def __call__(self, h: jax.Array, x: jax.Array, y: jax.Array) -> jax.Array:
        h = x if self.first else h
        return h + jax.nn.gelu(self.linear(h))


class MSEHead(nnx.Module):
    """The last piece of the MLP regressor: a linear head and the mean squared error."""

    role = "head"

    def __init__(self, cfg: ModelConfig, rng: np.random.Generator):
        self.head = Linear((cfg.microbatch,), cfg.width, cfg.width, rng)

    def __call__(self, h: jax.Array, x: jax.Array, y: jax.Array) -> jax.Array:
        return ((self.head(h) - y) ** 2).mean()


class MLPStage(Chain):
    """A slice of a residual MLP regressor: `layers` GELU layers, the last stage adds an MSE loss."""

    def __init__(self, cfg: ModelConfig, first: bool, last: bool, rng: np.random.Generator):
        pieces = [Layer(cfg, first and i == 0, rng) for i in range(cfg.layers)]
        self.pieces = nnx.List(pieces + ([MSEHead(cfg, rng)] if last else []))


class StagedModel(NamedTuple):
    """A model cut into stages: per stage its graph, parameters, taps and input placeholders."""

    config: ModelConfig
    graphs: tuple[nnx.GraphDef, ...]
    params: tuple[nnx.State, ...]
    taps: tuple[nnx.State, ...]  # zeros
    inputs: tuple[nnx.State, ...]  # placeholders, overwritten by each call

    @property
    def num_stages(self) -> int:
        return len(self.graphs)

    def kind(self, stage: int) -> tuple[bool, bool]:
        """(is first, is last): stages of one kind share their structure."""
        return stage == 0, stage == self.num_stages - 1

    @property
    def hidden_shape(self) -> tuple[int, ...]:
        cfg = self.config
        return (cfg.microbatch, cfg.seq_len, cfg.width) if cfg.name == "gpt-tiny" else (cfg.microbatch, cfg.width)


def make_model(config: ModelConfig, num_stages: int, seed: int = 0) -> StagedModel:
    """Build `num_stages` stages with independent random parameters."""
    if num_stages < 1:
        raise ValueError(f"num_stages must be >= 1, got {num_stages}")
    rng = np.random.default_rng(seed)
    cls = GPTStage if config.name == "gpt-tiny" else MLPStage
    parts = [nnx.split(cls(config, s == 0, s == num_stages - 1, rng), nnx.Param, Tap, Input)
             for s in range(num_stages)]
    return StagedModel(config, *(tuple(column) for column in zip(*parts)))


class Batch(NamedTuple):
    """M microbatches: `inputs[m]` and `targets[m]`."""

    inputs: jax.Array
    targets: jax.Array


def make_batch(config: ModelConfig, num_microbatches: int, seed: int = 0) -> Batch:
    """Random data with learnable structure (next token = f(token); targets = a smooth map of x)."""
    rng = np.random.default_rng(seed)
    if config.name == "gpt-tiny":
        tokens = rng.integers(0, config.vocab, (num_microbatches, config.microbatch, config.seq_len), np.int32)
        return Batch(_array(tokens), _array((tokens * 7 + 3) % config.vocab))
    x = rng.standard_normal((num_microbatches, config.microbatch, config.width))
    return Batch(_array(x), _array(np.sin(x @ rng.standard_normal((config.width, config.width)) / 2)))


def stage_apply(model: StagedModel, stage: int, params: nnx.State, h: jax.Array, x: jax.Array,
                y: jax.Array) -> jax.Array:
    """Run one stage on one microbatch (pure function of its arguments)."""
    return nnx.merge(model.graphs[stage], params, model.taps[stage], model.inputs[stage], copy=True)(h, x, y)


def reference_loss(model: StagedModel, params: tuple[nnx.State, ...], batch: Batch) -> jax.Array:
    """Unpipelined loss: the mean over microbatches of the whole chain of stages. A microbatch of
    D times the model's microbatch size (data parallelism) counts as D microbatches."""
    def one(x, y):
        h = jnp.zeros(model.hidden_shape)
        for s in range(model.num_stages):
            h = stage_apply(model, s, params[s], h, x, y)
        return h
    size = model.config.microbatch
    def pieces(a):
        return a.reshape(-1, size, *a.shape[2:])
    return jax.lax.map(lambda xy: one(*xy), (pieces(batch.inputs), pieces(batch.targets))).mean()


def reference_grads(model: StagedModel, params: tuple[nnx.State, ...], batch: Batch
                    ) -> tuple[jax.Array, tuple[nnx.State, ...]]:
    """Loss and per-stage parameter gradients on one device, without pipelining."""
    return jax.jit(jax.value_and_grad(lambda p: reference_loss(model, p, batch)))(params)
