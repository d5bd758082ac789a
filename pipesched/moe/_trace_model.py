"""Real routing traces: train the MoE transformer on the synthetic language, record its routers."""

from __future__ import annotations

import time
from typing import NamedTuple

import jax
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

from pipesched.moe._language import Language
from pipesched.moe._transformer import MoeTransformer, TransformerConfig, language_model_loss
from pipesched.placement import PlacementInstance


class TrainedModel(NamedTuple):
    model: MoeTransformer
    language: Language
    losses: list[float]  # cross-entropy per step
    steps: int
    seconds: float


@nnx.jit
def _train_step(model: MoeTransformer, optimizer: nnx.Optimizer, tokens: jax.Array) -> jax.Array:
    (_, cross_entropy), grads = nnx.value_and_grad(language_model_loss, has_aux=True)(model, tokens)
    optimizer.update(model, grads)
    return cross_entropy


def train_trace_model(config: TransformerConfig, language: Language, *, steps: int, batch: int = 32,
                      learning_rate: float = 3e-3, time_limit: float | None = None, seed: int = 0,
                      progress: bool = True) -> TrainedModel:
    """Adam on next-token prediction for `steps` steps (or until `time_limit` seconds), seeded."""
    if config.vocab_size != language.vocab_size:
        raise ValueError(f"config.vocab_size {config.vocab_size} != language.vocab_size {language.vocab_size}")
    model = MoeTransformer(config, nnx.Rngs(seed))
    optimizer = nnx.Optimizer(model, optax.adamw(learning_rate), wrt=nnx.Param)
    start, losses = time.perf_counter(), []
    bar = tqdm(range(steps), desc="train trace model", disable=not progress)
    for step in bar:
        tokens = language.sample(batch, config.max_length + 1, seed=(0, seed, step))
        losses.append(float(_train_step(model, optimizer, tokens)))
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
        if time_limit is not None and time.perf_counter() - start > time_limit:
            break
    return TrainedModel(model, language, losses, len(losses), time.perf_counter() - start)


def held_out_tokens(trained: TrainedModel, num_sequences: int, seed: int = 0) -> np.ndarray:
    """Sequences drawn from a seed stream, (1, seed), that training, (0, seed, step), never uses."""
    return trained.language.sample(num_sequences, trained.model.config.max_length, seed=(1, seed))


def routing_traces(model: MoeTransformer, tokens: np.ndarray, *, num_devices: int, slots_per_device: int,
                   batch_size: int = 1, name: str = "moe") -> list[PlacementInstance]:
    """One placement instance per MoE layer: its top-k choices for every token, sequence by sequence."""
    _, experts, _ = nnx.jit(lambda m, t: m(t))(model, tokens)
    experts = np.asarray(experts).reshape(experts.shape[0], -1, experts.shape[-1])
    return [PlacementInstance(model.config.num_experts, num_devices, slots_per_device, batch_size,
                              [tuple(int(e) for e in token) for token in layer], name=f"{name}_layer{i}")
            for i, layer in enumerate(experts)]
