"""The settings base (almd.settings): pydantic's checks as one line naming the key, the value and what is allowed."""

import json

import pytest

from almd.campaign.config import CampaignConfig
from almd.campaign.trigger import Trigger, TriggerSettings
from almd.campaign.walker import WalkerError, WalkerState
from almd.settings import ConfigError


@pytest.mark.parametrize("raw, message", [
    ({"md": {"temperature": "hot"}}, "md.temperature = 'hot' is not allowed; expected a number"),
    ({"run": {"steps": True}}, "run.steps = True is not allowed; expected an integer"),
    ({"md": {"temperature": False}}, "md.temperature = False is not allowed; expected a number"),
    ({"run": {"steps": 2.0}}, "run.steps = 2.0 is not allowed; expected an integer"),
    ({"learning": {"phonons": 1}}, "learning.phonons = 1 is not allowed; expected true or false"),
    ({"system": {"supercell": [2, "x", 2]}}, r"system.supercell\[1\] = 'x' is not allowed; expected an integer"),
    ({"md": {"schedule": [[10, True]]}}, r"md.schedule\[0\]\[1\] = True is not allowed; expected a number"),
    ({"md": {"schedule": 5}}, "md.schedule = 5 is not allowed; expected a list"),
    ({"reference": {"options": 5}}, "reference.options = 5 is not allowed; expected a table"),
    ({"walker": [{"temperature": "hot"}]}, r"walker\[0\].temperature = 'hot' is not allowed; expected a number"),
    ({"md": 5}, r"\[md\] must be a table, got 5"),
])
def test_a_value_of_the_wrong_kind_is_one_line_naming_the_dotted_key(raw, message):
    with pytest.raises(ConfigError, match=f"^{message}$") as err:
        CampaignConfig.from_dict(raw)
    assert "\n" not in str(err.value)


def test_toml_spellings_that_are_accepted():
    cfg = CampaignConfig.from_dict({"md": {"temperature": 900, "schedule": [[10, 300], [20, 300, 900]]},
                                    "system": {"supercell": 2},
                                    "finetune": {"strategy": "freeze", "freeze": "embedding"}})
    assert cfg.md.temperature == 900.0 and isinstance(cfg.md.temperature, float)  # an int is a number
    assert cfg.md.schedule == [[10.0, 300.0], [20.0, 300.0, 900.0]]
    assert all(isinstance(v, float) for stage in cfg.md.schedule for v in stage)
    assert cfg.system.supercell == [2] and cfg.finetune.freeze == ["embedding"]  # a bare value: a list of one


def test_the_python_constructors_check_too():
    with pytest.raises(ConfigError, match=r"^TriggerSettings.window = 'x' is not allowed; expected an integer$"):
        TriggerSettings(window="x")
    with pytest.raises(ConfigError, match="^unknown key 'windw'; allowed: target, window"):
        TriggerSettings(windw=5)


def test_a_corrupt_saved_state_is_one_line_naming_the_field():
    state = {"step": 3, "numbers": [14], "positions": [[0.0, 0.0, 0.0]], "momenta": [[0.0, 0.0, 0.0]],
             "cell": [[5.0, 0.0, 0.0], [0.0, 5.0, 0.0], [0.0, 0.0, 5.0]], "pbc": [True, True, True]}
    text = WalkerState.from_json(json.dumps(state)).to_json()
    assert WalkerState.from_json(text).to_json() == text
    with pytest.raises(WalkerError, match=r"^walker state: positions\[0\]\[1\] = 'x' is not allowed; expected a number$"):
        WalkerState.from_json(json.dumps({**state, "positions": [[0.0, "x", 0.0]]}))
    with pytest.raises(WalkerError, match="^walker state: missing key 'step'$"):
        WalkerState.from_json(json.dumps({k: v for k, v in state.items() if k != "step"}))

    trigger = Trigger(TriggerSettings(window=50))
    for step in range(1, 60):
        trigger.update(step, 0.01 + 1e-4 * (step % 7))
    saved = json.loads(trigger.to_json())
    assert Trigger.from_json(trigger.to_json()).to_json() == trigger.to_json()
    with pytest.raises(ConfigError, match="^trigger state: n_calls = 'x' is not allowed; expected an integer$"):
        Trigger.from_state_dict({**saved, "n_calls": "x"})
    with pytest.raises(ConfigError, match="^trigger state: missing key 'window'$"):
        Trigger.from_state_dict({k: v for k, v in saved.items() if k != "window"})


def test_numpy_numbers_are_numbers_and_a_string_is_still_refused():
    import numpy as np

    from almd.campaign.config import CampaignConfig
    from almd.campaign.walker import WalkerSettings

    config = CampaignConfig.from_dict({"run": {"steps": np.int64(5)}, "system": {"supercell": np.array([2, 1, 2])},
                                       "md": {"temperature": np.float32(450.0)}})
    assert (config.run.steps, config.system.supercell, config.md.temperature) == (5, [2, 1, 2], 450.0)
    assert type(config.run.steps) is int and type(WalkerSettings(seed=np.int64(3)).seed) is int
    with pytest.raises(ConfigError, match=r"^run.steps = '5' is not allowed; expected an integer$"):
        CampaignConfig.from_dict({"run": {"steps": "5"}})
