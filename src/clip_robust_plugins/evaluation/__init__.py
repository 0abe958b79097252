"""The pieces of ``eval`` that are not its stages: where a run goes and what its paths are
(:mod:`.routing`), the run context methods read (:mod:`.context`) and the results JSON
(:mod:`.record`).  The stages themselves, in order, are in :mod:`clip_robust_plugins.engine`."""
