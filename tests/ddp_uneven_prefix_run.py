"""Test harness (run under torchrun, 2 ranks): the Trainer's DDP model with a shared-prefix plan on rank 0
and none on rank 1, so the ranks make different numbers of forward calls in every step (teacher forward
without gradient, student forward, backward, AdamW). When three such steps complete, each rank writes
``ok <rank>`` to its own file ``REPORT_DIR/rank-<rank>.txt`` (ranks printing to one pipe interleave: "ok 1ok 0").
Usage: ``torchrun --nproc_per_node 2 tests/ddp_uneven_prefix_run.py RECIPE.yaml REPORT_DIR``.
"""

import os
import sys
from pathlib import Path

import torch

from llm.prefix import plan_shared_prefix
from llm.recipe import load_recipe
from llm.models import completion_outputs
from llm.trainer import Trainer

if __name__ == "__main__":
    trainer = Trainer(load_recipe(sys.argv[1]))
    rank, T = trainer.acc.process_index, 3
    g = torch.Generator().manual_seed(rank)
    prompts = torch.randint(4, 60, (2, 8), generator=g).repeat_interleave(2, 0) if rank == 0 else torch.randint(4, 60, (4, 8), generator=g)
    ids = torch.cat([prompts, torch.randint(4, 60, (4, T), generator=g)], 1)
    mask = torch.ones_like(ids)
    assert (plan_shared_prefix(ids, mask, T) is None) == (rank == 1)
    for _ in range(3):
        with torch.no_grad():
            teacher = completion_outputs(trainer.model, ids, mask, T, hidden=False, share_prefix=trainer.share_prefix)
        student = completion_outputs(trainer.model, ids, mask, T, hidden=False, share_prefix=trainer.share_prefix)
        trainer.acc.backward(((student - teacher - 1.0) ** 2).mean())
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)
    trainer.acc.wait_for_everyone()  # both ranks are done before either tears its process group down
    Path(sys.argv[2], f"rank-{rank}.txt").write_text(f"ok {rank}\n")
    # an explicit teardown: a rank leaving with gloo's threads alive aborted at exit ("terminate called without an
    # active exception", SIGABRT) in a fresh-clone run on a loaded machine
    torch.distributed.destroy_process_group()
    # Everything is reported through files, written and closed by now. Skip the interpreter's and C++'s static
    # teardown, where a gloo rank sometimes aborts ('terminate called without an active exception') after its work is done.
    sys.stdout.flush(), sys.stderr.flush()
    os._exit(0)
