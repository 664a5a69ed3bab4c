"""Measuring importance: calibration passes and trial runners (``calibration``), the metric protocol
(``metrics``), streaming for models larger than memory (``streaming``), the step-by-step API (``api``) and the
built-in metrics plugin (``builtin_metrics``).

Layer: may import ``io`` and everything below it.
"""
