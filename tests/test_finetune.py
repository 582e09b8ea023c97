"""The PFT trainer: exact gradients of the Hessian-column loss, learning, exact resume, input errors."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from ase.build import bulk
from ase.calculators.singlepoint import SinglePointCalculator

from almd import potentials
from almd.finetune import ConfigError, DataError, FinetuneConfig, Finetuner, Sample, losses
from almd.potentials import build_graph, hessian, hessian_vector_product


@pytest.fixture(scope="module")
def base():
    return potentials.load("sevennet-0").double().eval()


@pytest.fixture(scope="module")
def si2_target(base):
    """Perfect 2-atom Si with a synthetic but physical label: the model's own Hessian × 1.1."""
    atoms = bulk("Si", "diamond", a=5.43)
    h = hessian(base, build_graph(atoms, base.cutoff, torch.float64)).numpy()
    atoms.info["hessian"] = 1.1 * h
    return atoms


def config(tmp_path, **sections) -> FinetuneConfig:
    raw = {"model": {"dtype": "float64"}, "data": {"validation_columns": 1},
           "run": {"steps": 4, "eval_every": 2, "checkpoint_every": 2, "output": str(tmp_path / "out"),
                   "progress": False, "patience": 0}}
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return FinetuneConfig.from_dict(raw)


def test_hessian_column_loss_gradient_matches_finite_differences(base):
    atoms = bulk("Si", "diamond", a=5.43)
    atoms.rattle(0.03, seed=4)
    pot = copy.deepcopy(base)
    h = hessian(pot, build_graph(atoms, pot.cutoff, torch.float64)).detach().numpy()
    rng = np.random.default_rng(0)
    sample = Sample(atoms, hessian=h + rng.normal(0, 0.5, h.shape))  # so the MAE has no kinks at zero
    name = "model.2_self_interaction_2.linear.weight"
    param = dict(pot.named_parameters())[name]
    loss = losses.hessian_term(pot, [sample], [4], torch.float64)
    (grad,) = torch.autograd.grad(loss, param)  # third-order autograd
    k = int(grad.abs().argmax())
    step = 1e-5
    values = []
    with torch.no_grad():
        w0 = float(param.view(-1)[k])
    for sign in (1, -1):
        with torch.no_grad():
            param.view(-1)[k] = w0 + sign * step
        values.append(float(losses.hessian_term(pot, [sample], [4], torch.float64, create_graph=False)))
    with torch.no_grad():
        param.view(-1)[k] = w0
    fd = (values[0] - values[1]) / (2 * step)
    assert abs(float(grad.view(-1)[k])) > 1e-3
    assert float(grad.view(-1)[k]) == pytest.approx(fd, rel=1e-5)


def test_fused_pft_terms_equal_separate_calls(base, same_losses_and_gradients):
    """One forward for EFS + Hessian column gives the same losses and parameter gradients."""
    phonon = bulk("Si", "diamond", a=5.43)
    h = hessian(base, build_graph(phonon, base.cutoff, torch.float64)).detach().numpy()
    ph = Sample(phonon, forces=np.zeros((2, 3)), stress=np.zeros((3, 3)), hessian=1.1 * h)
    displaced = bulk("Si", "diamond", a=5.40, cubic=True)
    displaced.rattle(0.05, seed=1)
    rng = np.random.default_rng(2)
    ef = Sample(displaced, energy=-43.0, forces=rng.normal(0, 0.3, (8, 3)), stress=rng.normal(0, 0.01, (3, 3)))
    params = [p for p in base.parameters() if p.requires_grad]

    fused = losses.pft_terms(base, [ph, ef], [3, None], torch.float64)
    separate = losses.efs_terms(base, [ph, ef], torch.float64)
    graph = build_graph(phonon, base.cutoff, torch.float64)
    e3 = torch.zeros_like(graph.positions)
    e3.view(-1)[3] = 1.0
    column = hessian_vector_product(base, graph, e3, create_graph=True).reshape(-1)
    separate["hessian"] = (column - torch.as_tensor(ph.hessian[:, 3])).abs().mean()
    assert set(fused) == {"energy", "forces", "stress", "hessian"}
    same_losses_and_gradients(fused, separate, params)


def hessian_mae(pot, atoms) -> float:
    h = hessian(pot, build_graph(atoms, pot.cutoff, pot.dtype)).detach().numpy()
    return float(np.abs(h - atoms.info["hessian"]).mean())


