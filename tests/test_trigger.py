"""Trigger on deterministic synthetic score streams (eV/Å)."""

import json
import math

import numpy as np
import pytest

from almd.campaign.selection import frame_distance, select_frames
from almd.campaign.trigger import Action, Trigger, TriggerSettings

#: the fixed-threshold trigger most tests below exercise (the defaults have a target and a history threshold)
FIXED = {"target": None, "abs_cap": 0.02, "adaptive": False, "audit_every": 0}


def fixed(**kw) -> TriggerSettings:
    return TriggerSettings(**{**FIXED, **kw})


def run(trig: Trigger, scores, start: int = 0):
    return [trig.update(start + i, s) for i, s in enumerate(scores)]


def calls(decisions):
    return [d.step for d in decisions if d.call]


def noise(n: int, level: float = 0.005, amp: float = 0.2, seed: int = 0) -> np.ndarray:
    # Multiplicative ±20 % noise: never 3× the mean, never above the caps below.
    rng = np.random.default_rng(seed)
    return level * (1 + amp * rng.uniform(-1, 1, n))


def test_noise_only_never_calls():
    trig = Trigger(fixed(window=200, abs_cap=0.02))
    dec = run(trig, noise(2000))
    assert calls(dec) == []
    assert not any(d.candidate for d in dec)
    assert trig.rolling_mean == pytest.approx(0.005, rel=0.05)


def test_single_spike_one_call():
    s = noise(1000)
    s[500] = 0.05
    dec = run(Trigger(fixed(window=200)), s)
    assert calls(dec) == [500]
    assert set(dec[500].reasons) == {"relative", "absolute"}
    assert dec[500].action is Action.LABEL and not dec[500].stop


def test_step_change_relative_then_mean_catches_up():
    # Window 100, mean 0.01 → 0.04 at step 200: relative fires while
    # 0.04 > 3·mean, i.e. for < 11.1 steps of the new level; min_spacing 10.
    s = np.full(400, 0.01)
    s[200:] = 0.04
    trig = Trigger(fixed(window=100, abs_cap=None, min_spacing=10))
    dec = run(trig, s)
    assert calls(dec) == [200, 210]
    # Steps 201..209 met the criterion but were suppressed by min_spacing.
    assert all(dec[i].suppressed and not dec[i].call for i in range(201, 210))


def test_step_above_abs_cap_respects_min_spacing():
    s = np.full(300, 0.005)
    s[100:] = 0.03  # above abs_cap 0.02 from step 100 on
    dec = run(Trigger(fixed(window=50, min_spacing=10)), s)
    assert calls(dec) == list(range(100, 300, 10))
    c = calls(dec)
    assert min(np.diff(c)) >= 10


def test_slow_drift_fires_on_average_only():
    n, window, target = 1500, 200, 0.01
    s = np.linspace(0.002, 0.02, n)
    trig = Trigger(fixed(window=window, abs_cap=None, target=target, converge_windows=100))  # never in production
    dec = run(trig, s)
    means = np.array([s[max(0, i - window + 1): i + 1].mean() for i in range(n)])
    first = int(np.argmax(means > target))
    assert calls(dec) == list(range(first, n, window))
    assert all(d.reasons == ("average",) for d in dec if d.call)


def test_hard_cap_brakes_at_once_and_rolls_back():
    s = noise(300)
    s[100] = 0.05  # ordinary call
    s[103] = 2.0  # brake within min_spacing of the last call
    trig = Trigger(fixed(window=100, hard_cap=1.0))
    dec = run(trig, s)
    assert calls(dec) == [100, 103]
    d = dec[103]
    assert d.action is Action.BRAKE and d.stop and d.reasons == ("hard_cap",)
    assert d.rollback_to == 102  # last frame that met no criterion
    # The unphysical score does not pollute the trajectory average.
    assert max(trig._window) < 0.06
    assert trig.n_brakes == 1
    assert calls(dec[104:]) == []  # nothing after the brake in this stream


def test_brake_rollback_forgets_abandoned_branch():
    s = noise(200)
    trig = Trigger(fixed(window=100, min_spacing=10))
    run(trig, s[:150])
    trig.update(150, 0.03)  # a call: step 150 is not trusted
    run(trig, s[151:155], start=151)
    mean_at_154 = trig.rolling_mean
    d = trig.update(155, 5.0)
    assert d.stop and d.rollback_to == 154
    # Roll back further: a candidate frame inside the branch is not trusted.
    trig2 = Trigger(fixed(window=100, min_spacing=10))
    run(trig2, s[:150])
    before = trig2.rolling_mean
    trig2.update(150, 0.03)
    d2 = trig2.update(151, 5.0)
    assert d2.rollback_to == 149
    assert trig2.rolling_mean == before  # step 150's score is gone with its branch
    # The walker re-runs from step 150 with the refitted model: accepted.
    assert not trig2.update(150, s[150]).call
    # and in the first trigger, the window kept steps up to 154
    assert trig.rolling_mean == mean_at_154


