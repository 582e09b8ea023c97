"""Data shipped with almd: phono3py's Si-PBE example (VASP PBE; BSD-3, see si-pbe/LICENSE-phono3py).

The embedded default of `almd demo` and the tests use it, so neither needs network or user files.
"""

from pathlib import Path

__all__ = ["SI_PBE"]

SI_PBE = Path(__file__).parent / "si-pbe"
