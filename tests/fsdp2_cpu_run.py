"""Test harness (run under torchrun): train a recipe with the student sharded by FSDP2 on CPU/gloo.

accelerate only applies FSDP on GPUs, so this harness does what its FSDP2 plugin does there —
``fully_shard`` on every decoder layer and on the root, optimiser built on the sharded parameters —
and hands the result to the real :class:`llm.trainer.Trainer`.
With ``--keep DIR`` it keeps every update's gathered pre-clip gradients and full weights there (see
``llm_helpers.keep_updates``), for a single-process run to follow.
Usage: ``torchrun --nproc_per_node 2 tests/fsdp2_cpu_run.py RECIPE.yaml [--resume] [--keep DIR]``.
"""

import sys

import torch

from accelerate import Accelerator
from torch.distributed.fsdp import fully_shard

from llm.recipe import load_recipe
from llm.trainer import Trainer
from llm_helpers import keep_updates


class FSDP2CPUAccelerator(Accelerator):
    def prepare(self, model, optimizer):
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        settings = {k: optimizer.defaults[k] for k in ("lr", "betas", "eps", "weight_decay")}
        return model, type(optimizer)([p for p in model.parameters() if p.requires_grad], **settings)


if __name__ == "__main__":
    trainer = Trainer(load_recipe(sys.argv[1]), accelerator=FSDP2CPUAccelerator(cpu=True))
    if "--keep" in sys.argv:
        keep_updates(trainer, sys.argv[sys.argv.index("--keep") + 1])
    trainer.train(resume="--resume" in sys.argv)
    torch.distributed.destroy_process_group()  # explicit teardown (see ddp_uneven_prefix_run.py)
