"""LLM path of sdpo-lab: SDPO, GRPO and hybrid on real transformers, using ``sdpo_sim.core.losses``."""
