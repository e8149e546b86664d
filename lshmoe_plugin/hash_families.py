"""The LSH families as one table: how a family's directions are drawn and how a projected token becomes a digit.

Every family projects a token onto ``width`` directions per hash and takes one argmax per hash:
- cross-polytope: ``hash_dim`` orthonormal directions (a random rotation restricted to hash_dim coordinates); the
  digit is the nearest signed basis vector, ``2 * argmax |x| + (x < 0)``, one of ``2 * hash_dim``.
- spherical: ``2 * hash_dim`` random points on the unit sphere; the digit is the nearest one, ``argmax x``.
The config (names, bucket-key width), the reference hashing and the fused kernels all read this table.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict


@dataclass(frozen=True)
class HashFamily:
    name: str
    directions_per_dim: int   # projection columns per hash, per unit of hash_dim
    orthonormal: bool         # directions orthonormalised (a rotation's columns), else each normalised alone
    signed_digit: bool        # digit from argmax |x| and its sign, else from argmax x

    def width(self, hash_dim: int) -> int:
        """Projection columns of one hash."""
        return self.directions_per_dim * hash_dim

    def codes(self, hash_dim: int) -> int:
        """Distinct digits of one hash."""
        return self.width(hash_dim) * (2 if self.signed_digit else 1)

    def code_bits(self, hash_dim: int) -> int:
        """Bits one digit takes in the packed bucket code."""
        return (self.codes(hash_dim) - 1).bit_length()


HASH_FAMILIES: Dict[str, HashFamily] = {
    "cross_polytope": HashFamily("cross_polytope", directions_per_dim=1, orthonormal=True, signed_digit=True),
    "spherical": HashFamily("spherical", directions_per_dim=2, orthonormal=False, signed_digit=False),
}
