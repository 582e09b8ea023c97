"""Reference calculations and their store; no torch.

``oracle`` runs a reference calculator on Atoms in isolated processes (timeout,
retries, failure records); ``database`` is the campaign's ASE SQLite store and
the only writer of labels.
"""

__all__: list[str] = []