def test_pft_steps_reduce_hessian_error_and_export(base, si2_target, tmp_path):
    cfg = config(tmp_path, run={"steps": 4}, optim={"lr": 1e-3})
    before = hessian_mae(base, si2_target)
    trainer = Finetuner(cfg, potential=copy.deepcopy(base), phonon=[si2_target])
    result = trainer.fit(save_model=False)
    assert result.best_step > 0
    after = hessian_mae(trainer.potential, si2_target)
    assert after < 0.7 * before
    assert (tmp_path / "out" / "log.csv").read_text().count("\n") == 5  # header + 4 steps
    # export: merged weights in a file almd.Calculator loads (LoRA run on a freshly built model)
    lora = Finetuner(config(tmp_path, model={"strategy": "lora", "dtype": "float32"}, run={"steps": 1}),
                     potential=type(base).from_export(base.export()), phonon=[si2_target])
    out = lora.fit()
    import almd

    atoms = si2_target.copy()
    atoms.calc = almd.Calculator(model=out.model_path)
    assert np.isfinite(atoms.get_potential_energy())


def test_a_wall_time_budget_stops_the_fit_after_the_step_that_crosses_it(base, si2_target, tmp_path):
    """Budget 1 ns: the first step crosses it and is validated there, off the eval_every grid."""
    trainer = Finetuner(config(tmp_path, run={"steps": 4, "eval_every": 4, "budget": 1e-9}),
                        potential=copy.deepcopy(base), phonon=[si2_target])
    seen = []
    result = trainer.fit(save_model=False, on_step=seen.append)
    assert (result.steps_done, result.stop_reason, result.stopped_early) == (1, "budget", True)
    assert "val_loss" in result.history[0] and result.best_step in (0, 1)
    # what a benchmark reads off each step: the structures drawn, the validation's cost
    assert seen == result.history and seen[0]["drawn"] == [trainer.phonon[0].name]
    assert 0 < seen[0]["val_seconds"] < seen[0]["seconds"]
    resumed = Finetuner(config(tmp_path, run={"steps": 4, "eval_every": 4, "budget": 1e-9}),
                        potential=copy.deepcopy(base), phonon=[si2_target]).fit(resume=True, save_model=False)
    assert (resumed.steps_done, resumed.stop_reason) == (1, "budget")  # a budget stop stays stopped
    unbounded = Finetuner(config(tmp_path / "b", run={"steps": 2}), potential=copy.deepcopy(base),
                          phonon=[si2_target]).fit(save_model=False)
    assert (unbounded.steps_done, unbounded.stop_reason) == (2, "steps")
    with pytest.raises(ConfigError, match=r"run.budget = -1.0 .*>= 0"):
        config(tmp_path, run={"budget": -1.0})


def test_efs_only_finetune_still_reports_the_hessian_column_error(base, si2_target, tmp_path):
    """λ_Φ = 0 (the EFS-only side of the PFT comparison): no Hessian term in training or in the
    validation loss, but the validation column error is still measured.
    """
    trainer = Finetuner(config(tmp_path, loss={"hessian": 0.0}, run={"steps": 2}),
                        potential=copy.deepcopy(base), phonon=[si2_target])
    result = trainer.fit(save_model=False)
    assert all("hessian" not in h for h in result.history)
    assert result.initial_validation["val_hessian_mae"] > 0.01  # the label is 1.1 × the model's own
    terms = losses.pft_terms(base, [trainer.val_phonon[0]], [0], torch.float64, create_graph=False)
    assert result.initial_validation["val_loss"] == pytest.approx(float((20 * terms["forces"] + 5 * terms["stress"]).detach()))


def test_resume_continues_bit_for_bit(base, si2_target, tmp_path):
    d = bulk("Si", "diamond", a=5.43)
    d.rattle(0.05, seed=2)
    d.calc = SinglePointCalculator(d, forces=np.full((2, 3), 0.1) * [1, -1, 0.5], energy=-10.0)
    opts = dict(data={"replay": "self", "replay_count": 2, "validation_fraction": 0.0},
                loss={"replay_ratio": 1}, model={"dtype": "float32"})

    def trainer(out, steps):
        cfg = config(tmp_path / out, run={"steps": steps}, **opts)
        return Finetuner(cfg, potential=copy.deepcopy(base), phonon=[si2_target], efs=[d])

    full = trainer("a", 3).fit(save_model=False)
    trainer("b", 2).fit(save_model=False)
    resumed = trainer("b", 3).fit(resume=True, save_model=False)
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in full.history]
    assert [h.get("replay") for h in resumed.history] == [h.get("replay") for h in full.history]
    assert resumed.best_val_loss == full.best_val_loss


