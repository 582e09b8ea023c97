"""OnTheFlyCalculator in a user's own ASE script: it learns, answers with the reference when it calls it,
resumes from its directory without losing or recomputing a label, and refuses bad settings by name.
"""

from __future__ import annotations

import numpy as np
import pytest
from ase import Atoms, units
from ase.build import bulk
from ase.calculators.calculator import Calculator, all_changes
from ase.calculators.singlepoint import SinglePointCalculator
from ase.md.langevin import Langevin

from almd.campaign.on_the_fly import OnTheFlyCalculator
from almd.phonons import stillinger_weber_si
from almd.settings import ConfigError
from almd.structures import structure_hash

#: 8-atom cells, two members; seed 1 draws two different bootstrap resamples of the 3 initial labels
SMALL = {"members": 2, "seed": 1, "initial_labels": 3, "initial_calibration": 1}
#: with target=1e-7 every scored step is over the absolute threshold: the trigger calls at every step
ALWAYS = {"abs_cap": 1e-6, "adaptive": False, "min_spacing": 1, "audit_every": 0}


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """8-atom cells gain nothing from a second thread, and on two shared cores that are busy a second
    OpenMP thread made each model evaluation ~100x slower (spin-waits); restored after this module.
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def si8(rattle: float = 0.0, seed: int = 0) -> Atoms:
    atoms = bulk("Si", "diamond", a=5.43, cubic=True)
    if rattle:
        atoms.rattle(rattle, seed=seed)
    return atoms


def sw_frames(n: int, seed: int) -> list[Atoms]:
    """Frames of a Stillinger–Weber Langevin run at 1000 K (labelled by SW), none of them seen by a model."""
    atoms = si8(0.05, seed)
    atoms.calc = stillinger_weber_si()
    dyn = Langevin(atoms, 2 * units.fs, temperature_K=1000, friction=0.02, rng=np.random.default_rng(seed))
    frames = []
    for _ in range(n):
        dyn.run(10)
        frame = si8()
        frame.positions = atoms.positions
        frame.calc = SinglePointCalculator(frame, energy=atoms.get_potential_energy(), forces=atoms.get_forces())
        frames.append(frame)
    return frames


def sw_forces(atoms: Atoms) -> np.ndarray:
    ref = atoms.copy()
    ref.calc = stillinger_weber_si()
    return ref.get_forces()


def sw_energy(atoms: Atoms) -> float:
    ref = atoms.copy()
    ref.calc = stillinger_weber_si()
    return ref.get_potential_energy()


def test_in_a_plain_langevin_loop_it_stores_labels_and_its_held_out_error_falls(tmp_path, sevennet32):
    held_out = sw_frames(5, seed=11)
    base = np.sqrt(np.mean([(sevennet32.get_forces(a.copy()) - a.get_forces()) ** 2 for a in held_out]))

    # the user's script: a tiny target makes the trigger's average criterion call once per window
    atoms = si8(0.05, seed=3)
    calc = OnTheFlyCalculator("stillinger-weber-si", tmp_path / "otf", target=1e-4,
                              trigger={"window": 10, "min_history": 3, "audit_every": 0}, **SMALL)
    atoms.calc = calc
    dyn = Langevin(atoms, 2 * units.fs, temperature_K=1000, friction=0.02, rng=np.random.default_rng(5))
    sources = []
    dyn.attach(lambda: sources.append(calc.results["source"]), interval=1)
    dyn.run(60)

    assert sources.count("reference") == calc.calls >= 4  # the first step, then the trigger's calls
    assert calc.labels == 4 + (calc.calls - 1) and calc.failures == 0  # initial four, one per later call
    rows = calc.database.rows(status="ok")
    assert {r.source for r in rows} >= {"initial", "average"}
    assert calc.refits == calc.calls  # refit_every=1: after every call
    assert not {structure_hash(a) for a in held_out} & {r.structure_hash for r in rows}  # never trained on
    after = calc.held_out_force_rmse(held_out)
    assert after < 0.5 * base, (after, base)
    calc.close()


class Breakable(Calculator):
    """Stillinger–Weber that can be made to fail, as a DFT code whose SCF does not converge."""

    implemented_properties = ["energy", "forces", "stress"]

    def __init__(self) -> None:
        super().__init__()
        self.broken = False

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes) -> None:
        super().calculate(atoms, properties, system_changes)
        if self.broken:
            raise RuntimeError("SCF did not converge")
        frame = self.atoms.copy()
        frame.calc = stillinger_weber_si()
        self.results = {"energy": frame.get_potential_energy(), "forces": frame.get_forces(),
                        "stress": frame.get_stress()}


def test_a_step_the_trigger_calls_gets_the_references_own_forces_and_a_failure_is_recorded(tmp_path):
    reference = Breakable()
    calc = OnTheFlyCalculator(reference, tmp_path / "otf", target=1e-7, trigger=ALWAYS, **SMALL)

    first = si8(0.05, seed=1)
    first.calc = calc
    forces = first.get_forces()  # no model yet: the reference answers (and labels rattled copies)
    assert calc.results["source"] == "reference" and calc.results["reason"] == "initial"
    np.testing.assert_array_equal(forces, sw_forces(first))
    assert calc.trusted and calc.labels == 4 and calc.calls == 1

    second = si8(0.1, seed=2)
    second.calc = calc
    forces = second.get_forces()  # the trigger calls: this step's forces are the reference's, exactly
    results = calc.results
    assert results["source"] == "reference" and results["reason"] == "absolute"
    np.testing.assert_array_equal(forces, sw_forces(second))
    assert second.get_potential_energy() == sw_energy(second)
    assert np.isfinite(results["uncertainty"]) and results["uncertainty"] > 0
    model = calc.ensemble.predict(second.copy())["forces"]
    assert np.abs(model - forces).max() > 1e-3  # so the check above tells reference from model
    (row,) = calc.database.rows(step=1)
    assert row.source == "absolute" and row.status == "ok" and row.uncertainty == pytest.approx(results["uncertainty"])
    assert calc.calls == 2 and calc.labels == 5

    reference.broken = True  # a failed call is stored, and the step carries on with the model's forces
    third = si8(0.1, seed=3)
    third.calc = calc
    with pytest.warns(RuntimeWarning, match="reference calculation failed at step 2"):
        forces = third.get_forces()
    assert calc.results["source"] == "model" and calc.results["reference_failed"] == "exception"
    np.testing.assert_allclose(forces, calc.ensemble.predict(third.copy())["forces"], atol=1e-4)
    assert calc.failures == 1 and calc.labels == 5 and calc.calls == 3
    ((_, error),) = calc.database.failures()
    assert "SCF did not converge" in error
    calc.close()


def test_resume_from_the_directory_keeps_every_label_once_and_the_counters_go_on(tmp_path):
    out = tmp_path / "otf"
    settings = dict(target=1e-7, trigger=ALWAYS, refit_every=3, **SMALL)
    first = OnTheFlyCalculator(stillinger_weber_si(), out, **settings)
    frames = [si8(0.08, seed=s) for s in range(5)]
    for atoms in frames:  # step 0: the four initial labels and a refit; steps 1-4: one call each
        atoms.calc = first
        atoms.get_forces()
    assert (first.steps, first.calls, first.labels) == (5, 5, 8)
    assert (first.refits, first.pending) == (2, 1)  # initial, then after steps 1-3; step 4's label waits
    # killed after one more label was stored but before the checkpoint: the label must not be lost
    extra = si8(0.08, seed=99)
    first.labeller.label(extra, step=5, source="absolute")
    labels = first.labels
    probe = si8(0.06, seed=50)
    before = first.ensemble.predict(probe.copy())["forces"]
    del first

    resumed = OnTheFlyCalculator(stillinger_weber_si(), out, **settings)
    assert (resumed.steps, resumed.calls, resumed.labels) == (5, 5, labels)
    assert (resumed.refits, resumed.pending) == (2, 2)  # step 4's label and the one after the checkpoint
    # the saved model (to float32 noise: torch's threaded scatter-adds sum in a varying order)
    np.testing.assert_allclose(resumed.ensemble.predict(probe.copy())["forces"], before, rtol=0, atol=1e-5)

    again = frames[-1].copy()  # labelled before the kill: read back, not computed again
    again.calc = resumed
    np.testing.assert_array_equal(again.get_forces(), sw_forces(again))
    assert resumed.results["source"] == "reference" and resumed.labeller.calls == 0
    assert (resumed.steps, resumed.calls, resumed.labels) == (6, 6, labels)

    new = si8(0.08, seed=7)
    new.calc = resumed
    new.get_forces()
    assert resumed.labeller.calls == 1 and resumed.labels == labels + 1 and resumed.calls == 7
    assert (resumed.refits, resumed.pending) == (3, 0)  # the third new label: a refit learnt all of them
    trained = {a.info["content_hash"] for a in resumed.database.training_set()}
    assert trained == {d.key for d in resumed.ensemble.designs}
    hashes = [r.content_hash for r in resumed.database.rows(status="ok")]
    assert len(hashes) == len(set(hashes))  # no label twice
    resumed.close()

    # another target on resume: the same model now answers (a target it meets never calls)
    relaxed = OnTheFlyCalculator(stillinger_weber_si(), out, **{**settings, "target": 10.0,
                                                                 "trigger": {"hard_cap": None, "audit_every": 0}})
    atoms = si8(0.05, seed=123)
    atoms.calc = relaxed
    forces = atoms.get_forces()
    assert relaxed.results["source"] == "model" and relaxed.calls == 7 and relaxed.steps == 8
    np.testing.assert_allclose(forces, relaxed.ensemble.predict(atoms.copy())["forces"], atol=1e-4)
    assert np.abs(forces - sw_forces(atoms)).max() > 1e-3
    relaxed.close()

    with pytest.raises(ConfigError, match=r"^members = 3 is not allowed; .* members = 2"):
        OnTheFlyCalculator(stillinger_weber_si(), out, **{**settings, "members": 3})


def test_finetune_every_trains_the_backbone_on_the_labels_and_a_resume_keeps_it(tmp_path):
    settings = dict(target=1e-7, trigger=ALWAYS, finetune_every=1, finetune={"steps": 1}, **SMALL)
    calc = OnTheFlyCalculator(stillinger_weber_si(), tmp_path / "otf", **settings)
    for seed in range(8):  # until the first training label after the initial ones (1 in 4 is held out)
        atoms = si8(0.08, seed)
        atoms.calc = calc
        atoms.get_forces()
        if seed == 0:
            assert calc.finetunes == []  # the initial labels do not count towards a fine-tune
        if calc.finetunes:
            break
    (record,) = calc.finetunes
    assert record["from"] == "sevennet-0" and record["train"] == len(calc.database.training_set())
    path = tmp_path / "otf" / "models" / f"backbone-v{record['model_version']}.pt"
    assert calc.backbone == str(path) and path.is_file()
    assert len(calc.ensemble.designs) == record["train"]  # the ensemble rebuilt on it, every label refitted
    probe = si8(0.06, seed=50)
    before = calc.ensemble.predict(probe.copy())["forces"]
    calc.close()

    resumed = OnTheFlyCalculator(stillinger_weber_si(), tmp_path / "otf", **settings)
    assert resumed.backbone == str(path) and resumed.finetunes == [record]
    np.testing.assert_allclose(resumed.ensemble.predict(probe.copy())["forces"], before, rtol=0, atol=1e-5)
    resumed.close()


@pytest.mark.parametrize("kwargs, message", [
    ({"members": 1}, "members = 1 is not allowed; must be an integer >= 2"),
    ({"refit_every": 0}, "refit_every = 0 is not allowed"),
    ({"finetune_every": -1}, "finetune_every = -1 is not allowed"),
    ({"target": -0.1}, "target = -0.1 is not allowed; give None or a finite force > 0"),
    ({"score": "median"}, "score = 'median' is not allowed; allowed: max, mean, rms"),
    ({"reference": "no-such-code"}, "reference = 'no-such-code': unknown oracle preset .*stillinger-weber-si"),
    ({"backbone": "sevennet-9"}, "backbone = 'sevennet-9' is not allowed; .*sevennet-0"),
    ({"trigger": {"min_spacing": 0}}, "min_spacing = 0: must be an integer >= 1"),
    ({"trigger": {"windw": 5}}, "unknown key 'windw'"),
    ({"finetune": {"strategy": "magic"}}, "finetune.strategy = 'magic' is not allowed; allowed: lora"),
    ({"reference_options": {"cutoff": 3}}, "reference_options = .* an ASE calculator instance takes none"),
])
def test_a_bad_argument_is_one_line_naming_it_and_no_directory_is_made(tmp_path, kwargs, message):
    args = {"reference": stillinger_weber_si(), "directory": tmp_path / "otf", **kwargs}
    with pytest.raises(ConfigError, match=message) as info:
        OnTheFlyCalculator(**args)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "otf").exists()


def test_fine_tune_settings_as_an_instance_take_their_interval_from_finetune_every():
    from almd.campaign.config import FinetuneSettings
    from almd.campaign.on_the_fly import _finetune_config

    config = _finetune_config(FinetuneSettings(steps=7, lr=1e-3), 3, "sevennet-0", 4, "rms", "float32", 0)
    assert (config.finetune.steps, config.finetune.lr, config.finetune.every) == (7, 1e-3, 3)
