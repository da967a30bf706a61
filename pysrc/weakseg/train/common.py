"""What every training loop shares: strict option parsing, seeded generators, the torchrun context,
and model + optimizer checkpoints in safetensors (atomic writes, JSON metadata)."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import torch

from weakseg.core import read_safetensors_file
from weakseg.io import save_safetensors

__all__ = ["TrainOptions", "seeded_generator", "dist_context", "save_checkpoint", "load_checkpoint", "after_step",
           "finish_training"]


class TrainOptions:
    """Mixin of the training-option dataclasses: ``from_dict`` refuses unknown names."""

    @classmethod
    def from_dict(cls, values: dict[str, Any]):
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown option(s) {', '.join(unknown)}; known: "
                             f"{', '.join(sorted(known))}")
        return cls(**values)


def seeded_generator(*parts: int) -> torch.Generator:
    """A CPU generator seeded from integers only (e.g. seed, stream, step, rank), so every random draw
    of a step is reproducible after a resume and independent of the number of workers."""
    x = 0
    for p in parts:
        x = (x * 1_000_003 + int(p) + 7) % (2 ** 62)
    return torch.Generator().manual_seed(x)


def dist_context() -> tuple[int, int, bool]:
    """(rank, world size, distributed?): initialises the process group under torchrun (WORLD_SIZE > 1;
    NCCL on CUDA, else Gloo)."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and dist.is_available() and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), True
    return 0, 1, False


def save_checkpoint(path: Path, module: torch.nn.Module, optimizer, meta: dict[str, Any], fmt: str) -> None:
    """``module``'s state and ``optimizer``'s per-parameter state (``optim.<i>.<name>``) in one safetensors
    file, ``meta`` values JSON-encoded in its header next to ``format`` = ``fmt``; written atomically."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    if optimizer is not None:
        for i, st in optimizer.state_dict()["state"].items():
            for name, v in st.items():
                t = v if isinstance(v, torch.Tensor) else torch.tensor(float(v))
                tensors[f"optim.{i}.{name}"] = t.detach().cpu().contiguous()
    md = {"format": fmt, **{k: json.dumps(v, default=str) for k, v in meta.items()}}
    save_safetensors(tensors, path, metadata=md)


def load_checkpoint(path: Path, module: torch.nn.Module, optimizer, fmt: str,
                    arch: dict[str, Any] | None = None) -> dict[str, Any]:
    """Load what :func:`save_checkpoint` wrote into ``module`` (and ``optimizer`` if given); returns the
    decoded metadata. Raises ValueError for an unreadable file, another ``format``, or (when ``arch`` is
    given) a checkpoint whose ``arch`` entry differs."""
    tensors, info = read_safetensors_file(path, (fmt,), "checkpoint")
    if arch is not None and info.get("arch") != arch:
        raise ValueError(f"checkpoint {str(path)!r} was written for another architecture ({info.get('arch')}, this "
                         f"model: {arch}); use another out_dir or resume=False")
    module.load_state_dict({k: v for k, v in tensors.items() if not k.startswith("optim.")})
    if optimizer is not None:
        sd = optimizer.state_dict()
        state: dict[int, dict[str, torch.Tensor]] = {}
        for k, v in tensors.items():
            if k.startswith("optim."):
                _, i, name = k.split(".", 2)
                state.setdefault(int(i), {})[name] = v
        sd["state"] = state
        optimizer.load_state_dict(sd)
    return info


def after_step(rec: dict[str, Any], step: int, end: int, cfg, rank: int, log_path: Path, bar, save) -> None:
    """The bookkeeping after optimisation step ``step`` (1-based) of a loop ending at ``end``: progress bar,
    a JSON line in ``log_path`` every ``cfg.log_every`` steps and at the end, and ``save()`` (the resumable
    checkpoint) every ``cfg.save_every`` steps and at the end; rank 0 only writes."""
    bar.update(1)
    bar.set_postfix(loss=f"{rec['loss']:.3f}")
    if rank == 0 and (step % cfg.log_every == 0 or step == end):
        with open(log_path, "a") as fh:
            fh.write(json.dumps(rec) + "\n")
    if rank == 0 and (step % cfg.save_every == 0 or step == end):
        save()


def finish_training(out: Path, step: int, iterations: int, rank: int, use_dist: bool, world: int,
                    save_model) -> Path | None:
    """After the loop: rank 0 writes the final model (``save_model(path)``) once all ``iterations`` are
    done; every rank waits for it under torchrun. Returns the model path, or None for an unfinished run."""
    model_path = Path(out) / "model.safetensors"
    if rank == 0 and step >= iterations:
        save_model(model_path)
    if use_dist and world > 1:
        import torch.distributed as dist

        dist.barrier()
    return model_path if step >= iterations else None