def test_config_errors(tmp_path, capsys):
    path = tmp_path / "ft.toml"
    path.write_text('[loss]\nhessain = 100\n')
    with pytest.raises(ConfigError, match=r"unknown key 'loss.hessain'.*allowed in \[loss\]:.*hessian"):
        FinetuneConfig.from_toml(path)
    with pytest.raises(ConfigError, match=r"unknown section \[trainer\]; allowed: model, data"):
        FinetuneConfig.from_dict({"trainer": {}})
    with pytest.raises(ConfigError, match="model.strategy = 'qlora'.*full, lora, delta"):
        FinetuneConfig.from_dict({"model": {"strategy": "qlora"}})
    with pytest.raises(ConfigError, match="optim.lr = 'fast' is not allowed; expected a number"):
        FinetuneConfig.from_dict({"optim": {"lr": "fast"}})
    path.write_text('[model]\nstrategy = "lora"\n[run]\nsteps = 3\n')
    cfg = FinetuneConfig.from_toml(path)
    assert cfg.model.strategy == "lora" and cfg.run.steps == 3 and cfg.loss.hessian == 100.0
    assert cfg.energy_weight == 20.0  # PFT: λ_E 20 without co-training, 0 with it
    assert FinetuneConfig.from_dict({"data": {"replay": "self"}}).energy_weight == 0.0
    # the command line reports config errors without a traceback
    from almd.finetune import main

    path.write_text('[run]\nsteps = "many"\n')
    assert main([str(path)]) == 2
    assert "run.steps = 'many'" in capsys.readouterr().out


def test_bad_input_is_rejected_before_training(base, si2_target, tmp_path):
    cfg = config(tmp_path)
    pot = copy.deepcopy(base)
    polonium = bulk("Po", "sc", a=3.35)
    polonium.calc = SinglePointCalculator(polonium, forces=np.zeros((1, 3)))
    with pytest.raises(DataError, match="does not know element.*Po"):
        Finetuner(cfg, potential=pot, phonon=[si2_target], efs=[polonium])
    wrong = si2_target.copy()
    wrong.info["hessian"] = np.eye(3)
    with pytest.raises(DataError, match="phonon supercell does not match its structure"):
        Finetuner(cfg, potential=pot, phonon=[wrong])
    nan = bulk("Si", "diamond", a=5.43)
    nan.calc = SinglePointCalculator(nan, forces=np.full((2, 3), np.nan))
    with pytest.raises(DataError, match="forces label contains NaN"):
        Finetuner(cfg, potential=pot, phonon=[si2_target], efs=[nan])
    ok = bulk("Si", "diamond", a=5.43)
    ok.calc = SinglePointCalculator(ok, forces=np.zeros((2, 3)))
    with pytest.raises(DataError, match="validation split is empty"):
        Finetuner(config(tmp_path, data={"validation_fraction": 0.0}), potential=pot, efs=[ok])
    with pytest.raises(DataError, match="no training data"):
        Finetuner(cfg, potential=pot)


def test_delta_l2_penalty_keeps_delta_closer_to_the_base_than_full(base, si2_target, tmp_path):
    """Strategy "delta" adds λ_Δ·‖Δω‖² to the loss; without it delta trains like full."""
    assert config(tmp_path, model={"strategy": "delta"}).delta_l2_weight == 0.01  # the default
    assert config(tmp_path).delta_l2_weight == 0.0
    lam = 100.0

    def drift(strategy, steps=4, **optim):
        cfg = config(tmp_path / f"{strategy}{optim}", model={"strategy": strategy},
                     optim={"lr": 1e-3, "ema": 0.0, **optim})
        trainer = Finetuner(cfg, potential=copy.deepcopy(base), phonon=[si2_target])
        start = {k: p.detach().clone() for k, p in trainer.potential.named_parameters()}
        records = [trainer.train_step() for _ in range(steps)]
        if strategy == "delta":
            sq = float(trainer.delta_penalty().detach())
        else:
            sq = sum(float(((p.detach() - start[k]) ** 2).sum()) for k, p in trainer.named_trainable.items())
        return sq ** 0.5, records, trainer

    full, full_records, _ = drift("full")
    plain, plain_records, _ = drift("delta", delta_l2=0.0)
    penalised, records, trainer = drift("delta", delta_l2=lam)
    assert all("delta_l2" not in r for r in full_records + plain_records)
    # without the penalty ω₀ + Δω takes full fine-tuning's steps (AdamW's decay is only lr·wd)
    assert plain == pytest.approx(full, rel=1e-3)
    assert full > 0.01
    assert penalised < 0.8 * full
    # the logged loss is the data terms plus λ_Δ·‖Δω‖² (‖Δω‖² as it was before the step's update)
    w = trainer.weights()
    assert records[0]["delta_l2"] == 0.0
    for r in records[1:]:
        data = sum(w[k] * r[k] for k in ("energy", "forces", "stress", "hessian") if k in r and w[k] > 0)
        assert r["delta_l2"] > 0
        assert r["loss"] == pytest.approx(data + lam * r["delta_l2"], rel=1e-9)
        assert lam * r["delta_l2"] > 1e-3 * data
    # validation never includes it
    v = trainer.validate()
    terms = losses.pft_terms(trainer.potential, [trainer.val_phonon[0]], [0], torch.float64, create_graph=False)
    assert v["val_loss"] == pytest.approx(sum(w[k] * float(t.detach()) for k, t in terms.items()), rel=1e-9)
    with pytest.raises(ConfigError, match=r"optim.delta_l2 = 0.5 is not allowed.*model.strategy = 'delta'"):
        FinetuneConfig.from_dict({"model": {"strategy": "lora"}, "optim": {"delta_l2": 0.5}})


