"""The ready-made callbacks refuse a wrong setting with the library's own error, naming the value and a fix."""

import pytest

from spyke_lora import ConfigError, SpykeLoraError, callbacks


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: callbacks.LiveLossChart(every=0), "`every` must be at least 1, got 0; try LiveLossChart(every=10)"),
        (lambda: callbacks.StopAfter(), "give `steps`, `seconds` or both, got neither; try StopAfter(500)"),
        (lambda: callbacks.StopAfter(0), "`steps` must be at least 1, got 0; try StopAfter(500)"),
        (
            lambda: callbacks.StopOnPlateau(patience=0),
            "`patience` must be at least 1, got 0; try StopOnPlateau(patience=100)",
        ),
    ],
    ids=["LiveLossChart-every", "StopAfter-nothing", "StopAfter-steps", "StopOnPlateau-patience"],
)
def test_a_wrong_setting_is_a_config_error(make, message):
    with pytest.raises(ConfigError) as info:
        make()
    assert info.value.problems[0].startswith(message)
    assert isinstance(info.value, SpykeLoraError) and isinstance(info.value, ValueError)  # ValueError as before
