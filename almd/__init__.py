"""almd: active-learning molecular dynamics with fine-tuned ML interatomic potentials."""

__version__ = "0.1.0"

__all__ = ["Calculator", "__version__"]


def __getattr__(name: str):
    # Lazy: `import almd` stays cheap (no torch) for the oracle, trigger and CLI help.
    if name == "Calculator":
        from almd.calculator import Calculator

        return Calculator
    raise AttributeError(f"module 'almd' has no attribute {name!r}")