def test_decision_record_is_plain_json():
    trig = Trigger(fixed())
    first = trig.update(0, 0.05)
    rec = json.loads(json.dumps(first.as_dict(), allow_nan=False))
    assert rec["action"] == "label" and rec["reasons"] == ["absolute"]
    assert rec["rolling_mean"] is None and rec["threshold"] == 0.02


def test_nan_score_brakes():
    trig = Trigger(fixed())
    run(trig, noise(50))
    d = trig.update(50, float("nan"))
    assert d.stop and d.reasons == ("non_finite",) and d.rollback_to == 49


def test_steps_must_increase():
    trig = Trigger(fixed())
    trig.update(5, 0.01)
    with pytest.raises(ValueError, match="step 5"):
        trig.update(5, 0.01)


def test_adaptive_threshold_updates_only_when_stable():
    st = fixed(window=500, abs_cap=0.05, adaptive=True, adaptive_cx=0.2,
                         adaptive_history=100)
    trig = Trigger(st)
    stable = noise(100, level=0.01, amp=0.1)
    run(trig, stable)
    assert trig.threshold == pytest.approx(stable.mean() * 1.2, rel=1e-12)
    # A steady drift (+100 % over the history) must not move the threshold ...
    thr = trig.threshold
    run(trig, np.linspace(0.008, 0.016, 100), start=100)
    assert trig.threshold == thr
    # ... nor a history with a large spread (fresh trigger: no mixed windows).
    wild = np.where(np.arange(300) % 2 == 0, 0.001, 0.011)
    other = Trigger(st)
    run(other, wild)
    assert other.threshold == 0.05
    # Above the adapted threshold (but below the old abs_cap and 3× mean): a call.
    d = trig.update(250, 0.025)
    assert d.call and d.reasons == ("absolute",)


def test_adaptive_off_keeps_cap():
    trig = Trigger(fixed(abs_cap=0.05))
    run(trig, noise(1000, level=0.01))
    assert trig.threshold == 0.05


def test_convergence_after_m_quiet_windows_then_production_until_an_audit_fails():
    st = fixed(window=100, target=0.01, converge_windows=3)
    trig = Trigger(st)
    dec = run(trig, noise(250))
    assert not trig.converged
    dec += run(trig, noise(60, seed=1), start=250)
    assert trig.converged and trig.converged_at == 300  # blocks closed at steps 100, 200, 300
    d = trig.update(310, 0.05)  # production: a high score is recorded, not called
    assert not d.call and d.suppressed and trig.converged
    # the audit of a frame whose true error is far above what the model claims fails
    assert trig.record_audit(311, true_error=0.05, score=0.005) is False
    assert not trig.converged and trig.n_audit_failures == 1
    assert trig.update(320, 0.05).call  # learning again
    run(trig, noise(300, seed=2), start=321)
    assert trig.converged


def test_audits_every_n_quiet_steps_and_passing_keeps_production():
    st = TriggerSettings(window=100, target=0.01, converge_windows=2, audit_every=150)
    assert TriggerSettings(window=100, converge_windows=2).audit_steps == 200  # default: M windows
    trig = Trigger(st)
    dec = run(trig, noise(700))
    audits = [d.step for d in dec if d.audit]
    assert audits == [150, 300, 450, 600]  # quiet steps counted from the start and from each audit
    assert calls(dec) == audits and trig.n_calls == 0 and trig.n_audits == 4
    assert trig.converged  # audits are no calls: they do not break the convergence test
    assert trig.record_audit(600, true_error=0.009, score=0.005)  # overconfident, but under the target
    assert trig.converged
    # an audit is due again 150 steps after the last one, in production too
    more = run(trig, noise(150, seed=3), start=700)
    assert [d.step for d in more if d.audit] == [750]
    assert Trigger.from_json(trig.to_json()).to_json() == trig.to_json()


def test_frames_under_the_target_are_never_called():
    # A spike 5x the history but under the target: the user accepts that error.
    s = noise(600)
    s[400] = 0.025
    trig = Trigger(TriggerSettings(window=100, target=0.03, audit_every=0))
    assert calls(run(trig, s)) == []
    s[400] = 0.04  # above the target: the relative criterion calls
    trig = Trigger(TriggerSettings(window=100, target=0.03, audit_every=0, converge_windows=10))
    dec = run(trig, s)
    assert calls(dec) == [400] and "relative" in dec[400].reasons


