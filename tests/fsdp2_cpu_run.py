"""Test harness (run under torchrun): train a recipe with the student sharded by FSDP2 on CPU/gloo.

accelerate only applies FSDP on GPUs, so this harness does what its FSDP2 plugin does there —
``fully_shard`` on every decoder layer and on the root, optimiser built on the sharded parameters, and for a
bfloat16 recipe accelerate's ``mixed_precision: bf16`` policy (float32 shards, gathered and reduced in bfloat16) —
and hands the result to the real :class:`llm.trainer.Trainer`.
With ``--keep DIR`` it keeps every update's gathered pre-clip gradients and full weights there (see
``llm_helpers.keep_updates``), for a single-process run to follow.
Usage: ``torchrun --nproc_per_node 2 tests/fsdp2_cpu_run.py RECIPE.yaml [--resume] [--keep DIR]``.
"""

import os
import sys

import torch
from accelerate import Accelerator
from llm_helpers import keep_updates
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from llm.recipe import load_recipe
from llm.trainer import Trainer


class FSDP2CPUAccelerator(Accelerator):
    policy = MixedPrecisionPolicy()  # float32 recipe: accelerate's mixed_precision 'no'

    def prepare(self, model, optimizer):
        for layer in model.model.layers:
            fully_shard(layer, mp_policy=self.policy)
        fully_shard(model, mp_policy=self.policy)
        settings = {k: optimizer.defaults[k] for k in ("lr", "betas", "eps", "weight_decay")}
        return model, type(optimizer)([p for p in model.parameters() if p.requires_grad], **settings)


if __name__ == "__main__":
    recipe = load_recipe(sys.argv[1])
    if recipe.model.dtype == "bfloat16":  # what accelerate's FSDP2 plugin builds for mixed_precision: bf16
        bf16 = torch.bfloat16
        FSDP2CPUAccelerator.policy = MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=bf16, output_dtype=bf16)
    trainer = Trainer(recipe, accelerator=FSDP2CPUAccelerator(cpu=True))
    if "--keep" in sys.argv:
        keep_updates(trainer, sys.argv[sys.argv.index("--keep") + 1])
    trainer.train(resume="--resume" in sys.argv)
    trainer.acc.wait_for_everyone()  # both ranks are done before either tears its process group down
    torch.distributed.destroy_process_group()  # explicit teardown (see ddp_uneven_prefix_run.py)
    # Everything is reported through files, written and closed by now. Skip the interpreter's and C++'s static
    # teardown, where a gloo rank sometimes aborts ('terminate called without an active exception') after its work is done.
    sys.stdout.flush(), sys.stderr.flush()
    os._exit(0)
