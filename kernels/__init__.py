"""Pallas kernels, each with a pure-JAX reference."""

from pipesched.kernels._grouped_matmul import (
                                                 Tiling,
                                                 compiled_backend,
                                                 grouped_matmul,
                                                 grouped_matmul_reference,
                                                 transposed_grouped_matmul,
)

__all__ = ["Tiling", "compiled_backend", "grouped_matmul", "grouped_matmul_reference", "transposed_grouped_matmul"]
