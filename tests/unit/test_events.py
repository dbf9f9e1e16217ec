import dataclasses
import pickle
from pathlib import Path

import pytest

from spyke_lora import CheckpointSaved, StepEnded, Stop, TrainEnded, TrainStarted, ValidationEnded

EVENTS = [
    TrainStarted(920, "mps", "no", Path("/loras/spyke")),
    StepEnded(1, 920, 1, 0.25, 0.25, 1e-4, 5e-5, 3.5),
    CheckpointSaved(200, 1, Path("/loras/spyke/spyke_plasma_v1-step00000200.safetensors"), False),
    ValidationEnded(200, 1, 0.1312, 0.0104),
    TrainEnded("completed", 920, Path("/loras/spyke/spyke_plasma_v1.safetensors")),
    Stop("loss is NaN"),
]


@pytest.mark.parametrize("event", EVENTS, ids=lambda e: type(e).__name__)
def test_events_are_frozen_plain_data_that_pickles(event):
    assert pickle.loads(pickle.dumps(event)) == event
    with pytest.raises(dataclasses.FrozenInstanceError):
        event.__setattr__(dataclasses.fields(event)[0].name, None)
    for field in dataclasses.fields(event):
        assert isinstance(getattr(event, field.name), (int, float, str, bool, Path, type(None)))
