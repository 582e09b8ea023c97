"""The `almd` command: a thin layer over the Python API.

Each subcommand lives in the module that owns its concern and exposes
``main(argv: list[str]) -> int``; this file only dispatches.
"""

from __future__ import annotations

import argparse
import importlib
import sys

import almd

__all__ = ["main", "SUBCOMMANDS"]

# subcommand -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "run": ("almd.campaign.cli", "run or resume an active-learning MD campaign (TOML; built-in Si campaign without one)"),
    "md": ("almd.campaign.production", "production MD with a trained model and its uncertainty, no learning"),
    "report": ("almd.campaign.report", "rebuild a campaign's summary.json from its run directory"),
    "demo": ("almd.phonons.demo", "silicon phonons: SevenNet-0 through almd.Calculator vs VASP PBE (no input files)"),
    "phonons": ("almd.phonons", "phonons, thermal properties and kappa for any calculator"),
    "finetune": ("almd.finetune", "phonon-supervised, parameter-efficient fine-tuning from a TOML config"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="almd",
        description="Active-learning molecular dynamics with fine-tuned ML potentials.",
    )
    parser.add_argument("--version", action="version", version=f"almd {almd.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in SUBCOMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    if not argv or argv[0] not in SUBCOMMANDS:
        parser.parse_args(argv)  # prints help/version or a clear error
        parser.print_help()
        return 1
    module = importlib.import_module(SUBCOMMANDS[argv[0]][0])
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
