"""Test harness (run under torchrun with ``DS_ACCELERATOR=cpu``): train a recipe under DeepSpeed ZeRO-3 on CPU/gloo
through accelerate, as ``accelerate launch --config_file llm/accelerate/deepspeed_zero3.yaml`` would on GPUs, and
record what the EMA teacher did at every update, from every rank, for tests/test_llm_distributed.py:

- ``teacher-{rank}.json``: per update, the largest error of ``θ_T ← θ_T + r·(θ − θ_T)`` (θ: the engine's float32
  master partition) over its fp32 bound, the fraction of entries the update moved, and the fraction a bfloat16 copy
  would have moved; the dtypes of the partitions, of the teacher copy and of the master;
- the teacher forward's parameters, gathered inside ``Teacher.swapped_in`` and compared with the gathered
  float32 copy rounded to the parameters' dtype, and the student's values after the swap compared with before.

Usage: ``torchrun --nproc_per_node 2 tests/deepspeed_cpu_run.py RECIPE.yaml OUT_DIR [precision]`` (precision:
accelerate's mixed_precision, ``bf16`` by default).
"""

import json
import os
import sys
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from accelerate import Accelerator, PartialState
from accelerate.utils import DeepSpeedPlugin

from llm.recipe import load_recipe
from llm.teacher_weights import local_tensor, master_tensor, trainable_named_parameters
from llm.trainer import Trainer

EPS32 = torch.finfo(torch.float32).eps


def gathered(param: torch.Tensor) -> torch.Tensor:
    """The full value of a ZeRO-3 parameter (every rank takes part)."""
    with deepspeed.zero.GatheredParameters([param]):
        return param.data.detach().clone()


def full_copy(part: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """The full tensor of ``param``'s shape from every rank's flat partition ``part`` (ZeRO-3 pads the last one)."""
    parts = [torch.empty_like(part) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, part.contiguous())
    return torch.cat(parts)[: param.ds_numel].view(param.ds_shape)


def record(trainer: Trainer, out: Path) -> None:
    """Wrap the teacher's update and swap to check them at every use (results written by :func:`write`)."""
    teacher, rank, log = trainer.teacher, dist.get_rank(), {"updates": [], "swaps": []}
    update, swapped_in = teacher.update, teacher.swapped_in
    params = dict(trainable_named_parameters(trainer.unwrapped))
    log["dtypes"] = {"partition": str(local_tensor(next(iter(params.values()))).dtype),
                     "copy": sorted({str(w.dtype) for w in teacher.weights.values()}),
                     "master": str(master_tensor(next(iter(params.values()))).dtype),
                     "persistent": sum(bool(getattr(p, "ds_persist", False)) for p in params.values())}

    def checked_update(model):
        before = {n: w.clone() for n, w in teacher.weights.items()}
        student = {n: master_tensor(params[n]).detach().clone() for n in teacher.weights}
        update(model)
        r, worst, moved, moved16, total = teacher.rate, 0.0, 0, 0, 0
        for n, w in teacher.weights.items():
            t0, th = before[n].double(), student[n].double()
            want = t0 + r * (th - t0)
            # lerp in float32 rounds three times (θ − θ_T, r·(…), the sum): |error| ≤ eps·(|want| + r·|θ − θ_T|)
            bound = EPS32 * (want.abs() + r * (th - t0).abs())
            worst = max(worst, float(((w.double() - want).abs() / bound.clamp(min=1e-30)).max()))
            moved += int((w != before[n]).sum())
            bf16 = before[n].bfloat16()
            moved16 += int((bf16.lerp(student[n].bfloat16(), r) != bf16).sum())
            total += w.numel()
        log["updates"].append({"worst_over_bound": worst, "moved": moved / total, "moved_if_bf16": moved16 / total})

    def checked_swap(model):
        outer = swapped_in(model)

        class Checked:
            def __enter__(self):
                self.before = {n: local_tensor(params[n]).clone() for n in teacher.weights}
                outer.__enter__()
                diff = 0.0
                for n in teacher.weights:  # the parameters hold the float32 copy rounded to their dtype
                    full, want = gathered(params[n]), full_copy(teacher.weights[n], params[n])
                    diff = max(diff, float((full.float() - want.to(full.dtype).float()).abs().max()))
                self.diff = diff

            def __exit__(self, *exc):
                outer.__exit__(*exc)
                back = all(torch.equal(local_tensor(params[n]), self.before[n]) for n in teacher.weights)
                log["swaps"].append({"teacher_vs_params": self.diff, "student_restored": back})
                return False

        return Checked()

    teacher.update, teacher.swapped_in = checked_update, checked_swap
    trainer._teacher_log = (log, out / f"teacher-{rank}.json")


def write(trainer: Trainer) -> None:
    log, path = trainer._teacher_log
    log["engine_steps"] = int(trainer.model.global_steps)
    path.write_text(json.dumps(log, indent=1))


if __name__ == "__main__":
    recipe_path, out = sys.argv[1], Path(sys.argv[2])
    precision = sys.argv[3] if len(sys.argv) > 3 else "bf16"
    # accelerate selects DeepSpeed only off its cpu mode, and then finds no backend on a CPU-only machine: name gloo
    PartialState(cpu=False, backend="gloo")
    plugin = DeepSpeedPlugin(zero_stage=3, gradient_clipping=1.0, zero3_init_flag=True, zero3_save_16bit_model=True)  # as llm/accelerate/deepspeed_zero3.yaml
    trainer = Trainer(load_recipe(recipe_path), accelerator=Accelerator(cpu=False, deepspeed_plugin=plugin, mixed_precision=precision))
    record(trainer, out)
    trainer.train()
    write(trainer)
    trainer.acc.wait_for_everyone()  # both ranks are done before either tears its process group down
    dist.destroy_process_group()
    # Everything is reported through files, written and closed by now. Skip the interpreter's and C++'s static
    # teardown, where a gloo rank sometimes aborts ('terminate called without an active exception') after its work is done.
    sys.stdout.flush(), sys.stderr.flush()
    os._exit(0)
