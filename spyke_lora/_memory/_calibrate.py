"""Moved: the fit and the calibration files are ``_memory/_fit.py`` (exported by ``spyke_lora._memory``), and
``calibrate()``, which trains, is the feature ``spyke_lora._calibrate``.

Kept only so that the modules that still import from here work until they import from ``spyke_lora._memory``
(``_doctor.py``, ``tests/integration/test_memory.py``, ``benchmarks/memory_model.py``, ``tests/device``); delete it
then. ``_shape`` is :func:`~._fit.point_shape`'s old name.
"""

from ._fit import calibration_path, fit, load_calibrations, point_shape, training_residual

_shape = point_shape

__all__ = ["calibration_path", "fit", "load_calibrations", "training_residual"]
