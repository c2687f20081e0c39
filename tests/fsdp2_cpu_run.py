"""Test harness (run under torchrun): train a recipe with the student sharded by FSDP2 on CPU/gloo.

accelerate only applies FSDP on GPUs, so this harness does what its FSDP2 plugin does there —
``fully_shard`` on every decoder layer and on the root, optimiser built on the sharded parameters —
and hands the result to the real :class:`llm.trainer.Trainer`.
Usage: ``torchrun --nproc_per_node 2 tests/fsdp2_cpu_run.py RECIPE.yaml [--resume]``.
"""

import sys

from accelerate import Accelerator
from torch.distributed.fsdp import fully_shard

from llm.recipe import load_recipe
from llm.trainer import Trainer


class FSDP2CPUAccelerator(Accelerator):
    def prepare(self, model, optimizer):
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        settings = {k: optimizer.defaults[k] for k in ("lr", "betas", "eps", "weight_decay")}
        return model, type(optimizer)([p for p in model.parameters() if p.requires_grad], **settings)


if __name__ == "__main__":
    trainer = Trainer(load_recipe(sys.argv[1]), accelerator=FSDP2CPUAccelerator(cpu=True))
    trainer.train(resume="--resume" in sys.argv)
