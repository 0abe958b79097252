"""Robust linear heads on cached features (GroupDRO, JTT, AFR, class-balanced; the label-free DFR lives with DFR).

Each module is its own built-in plugin; all are :class:`~clip_robust_plugins.LinearHead`
subclasses fitted with the full-batch solvers of :mod:`.solver`.  Protocols and deviations:
``docs/methods/<name>.md``.
"""
