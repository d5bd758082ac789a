"""Tiny flax NNX models whose activations are tagged with `checkpoint_name`, for remat experiments.

Every value the remat graph should see as a node is wrapped in `checkpoint_name(value, name)` with
a unique name; `pipesched.remat.remat_instance_from_jax` cuts the traced program at these names.
The models are deliberately small and self-contained (no dropout, no caches).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name


class MLP(nnx.Module):
    """`depth` dense layers with ReLU, named `layer{i}.linear` and `layer{i}.relu`."""

    def __init__(self, sizes: tuple[int, ...], *, rngs: nnx.Rngs):
        self.layers = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in zip(sizes[:-1], sizes[1:])])

    def __call__(self, x: jax.Array) -> jax.Array:
        for i, layer in enumerate(self.layers):
            x = checkpoint_name(layer(x), f"layer{i}.linear")
            if i < len(self.layers) - 1:
                x = checkpoint_name(jax.nn.relu(x), f"layer{i}.relu")
        return x


class GPTConfig(NamedTuple):
    vocab: int = 128
    seq_len: int = 64
    width: int = 64
    heads: int = 4
    depth: int = 2


class Block(nnx.Module):
    """Pre-LayerNorm transformer block with causal self-attention; every activation is named."""

    def __init__(self, config: GPTConfig, prefix: str, *, rngs: nnx.Rngs):
        d = config.width
        self.prefix, self.heads = prefix, config.heads
        self.ln1, self.ln2 = nnx.LayerNorm(d, rngs=rngs), nnx.LayerNorm(d, rngs=rngs)
        self.qkv = nnx.Linear(d, 3 * d, use_bias=False, rngs=rngs)
        self.out = nnx.Linear(d, d, use_bias=False, rngs=rngs)
        self.fc = nnx.Linear(d, 4 * d, rngs=rngs)
        self.proj = nnx.Linear(4 * d, d, rngs=rngs)

    def _name(self, x: jax.Array, what: str) -> jax.Array:
        return checkpoint_name(x, f"{self.prefix}.{what}")

    def __call__(self, x: jax.Array) -> jax.Array:
        batch, seq, width = x.shape
        head = width // self.heads
        qkv = self._name(self.qkv(self._name(self.ln1(x), "ln1")), "qkv")
        q, k, v = (t.reshape(batch, seq, self.heads, head) for t in jnp.split(qkv, 3, axis=-1))
        causal = jnp.tril(jnp.ones((seq, seq), bool))
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(head).astype(x.dtype)
        scores = self._name(jnp.where(causal, scores, jnp.finfo(x.dtype).min), "scores")
        probs = self._name(jax.nn.softmax(scores, axis=-1), "probs")
        attn = self._name(jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(batch, seq, width), "attn")
        x = self._name(x + self.out(attn), "res1")
        hidden = self._name(self.fc(self._name(self.ln2(x), "ln2")), "fc")
        hidden = self._name(jax.nn.gelu(hidden), "gelu")
        return self._name(x + self.proj(hidden), "res2")


class GPT(nnx.Module):
    """A small GPT: token + position embeddings, `depth` blocks, final LayerNorm, tied-free head."""

    def __init__(self, config: GPTConfig, *, rngs: nnx.Rngs):
        self.embed = nnx.Embed(config.vocab, config.width, rngs=rngs)
        self.position = nnx.Param(0.02 * jax.random.normal(rngs.params(), (config.seq_len, config.width)))
        self.blocks = nnx.List([Block(config, f"block{i}", rngs=rngs) for i in range(config.depth)])
        self.ln = nnx.LayerNorm(config.width, rngs=rngs)
        self.head = nnx.Linear(config.width, config.vocab, use_bias=False, rngs=rngs)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        x = checkpoint_name(self.embed(tokens) + self.position[...], "embed")
        for block in self.blocks:
            x = block(x)
        return checkpoint_name(self.head(checkpoint_name(self.ln(x), "ln_f")), "logits")


class LossProblem(NamedTuple):
    """A pure loss `loss_fn(params, *data)` and example arguments for it."""

    loss_fn: Callable[..., jax.Array]
    params: Any
    data: tuple[jax.Array, ...]

    @property
    def args(self) -> tuple[Any, ...]:
        return (self.params, *self.data)


def _pure(model: nnx.Module, loss: Callable[[nnx.Module, Any], jax.Array]
          ) -> tuple[Callable[..., jax.Array], Any]:
    graphdef, params = nnx.split(model, nnx.Param)

    def loss_fn(params: Any, *data: jax.Array) -> jax.Array:
        return loss(nnx.merge(graphdef, params), *data)

    return loss_fn, params


def mlp_problem(sizes: tuple[int, ...] = (32, 64, 64, 64, 8), batch: int = 16, seed: int = 0) -> LossProblem:
    """Mean squared error of an MLP on random data."""
    model = MLP(sizes, rngs=nnx.Rngs(seed))
    kx, ky = jax.random.split(jax.random.key(seed + 1))
    x = jax.random.normal(kx, (batch, sizes[0]))
    y = jax.random.normal(ky, (batch, sizes[-1]))
    loss_fn, params = _pure(model, lambda m, x, y: jnp.mean((m(x) - y) ** 2))
    return LossProblem(loss_fn, params, (x, y))


def gpt_problem(config: GPTConfig = GPTConfig(), batch: int = 4, seed: int = 0) -> LossProblem:
    """Next-token cross-entropy of a small GPT on random tokens."""
    model = GPT(config, rngs=nnx.Rngs(seed))
    tokens = jax.random.randint(jax.random.key(seed + 1), (batch, config.seq_len + 1), 0, config.vocab)

    def loss(m: GPT, inputs: jax.Array, targets: jax.Array) -> jax.Array:
        logp = jax.nn.log_softmax(m(inputs), axis=-1)
        return -jnp.mean(jnp.take_along_axis(logp, targets[..., None], axis=-1))

    loss_fn, params = _pure(model, loss)
    return LossProblem(loss_fn, params, (tokens[:, :-1], tokens[:, 1:]))