def test_window_in_md_steps_not_in_scores():
    # Scored on every other step: the window of 100 steps holds 50 scores.
    trig = Trigger(fixed(window=100, min_history=10))
    for step in range(0, 400, 2):
        trig.update(step, 0.01 if step < 300 else 0.02)
    assert trig.rolling_mean == pytest.approx((0.01 * 0 + 0.02 * 50) / 50)
    assert len(trig._recent()) == 50


def test_a_fitted_window_lets_the_average_criterion_fire():
    st = TriggerSettings(target=0.01, audit_every=0).for_run(300, scored_every=2)
    trig = Trigger(st)
    dec = [trig.update(step, 0.02) for step in range(2, 300, 2)]
    assert any("average" in d.reasons for d in dec)


def test_window_fits_the_run():
    assert TriggerSettings().for_run(1500).window == 75
    assert TriggerSettings().for_run(100).window == 20
    assert TriggerSettings().for_run(10**6).window == 1000
    assert TriggerSettings(window=300).for_run(1500).window == 300
    # scored on every 2nd step, a 20-step window holds 9 earlier scores at a step: no more may be asked for
    assert TriggerSettings().for_run(300, scored_every=2).min_history == 9
    assert TriggerSettings().for_run(1000, scored_every=2).min_history == 20


def test_no_convergence_while_average_above_target():
    trig = Trigger(fixed(window=100, target=0.004, abs_cap=None))
    run(trig, noise(1000))
    assert not trig.converged


def test_subblock_error_joins_convergence_and_goes_stale_after_a_call():
    st = fixed(window=100, target=0.01, converge_windows=3, subblock_target=0.008)
    trig = Trigger(st)
    run(trig, noise(310))
    assert trig._good_blocks >= 3  # the trajectory-averaged test alone would pass ...
    assert not trig.converged  # ... but no sub-block error was recorded
    assert math.isnan(trig.subblock_error)
    assert trig.record_subblock_error(0.012) is False
    assert not trig.converged  # recorded, above its target
    assert trig.record_subblock_error(0.006) is True
    assert trig.converged and trig.subblock_error == 0.006
    # Exact restart keeps the record; a version-1 state (no record) still loads.
    assert Trigger.from_json(trig.to_json()).converged
    old = trig.state_dict()
    old["version"] = 1
    del old["subblock"]
    old["settings"].pop("subblock_target")
    assert Trigger.from_state_dict(old).converged  # no sub-block target in v1
    # A call refits the model: the record describes the old model (production ends first).
    trig.record_audit(309, true_error=0.05, score=0.005)
    assert trig.update(310, 0.05).call
    assert math.isnan(trig.subblock_error)
    run(trig, noise(310, seed=2), start=311)
    assert trig._good_blocks >= 3 and not trig.converged
    trig.record_subblock_error(0.005)
    assert trig.converged
    with pytest.raises(ValueError, match="sub-block error"):
        trig.record_subblock_error(float("nan"))


def test_subblock_target_needs_target():
    with pytest.raises(ValueError, match=r"TriggerSettings\.subblock_target = "):
        fixed(subblock_target=0.01)
    with pytest.raises(ValueError, match=r"TriggerSettings\.subblock_target = "):
        fixed(target=0.01, subblock_target=-1.0)
    # Without subblock_target, recording is harmless and convergence unchanged.
    trig = Trigger(fixed(window=100, target=0.01))
    assert trig.record_subblock_error(0.5) is False
    run(trig, noise(310))
    assert trig.converged


def test_json_round_trip_mid_stream_is_exact():
    rng = np.random.default_rng(7)
    s = 0.005 * (1 + 0.3 * rng.standard_normal(3000)).clip(0.1)
    s[[400, 401, 1200, 2500]] = [0.04, 0.05, 3.0, 0.03]
    s[1800:2100] += np.linspace(0, 0.02, 300)
    st = fixed(window=300, target=0.009, adaptive=True, adaptive_history=150,
                         abs_cap=0.03)
    ref = run(Trigger(st), s)
    for cut in (150, 401, 1201, 1950):
        first = Trigger(st)
        run(first, s[:cut])
        text = first.to_json()
        json.loads(text)  # plain JSON
        restored = Trigger.from_json(text)
        rest = run(restored, s[cut:], start=cut)
        assert [repr(d) for d in rest] == [repr(d) for d in ref[cut:]]
        assert restored.to_json() == run_to_json(st, s)
    assert len(calls(ref)) >= 4


