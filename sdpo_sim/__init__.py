"""sdpo-lab: Self-Distillation Policy Optimization in an exact toy world and on real transformers."""

__version__ = "0.1.0"
