"""The shared core of sdpo-lab: what the toy world and the LLM path both use, written once.

- :mod:`sdpo_sim.core.losses`: the loss library (divergences, SDPO token loss, fused chunked loss, group
  advantages, clipped policy gradient, aggregation, importance truncation, the hybrid and its controllers);
- :mod:`sdpo_sim.core.method`: :class:`MethodConfig`, one description of a method for both worlds;
- :mod:`sdpo_sim.core.io`: atomic writes and up-front checks of output places;
- :mod:`sdpo_sim.core.cli_args`: the one-line argument parser both command lines use;
- :mod:`sdpo_sim.core.validation`: the field checks of every settings dataclass (one-line ``owner.field=value`` errors);
- :mod:`sdpo_sim.core.config_fields`: settings dataclasses' field help → per-field flags, ``--set KEY=VALUE`` and docs tables.

Pure Python and torch: it imports nothing from the toy world (``sdpo_sim.*`` outside ``core``) or from ``llm``
(``tests/test_architecture.py`` checks it).
"""