def run_to_json(st, s):
    t = Trigger(st)
    run(t, s)
    return t.to_json()


@pytest.mark.parametrize(
    "kw, field",
    [
        ({"window": 0}, "window"),
        ({"rel_factor": 0.5}, "rel_factor"),
        ({"abs_cap": -1.0}, "abs_cap"),
        ({"hard_cap": 0.01}, "hard_cap"),
        ({"target": float("nan")}, "target"),
        ({"min_spacing": 2.5}, "min_spacing"),
        ({"min_history": 5000}, "min_history"),
        ({"audit_every": -1}, "audit_every"),
        ({"audit_tolerance": 0.5}, "audit_tolerance"),
        ({"target": 2.0}, "hard_cap"),
    ],
)
def test_settings_validation_names_field(kw, field):
    with pytest.raises(ValueError, match=rf"TriggerSettings\.{field} = "):
        TriggerSettings(**kw)


def test_settings_unknown_key():
    with pytest.raises(ValueError, match="'windw'"):
        TriggerSettings.from_dict({"windw": 10})


# ------------------------------------------------------------------ frames
def _si8():
    a = 5.431
    base = np.array([[0, 0, 0], [0, .5, .5], [.5, 0, .5], [.5, .5, 0],
                     [.25, .25, .25], [.25, .75, .75], [.75, .25, .75], [.75, .75, .25]])
    return base * a, np.eye(3) * a


def test_frame_distance_minimum_image_and_translation():
    pos, cell = _si8()
    shifted = pos.copy()
    shifted[0] += [5.431 - 1e-3, 0, 0]  # across the boundary: really a tiny move
    assert frame_distance(pos, shifted, cell) < 1e-3
    assert frame_distance(pos, pos + 0.7, cell) == pytest.approx(0, abs=1e-12)
    assert frame_distance(pos, pos[:4], cell) == math.inf


def test_select_frames_deduplicates_one_event():
    pos, cell = _si8()
    rng = np.random.default_rng(3)
    event = pos + rng.normal(0, 0.1, pos.shape)
    frames, scores = [], []
    for k in range(5):  # five near-identical frames of one event, high scores
        frames.append(event + rng.normal(0, 0.002, pos.shape))
        scores.append(0.10 - 0.001 * k)
    other = pos + rng.normal(0, 0.1, pos.shape)  # a different event, lower score
    frames.append(other)
    scores.append(0.05)
    frames.append(pos)
    scores.append(0.01)
    picked = select_frames(scores, frames, max_frames=3, min_distance=0.02, cell=cell)
    assert picked == [0, 5, 6]
    assert select_frames(scores, frames, max_frames=1, cell=cell) == [0]
    # Without de-duplication the event would take all the slots.
    assert select_frames(scores, frames, max_frames=3, min_distance=0.0, cell=cell) == [0, 1, 2]


def test_select_frames_accepts_atoms():
    ase = pytest.importorskip("ase")
    pos, cell = _si8()
    a = ase.Atoms("Si8", positions=pos, cell=cell, pbc=True)
    b = a.copy()
    b.positions[1] += 0.3
    c = a.copy()
    c.positions[1] += 0.301
    assert select_frames([0.2, 0.3, 0.1], [a, b, c], max_frames=2, min_distance=0.01) == [1, 0]


def test_the_subblock_test_decides_convergence_and_a_failed_one_calls():
    s = TriggerSettings(window=20, target=0.1, subblock_target=0.01, converge_windows=2, adaptive=False,
                        audit_every=0, min_spacing=5)
    trig, step = Trigger(s), 0

    def quiet(n: int) -> list:
        nonlocal step
        out = []
        for _ in range(n):
            step += 1
            out.append(trig.update(step, 0.05))
        return out

    quiet(60)  # the windows are quiet: only the sub-block test stands in the way
    assert trig.wants_subblock_test and not trig.converged
    assert trig.record_subblock_error(0.02) is False  # above its target: the next step calls
    assert not trig.wants_subblock_test
    decisions = quiet(1)
    assert decisions[0].action is Action.LABEL and decisions[0].reasons == ("subblock",)
    assert math.isnan(trig.subblock_error)  # the call refitted the model: the record is stale
    assert not trig.wants_subblock_test  # the windows start again after a call
    quiet(60)
    assert trig.wants_subblock_test
    assert trig.record_subblock_error(0.005) is True and trig.converged
    restored = Trigger.from_json(trig.to_json())
    assert restored.converged and restored.subblock_error == 0.005 and not restored.wants_subblock_test
