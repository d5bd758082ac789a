"""A small flax NNX MoE transformer (top-k of E experts, load-balancing loss) for routing traces."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from pipesched.moe._routing import MoeParams, dense_moe, route


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    vocab_size: int
    max_length: int = 32
    model_dim: int = 64
    hidden_dim: int = 96
    num_heads: int = 4
    num_layers: int = 2
    num_experts: int = 8
    top_k: int = 2
    balance_weight: float = 0.01


class MoeBlock(nnx.Module):
    """Router and experts of one layer; the math is `pipesched.moe.dense_moe`."""

    def __init__(self, config: TransformerConfig, rngs: nnx.Rngs):
        d, h, E = config.model_dim, config.hidden_dim, config.num_experts
        init = nnx.initializers.lecun_normal(in_axis=-2, out_axis=-1, batch_axis=(0,))
        self.router = nnx.Param(nnx.initializers.lecun_normal()(rngs.params(), (d, E)))
        self.up = nnx.Param(init(rngs.params(), (E, d, h)))
        self.down = nnx.Param(init(rngs.params(), (E, h, d)))
        self.top_k = config.top_k

    def params(self) -> MoeParams:
        """The layer as plain arrays, e.g. to run it with `expert_parallel_moe`."""
        return MoeParams(self.router[...], self.up[...], self.down[...])

    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """x (T, d) -> output (T, d), chosen experts (T, k), Switch load-balancing loss.

        The loss is E * sum_e f_e * p_e, with f_e the share of routed (token, expert) pairs that
        go to e and p_e the mean router probability of e; it is 1 when routing is uniform.
        """
        params = self.params()
        routing = route(params.router, x, self.top_k)
        probs = jax.nn.softmax(x @ params.router, axis=-1)
        share = jax.nn.one_hot(routing.experts, params.num_experts).mean(axis=(0, 1))
        balance = params.num_experts * jnp.sum(share * probs.mean(axis=0))
        return dense_moe(params, x, routing), routing.experts, balance


class Block(nnx.Module):
    """Pre-norm causal self-attention, then the MoE feed-forward."""

    def __init__(self, config: TransformerConfig, rngs: nnx.Rngs):
        d = config.model_dim
        self.attention_norm = nnx.LayerNorm(d, rngs=rngs)
        self.attention = nnx.MultiHeadAttention(num_heads=config.num_heads, in_features=d, decode=False,
                                                rngs=rngs)
        self.moe_norm = nnx.LayerNorm(d, rngs=rngs)
        self.moe = MoeBlock(config, rngs)

    def __call__(self, x: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        x = x + self.attention(self.attention_norm(x), mask=mask)
        batch, length, d = x.shape
        y, experts, balance = self.moe(self.moe_norm(x).reshape(batch * length, d))
        return x + y.reshape(batch, length, d), experts.reshape(batch, length, -1), balance


class MoeTransformer(nnx.Module):
    """Decoder-only language model whose feed-forward layers are MoE layers."""

    def __init__(self, config: TransformerConfig, rngs: nnx.Rngs):
        self.config = config
        self.embed = nnx.Embed(config.vocab_size, config.model_dim, rngs=rngs)
        self.position = nnx.Embed(config.max_length, config.model_dim, rngs=rngs)
        self.blocks = nnx.List([Block(config, rngs) for _ in range(config.num_layers)])
        self.norm = nnx.LayerNorm(config.model_dim, rngs=rngs)

    def __call__(self, tokens: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """tokens (B, S) -> logits (B, S, V), experts (layers, B, S, k), mean balance loss."""
        x = self.embed(tokens) + self.position(jnp.arange(tokens.shape[1]))
        mask = nnx.make_causal_mask(tokens)
        experts, balance = [], []
        for block in self.blocks:
            x, layer_experts, layer_balance = block(x, mask)
            experts.append(layer_experts)
            balance.append(layer_balance)
        logits = self.embed.attend(self.norm(x))
        return logits, jnp.stack(experts), jnp.mean(jnp.stack(balance))


def language_model_loss(model: MoeTransformer, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Next-token cross-entropy plus the weighted balance loss; returns (total, cross-entropy)."""
    logits, _, balance = model(tokens[:, :-1])
    cross_entropy = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()
    return cross_entropy + model.config.balance_weight * balance, cross_entropy
