"""Reference calculators: the presets almd knows and how a spec becomes an ASE calculator.

A spec is a preset name (``PRESETS``), ``"module:Class"``, a dict
``{"calculator": ..., **kwargs}`` or a class. :func:`resolve_spec` fills in the
defaults (the pair it returns is what the label database's settings hash covers);
:func:`build_calculator` makes the calculator. Mistakes a user can fix raise
:class:`OracleConfigError` with what to do. No torch here: the oracle's workers
import this where the ML stack is not installed.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import inspect
import re
import shutil
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from ase import Atoms

__all__ = ["PRESETS", "PSEUDO_DIR", "OracleConfigError", "available_pseudopotentials", "check_pw_x",
           "build_calculator", "resolve_spec"]

PSEUDO_DIR = "/usr/share/espresso/pseudo"


class OracleConfigError(ValueError):
    """A configuration mistake the user can fix; the message says how."""


# --------------------------------------------------------------------------- presets

def _stillinger_weber_si() -> Any:
    from matscipy.calculators.manybody import Manybody
    from matscipy.calculators.manybody.explicit_forms import stillinger_weber as sw

    return Manybody(**sw.StillingerWeber(sw.Stillinger_Weber_PRB_31_5262_Si))


def _emt(**kwargs: Any) -> Any:
    from ase.calculators.emt import EMT

    return EMT(**kwargs)


def _gpaw_pw(ecut: float = 300.0, kpt_density: float = 3.0, xc: str = "PBE",
             kpts: Any = None, txt: str | None = None, **kwargs: Any) -> Any:
    """GPAW plane waves. ``kpt_density`` is k-points per Å⁻¹ (ASE convention,
    2π included), so one setting suits any cell; ``kpts`` overrides it.
    """
    from gpaw import GPAW

    kpts = kpts if kpts is not None else {"density": kpt_density, "gamma": False}
    return GPAW(mode={"name": "pw", "ecut": ecut}, xc=xc, kpts=kpts, txt=txt, **kwargs)


def _espresso_pw(ecutwfc: float = 25.0, dual: float | None = None, kpt_density: float = 2.5,
                 kpts: Any = None, xc: str = "pbe", command: str = "pw.x",
                 pseudo_dir: str = PSEUDO_DIR, pseudopotentials: Mapping[str, str] | None = None,
                 input_data: Mapping[str, Any] | None = None, atoms: Atoms | None = None,
                 **kwargs: Any) -> Any:
    """Quantum ESPRESSO pw.x through ASE. Cutoffs in Ry (QE's unit); ``dual`` =
    ecutrho/ecutwfc, default 4 for norm-conserving and 8 when any chosen
    pseudopotential is ultrasoft/PAW. ``atoms`` (not a setting) restricts the
    pseudopotentials to its elements and checks them.
    """
    from ase.calculators.espresso import Espresso, EspressoProfile

    check_pw_x(command)
    pseudos = dict(pseudopotentials or available_pseudopotentials(pseudo_dir, xc))
    kinds = {el: _upf_kind(Path(pseudo_dir) / f) for el, f in pseudos.items()}
    if atoms is not None:
        missing = sorted(set(atoms.get_chemical_symbols()) - set(pseudos))
        if missing:
            raise OracleConfigError(
                f"no pseudopotential for element(s) {missing} in {pseudo_dir}; put a UPF file "
                f"named like '{missing[0]}.pbe-....UPF' there or pass pseudopotentials={{...}}")
        pseudos = {el: pseudos[el] for el in set(atoms.get_chemical_symbols())}
    if dual is None:
        dual = 4.0 if all(kinds.get(el) == "NC" for el in pseudos) else 8.0
    data: dict[str, Any] = {"control": {"tstress": True, "tprnfor": True, "disk_io": "none"},
                            "system": {"ecutwfc": ecutwfc, "ecutrho": dual * ecutwfc},
                            "electrons": {"conv_thr": 1e-8}}
    for section, values in (input_data or {}).items():
        data.setdefault(section, {}).update(values)
    # ASE's kspacing excludes 2π: this reproduces kpts={'density': d} of the GPAW preset
    # (ase 3.29's espresso writer cannot take the density dict itself).
    kwargs.update({"kpts": kpts} if kpts is not None else {"kspacing": 1 / (2 * np.pi * kpt_density)})
    profile = EspressoProfile(command=command, pseudo_dir=str(pseudo_dir))
    return Espresso(profile=profile, pseudopotentials=pseudos, input_data=data, **kwargs)


# name -> (factory, one-line description)
PRESETS: dict[str, tuple[Callable[..., Any], str]] = {
    "stillinger-weber-si": (_stillinger_weber_si, "matscipy Stillinger-Weber silicon (PRB 31, 5262)"),
    "emt": (_emt, "ASE effective-medium theory (Al, Cu, Ag, Au, Ni, Pd, Pt; toy)"),
    "gpaw-pw": (_gpaw_pw, "GPAW plane waves, PBE (ecut eV, kpt_density per Å⁻¹)"),
    "espresso-pw": (_espresso_pw, "Quantum ESPRESSO pw.x, PBE pseudopotentials from " + PSEUDO_DIR),
}


def check_pw_x(command: str) -> None:
    """Raise OracleConfigError, saying how to install it, if pw.x (or its launcher) is not on PATH."""
    words = command.split() or [command]  # "mpirun -np 4 pw.x": check both programs
    for exe in {words[0], *(w for w in words if w.endswith("pw.x"))}:
        if shutil.which(exe) is not None:
            continue
        raise OracleConfigError(
            f"Quantum ESPRESSO executable {exe!r} not found on PATH. Install it with "
            "'apt-get install quantum-espresso' (or conda install -c conda-forge qe), "
            "or pass command='/path/to/pw.x'.")


@functools.lru_cache(maxsize=None)
def _upf_kind(path: Path) -> str:
    """'NC', 'US' or 'PAW' from the UPF header (filename as a fallback)."""
    try:  # the type is stated in PP_INFO / PP_HEADER near the top; files can be MBs
        with open(path, "rb") as f:
            head = f.read(65536).decode(errors="ignore")
    except OSError:
        head = ""
    m = re.search(r'pseudo_type\s*=\s*"\s*(\w+)|Pseudopotential type:\s*(\w+)', head)
    kind = (m.group(1) or m.group(2)).upper() if m else path.name.upper()
    return "PAW" if "PAW" in kind else "US" if ("US" in kind or "VAN" in kind) else "NC"


def available_pseudopotentials(pseudo_dir: str | Path = PSEUDO_DIR, xc: str = "pbe") -> dict[str, str]:
    """Element -> UPF file in ``pseudo_dir``, one per element.

    Preference: the requested functional (by QE's naming, ``Si.pbe-...``), not
    fully relativistic, norm-conserving before ultrasoft before PAW (cheapest
    cutoffs), then the shortest name — deterministic for a given directory.
    """
    folder = Path(pseudo_dir)
    if not folder.is_dir():
        raise OracleConfigError(f"pseudopotential directory {folder} does not exist "
                                "(apt-get install quantum-espresso installs one)")
    candidates: dict[str, list[tuple[tuple, str]]] = {}
    for f in sorted(folder.iterdir()):
        m = re.match(r"([A-Z][a-z]?)[._-]", f.name)
        if not m or f.suffix.lower() != ".upf":
            continue
        low = f.name.lower()
        functional_ok = re.search(rf"[._-]{xc.lower()}(?!sol)[._-]", low) is not None
        rank = (not functional_ok, "rel" in low, {"NC": 0, "US": 1, "PAW": 2}[_upf_kind(f)],
                len(f.name), f.name)
        candidates.setdefault(m.group(1), []).append((rank, f.name))
    return {el: min(c)[1] for el, c in sorted(candidates.items())}


# --------------------------------------------------------------------------- building

def resolve_spec(spec: Any, **overrides: Any) -> tuple[str, dict[str, Any]]:
    """(calculator name, keyword arguments) of a spec, defaults filled in.

    This pair is what the settings hash covers, so a changed default changes the hash.
    """
    if isinstance(spec, Mapping):
        spec = dict(spec)
        if "calculator" not in spec:
            raise OracleConfigError(f"calculator spec {spec} needs a 'calculator' key "
                                    f"(a preset {sorted(PRESETS)} or 'module:Class')")
        name = spec.pop("calculator")
        return resolve_spec(name, **{**spec, **overrides})
    if isinstance(spec, type):
        return f"{spec.__module__}:{spec.__qualname__}", dict(overrides)
    if not isinstance(spec, str):
        raise OracleConfigError(f"calculator spec must be a preset name, 'module:Class', a dict "
                                f"or a class, got {spec!r}")
    if spec.strip().lower() in PRESETS:
        spec = spec.strip().lower()
        factory = PRESETS[spec][0]
        params = inspect.signature(factory).parameters
        has_var_kw = any(p.kind is p.VAR_KEYWORD for p in params.values())
        unknown = [k for k in overrides if k not in params and k != "atoms"]
        if unknown and not has_var_kw:
            raise OracleConfigError(f"preset {spec!r} takes no option(s) {unknown}; "
                                    f"allowed: {[p for p in params if p != 'atoms']}")
        defaults = {k: p.default for k, p in params.items()
                    if p.default is not inspect.Parameter.empty and k != "atoms"}
        return spec, {**defaults, **overrides}
    if ":" not in spec:
        raise OracleConfigError(
            f"unknown oracle preset {spec!r}. Presets: "
            + "; ".join(f"{k} ({v[1]})" for k, v in PRESETS.items())
            + ". Or give an import path 'module:Class', e.g. 'gpaw:GPAW'.")
    module, _, attr = spec.partition(":")
    try:
        found = module in sys.modules or importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise OracleConfigError(f"cannot import module {module!r} of calculator {spec!r}: "
                                f"is the package installed (pip install {module.split('.')[0]})?")
    return spec, dict(overrides)


def build_calculator(spec: Any, **overrides: Any) -> Any:
    """An ASE calculator from a preset name, ``"module:Class"``, a dict spec
    ``{"calculator": ..., **kwargs}`` or a class; ``overrides`` are keyword arguments.

    ``atoms=`` is for presets with element-dependent settings (QE
    pseudopotentials): they are checked against it. Other calculators ignore it.
    """
    atoms = overrides.pop("atoms", None)
    name, kwargs = resolve_spec(spec, **overrides)
    if name in PRESETS:
        factory = PRESETS[name][0]
        if "atoms" in inspect.signature(factory).parameters:
            kwargs["atoms"] = atoms
        return factory(**kwargs)
    if isinstance(spec, type):
        return spec(**kwargs)
    module, _, attr = name.partition(":")
    obj: Any = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj(**kwargs)
