"""Phonons for any ASE calculator: force constants, properties, references, κ.

Atoms and calculators in, numbers out.  Nothing here imports torch at module
level; an almd model is only loaded when its name is resolved.

    from almd.phonons import phonons, load_reference, phonons_vs_reference, kappa
    r = phonons(atoms, "stillinger-weber-si", supercell=2)
    model, dft, errors = phonons_vs_reference("../shared/data/dft/si-pbe", "sevennet-0")
    k = kappa("../shared/data/dft/si-pbe", "sevennet-0", mesh=(11, 11, 11))

The command line (`almd phonons ...`) is a thin layer in almd.phonons.cli.
"""

from __future__ import annotations

from almd.phonons._calculators import get_hessian, resolve_calculator, stillinger_weber_si
from almd.phonons.datasets import force_constants_from_hessian, hessian_from_force_constants
from almd.phonons.harmonic import (
    THZ_TO_K,
    PhononResult,
    analyse,
    build_phonopy,
    phonons,
    phonopy_from_calculator,
    phonopy_on_dataset,
    relax_structure,
)
from almd.phonons.kappa import KappaResult, kappa
from almd.phonons.reference import PhononReference, compare, load_reference, phonons_vs_reference


def main(argv: list[str]) -> int:
    """Entry point of `almd phonons` (dispatched from almd.cli)."""
    from almd.phonons.cli import main as _main

    return _main(argv)


__all__ = [
    "THZ_TO_K",
    "KappaResult",
    "PhononReference",
    "PhononResult",
    "analyse",
    "build_phonopy",
    "compare",
    "hessian_from_force_constants",
    "get_hessian",
    "force_constants_from_hessian",
    "kappa",
    "load_reference",
    "main",
    "phonons",
    "phonons_vs_reference",
    "phonopy_from_calculator",
    "phonopy_on_dataset",
    "relax_structure",
    "resolve_calculator",
    "stillinger_weber_si",
]
