"""Test harness (run under torchrun): train a recipe with the student replicated by DDP on CPU/gloo, keeping
every optimiser update's pre-clip gradients and the weights after it (see ``llm_helpers.keep_updates``), so a
single-process reference run can follow the same weights and compare gradients, not post-Adam weights.
Usage: ``torchrun --nproc_per_node 2 tests/ddp_cpu_run.py RECIPE.yaml KEEP_DIR``.
"""

import os
import sys

import torch
from llm_helpers import keep_updates

from llm.recipe import load_recipe
from llm.trainer import Trainer

if __name__ == "__main__":
    trainer = Trainer(load_recipe(sys.argv[1]))
    keep_updates(trainer, sys.argv[2])
    trainer.train()
    trainer.acc.wait_for_everyone()  # both ranks are done before either tears its process group down
    torch.distributed.destroy_process_group()  # explicit teardown (see ddp_uneven_prefix_run.py)
    # Everything is reported through files, written and closed by now. Skip the interpreter's and C++'s static
    # teardown, where a gloo rank sometimes aborts ('terminate called without an active exception') after its work is done.
    sys.stdout.flush(), sys.stderr.flush()
    os._exit(0)
