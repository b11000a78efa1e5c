"""Draws from the operating system's CSPRNG (``os.urandom``) for what a DP guarantee needs kept secret: who is sampled, and the noise."""

from __future__ import annotations

import os

import numpy as np

_BITS = 53
"""A float64 carries 53 bits of mantissa: uniforms are multiples of 2**-53, as numpy's own are."""


class SecretRandom:
    """``random`` and ``normal`` with numpy's signatures, from ``os.urandom`` (the kernel's ChaCha20 CSPRNG).

    numpy's generators (PCG64 and the others) are fast but predictable from their state, and a seed
    in a config is public: amplification by sampling and the Gaussian noise both assume the
    adversary cannot recompute the draws. Gaussians come from Box–Muller on 53-bit uniforms.
    """

    def random(self, size: int) -> np.ndarray:
        """``size`` uniforms in [0, 1)."""
        words = np.frombuffer(os.urandom(8 * size), dtype=np.uint64)
        return (words >> np.uint64(64 - _BITS)).astype(np.float64) * 2.0**-_BITS

    def normal(self, loc: float, scale: float, size: int) -> np.ndarray:
        """``size`` draws of N(loc, scale²)."""
        pairs = (size + 1) // 2
        radius = np.sqrt(-2.0 * np.log1p(-self.random(pairs)))  # 1 - u is in (0, 1]: the log is finite
        angle = 2.0 * np.pi * self.random(pairs)
        standard = np.concatenate([radius * np.cos(angle), radius * np.sin(angle)])[:size]
        return loc + scale * standard