def labelled(atoms, energy, forces):
    a = atoms.copy()
    a.calc = SinglePointCalculator(a, energy=energy, forces=forces)
    return a


def test_given_replay_energies_get_the_fitted_shifts(base, si2_target, tmp_path):
    """A base-labelled replay file sits at the base's energy reference: the shifts fitted on the
    fine-tuning labels (and applied to the model) are added to its energies too.
    """
    def base_labels(atoms):
        out = potentials.energy_forces_stress(base, build_graph(atoms, base.cutoff, torch.float64), stress=False)
        return float(out["energy"].detach().sum()), out["forces"].detach().numpy()

    si = bulk("Si", "diamond", a=5.43, cubic=True)
    si.rattle(0.03, seed=3)
    e, f = base_labels(si)
    efs = [labelled(si, e + 8 * 1.5, f)]  # another DFT reference: +1.5 eV per Si
    sic = bulk("SiC", "zincblende", a=4.36, cubic=True)
    sic.rattle(0.04, seed=5)
    replay = [labelled(sic, *base_labels(sic))]
    opts = dict(data={"validation_fraction": 0.0}, loss={"replay_ratio": 1}, optim={"ema": 0.0})

    trainer = Finetuner(config(tmp_path / "a", **opts), potential=copy.deepcopy(base), efs=efs,
                        validation=[si2_target], replay=replay)
    assert trainer.energy_shifts[14] == pytest.approx(1.5, abs=1e-6)
    # 4 Si (shifted) + 4 C (no label, no shift)
    assert trainer.replay[0].energy == pytest.approx(replay[0].get_potential_energy() + 4 * 1.5, abs=1e-6)
    assert replay[0].get_potential_energy() == base_labels(sic)[0]  # the caller's data untouched
    # model and replay labels now agree: zero replay energy error before any training
    terms = losses.efs_terms(trainer.potential, trainer.replay, torch.float64, create_graph=False)
    assert float(terms["energy"].detach()) < 1e-8
    # data.shift_replay = false: the replay labels are taken as they are
    kept = Finetuner(config(tmp_path / "b", **{**opts, "data": {"validation_fraction": 0.0, "shift_replay": False}}),
                     potential=copy.deepcopy(base), efs=efs, validation=[si2_target], replay=replay)
    assert kept.replay[0].energy == replay[0].get_potential_energy()
    assert float(losses.efs_terms(kept.potential, kept.replay, torch.float64, create_graph=False)["energy"].detach()) \
        == pytest.approx(0.75, abs=1e-6)  # 4 × 1.5 eV over 8 atoms


def test_ema_counts_steps_not_replay_updates(base, si2_target, tmp_path):
    d = bulk("Si", "diamond", a=5.43)
    d.rattle(0.05, seed=2)
    d = labelled(d, -10.0, np.full((2, 3), 0.1))
    cfg = config(tmp_path, data={"replay": "self", "replay_count": 2, "validation_fraction": 0.0},
                 loss={"replay_ratio": 3}, run={"steps": 2, "eval_every": 2})
    trainer = Finetuner(cfg, potential=copy.deepcopy(base), phonon=[si2_target], efs=[d])
    assert trainer.config.co_training and trainer.replay
    for _ in range(2):
        record = trainer.train_step()
    assert "replay" in record
    assert trainer.ema.updates == 2  # not 2 × (1 + 3)
