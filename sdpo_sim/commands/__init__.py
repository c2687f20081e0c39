"""Subcommands of ``sdpo-sim``: one module each, registered in :mod:`sdpo_sim.cli`."""
