"""A seeded synthetic language to train the trace model on: three sub-languages, no downloads.

Each sequence is one of: a random sparse Markov chain over "words" with Zipf-skewed transitions,
modular additions ``a + b = c`` (mod P) written with digit tokens, or a copy task (symbols,
separator, the same symbols). Different token kinds and tasks give routers something to specialise
on, so the recorded routing is skewed and correlated like a real model's.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class Language:
    """Token ids: digits [0, P), then operators, then words, then copy symbols."""

    modulus: int = 13
    num_words: int = 24
    num_symbols: int = 12
    branching: int = 3
    seed: int = 0

    @property
    def plus(self) -> int:
        return self.modulus

    @property
    def equals(self) -> int:
        return self.modulus + 1

    @property
    def separator(self) -> int:
        return self.modulus + 2

    @property
    def first_word(self) -> int:
        return self.modulus + 3

    @property
    def first_symbol(self) -> int:
        return self.first_word + self.num_words

    @property
    def vocab_size(self) -> int:
        return self.first_symbol + self.num_symbols

    def transitions(self) -> tuple[np.ndarray, np.ndarray]:
        """The Markov chain (fixed by `seed`): each word's `branching` successors and their Zipf weights."""
        rng = np.random.default_rng(self.seed)
        successors = np.stack([rng.choice(self.num_words, self.branching, replace=False)
                               for _ in range(self.num_words)])
        weights = 1.0 / np.arange(1, self.branching + 1)
        return successors, weights / weights.sum()

    def sample(self, num_sequences: int, length: int, seed: int | tuple[int, ...]) -> np.ndarray:
        """(num_sequences, length) int32 token ids; `seed` (any numpy seed) picks the sequences,
        not the language."""
        rng = np.random.default_rng(seed)
        successors, weights = self.transitions()
        samplers = (self._markov, self._arithmetic, self._copy)
        return np.stack([samplers[rng.integers(3)](rng, length, successors, weights)
                         for _ in range(num_sequences)]).astype(np.int32)

    def _markov(self, rng, length, successors, weights):
        word = rng.integers(self.num_words)
        tokens = []
        for _ in range(length):
            tokens.append(self.first_word + word)
            word = successors[word, rng.choice(self.branching, p=weights)]
        return tokens

    def _arithmetic(self, rng, length, *_):
        tokens: list[int] = []
        while len(tokens) < length:
            a, b = rng.integers(self.modulus, size=2)
            tokens += [a, self.plus, b, self.equals, (a + b) % self.modulus, self.separator]
        return tokens[:length]

    def _copy(self, rng, length, *_):
        span = max(1, (length - 1) // 2)
        symbols = list(self.first_symbol + rng.integers(self.num_symbols, size=span))
        tokens = symbols + [self.separator] + symbols
        return (tokens + [self.separator] * length)[:length]
