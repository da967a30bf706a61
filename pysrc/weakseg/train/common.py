"""What every training loop shares: strict option parsing, seeded generators, the torchrun context,
and model + optimizer checkpoints in safetensors (atomic writes, JSON metadata)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch

from weakseg.core import WeightsFileError, check_weights, is_int, read_safetensors_file
from weakseg.distributed import dist_context
from weakseg.io import save_safetensors, write_text

__all__ = ["TrainOptions", "seeded_generator", "dist_context", "save_checkpoint", "load_checkpoint", "truncate_log",
           "after_step", "finish_training"]


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


def _rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The process-wide random streams -> (tensors ``rng.*``, JSON metadata): torch's CPU generator, every
    CUDA device's generator (once CUDA is initialised), Python's ``random`` and numpy's global generator."""
    import random

    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, st in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = st
    version, words, gauss = random.getstate()
    tensors["rng.python"] = torch.tensor(words, dtype=torch.int64)
    meta: dict[str, Any] = {"python": [version, gauss]}
    try:
        import numpy as np
    except ImportError:
        return tensors, meta
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors["rng.numpy"] = torch.from_numpy(keys.astype(np.int64))
    meta["numpy"] = [kind, int(pos), int(has_gauss), float(cached)]
    return tensors, meta


def _set_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Restore what :func:`_rng_state` saved (CUDA devices this process has, numpy when installed)."""
    import random

    torch.set_rng_state(tensors["rng.torch"])
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            if f"rng.cuda.{i}" in tensors:
                torch.cuda.set_rng_state(tensors[f"rng.cuda.{i}"], i)
    version, gauss = meta["python"]
    random.setstate((version, tuple(int(x) for x in tensors["rng.python"].tolist()), gauss))
    if "rng.numpy" in tensors:
        try:
            import numpy as np
        except ImportError:
            return
        kind, pos, has_gauss, cached = meta["numpy"]
        np.random.set_state((kind, tensors["rng.numpy"].numpy().astype(np.uint32), pos, has_gauss, cached))


def save_checkpoint(path: Path, module: torch.nn.Module, optimizer, meta: dict[str, Any], fmt: str,
                    scaler=None) -> None:
    """``module``'s state in one safetensors file, ``meta`` values JSON-encoded in its header next to
    ``format`` = ``fmt``; written atomically. With an ``optimizer`` (a resumable checkpoint) also its
    per-parameter state (``optim.<i>.<name>``, in the state's own dtype), the process-wide random streams
    (``rng.*``, see :func:`_rng_state`) and the fp16 loss ``scaler``'s state, if any."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    meta = dict(meta)
    if optimizer is not None:
        for i, st in optimizer.state_dict()["state"].items():
            for name, v in st.items():
                t = v if isinstance(v, torch.Tensor) else torch.tensor(float(v))
                tensors[f"optim.{i}.{name}"] = t.detach().cpu().contiguous()
        rng, meta["rng"] = _rng_state()
        tensors.update({k: v.cpu().contiguous() for k, v in rng.items()})
        if scaler is not None:
            meta["scaler"] = scaler.state_dict()
    md = {"format": fmt, **{k: json.dumps(v, default=str) for k, v in meta.items()}}
    save_safetensors(tensors, path, metadata=md)


def _optimizer_template(optimizer) -> dict[str, torch.Tensor]:
    """``optim.<i>.<name>`` -> a tensor of the wanted shape / dtype for every state entry an Adam / AdamW
    ``optimizer`` keeps per trainable parameter after its first step."""
    if not isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        raise TypeError(f"load_checkpoint: checks the state of Adam / AdamW optimizers, got {type(optimizer).__name__}")
    out: dict[str, torch.Tensor] = {}
    step_dtype = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32  # as torch.optim
    i = 0
    for group in optimizer.param_groups:
        names = ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if group.get("amsgrad") else ())
        for p in group["params"]:
            if p.requires_grad:
                out[f"optim.{i}.step"] = torch.empty((), dtype=step_dtype, device="meta")
                for n in names:
                    out[f"optim.{i}.{n}"] = torch.empty(p.shape, dtype=p.dtype, device="meta")
            i += 1
    return out


def load_checkpoint(path: Path, module: torch.nn.Module, optimizer, fmt: str,
                    arch: dict[str, Any] | None = None, scaler=None) -> dict[str, Any]:
    """Load what :func:`save_checkpoint` wrote into ``module`` (and, given an ``optimizer``, its state, the
    random streams and the ``scaler``'s state); returns the decoded metadata. Raises ValueError for an
    unreadable file, another ``format``, (when ``arch`` is given) a checkpoint whose ``arch`` entry differs,
    and :class:`~weakseg.core.WeightsFileError` for tensors that do not fit ``module`` / ``optimizer``
    (missing, renamed or extra entries, a wrong shape or dtype, NaN / Inf)."""
    tensors, info = read_safetensors_file(path, (fmt,), "checkpoint")
    if arch is not None and info.get("arch") != arch:
        raise ValueError(f"checkpoint {str(path)!r} was written for another architecture ({info.get('arch')}, this "
                         f"model: {arch}); use another out_dir or resume=False")
    expected = dict(module.state_dict())
    if optimizer is not None:
        # an optimizer without state is legitimate only when the fp16 scaler skipped every step so far
        if scaler is None or any(k.startswith("optim.") for k in tensors):
            expected.update(_optimizer_template(optimizer))
        if "rng" in info or any(k.startswith("rng.") for k in tensors):  # absent from older checkpoints only
            expected.update({k: v for k, v in tensors.items() if k.startswith("rng.cuda.")})
            expected["rng.torch"] = torch.get_rng_state()
            expected["rng.python"] = torch.empty(625, dtype=torch.int64, device="meta")
            if isinstance(info.get("rng"), dict) and "numpy" in info["rng"]:
                expected["rng.numpy"] = torch.empty(624, dtype=torch.int64, device="meta")
    else:
        tensors = {k: v for k, v in tensors.items() if not k.startswith(("optim.", "rng."))}
    hint = "use another out_dir or resume=False (--no-resume)"
    check_weights(tensors, expected, path, "checkpoint", hint)
    negative = [k for k, v in tensors.items() if k.startswith("optim.") and k.endswith("exp_avg_sq")
                and bool((v < 0).any())]
    if negative:
        raise WeightsFileError(f"checkpoint: {str(path)!r} tensor {negative[0]!r} (a second-moment estimate) holds "
                               f"negative values; {hint}")
    for key in ("step", "position"):  # the iterations done and the data position (not in older checkpoints)
        v = info.get(key, 0 if key == "position" else None)
        if optimizer is not None and not is_int(v, 0):
            raise WeightsFileError(f"checkpoint: {str(path)!r} has {key}={v!r} in its metadata, expected an integer "
                                   f">= 0; {hint}")
    module.load_state_dict({k: v for k, v in tensors.items() if not k.startswith(("optim.", "rng."))})
    if optimizer is not None:
        sd = optimizer.state_dict()
        state: dict[int, dict[str, torch.Tensor]] = {}
        for k, v in tensors.items():
            if k.startswith("optim."):
                _, i, name = k.split(".", 2)
                state.setdefault(int(i), {})[name] = v
        sd["state"] = state
        optimizer.load_state_dict(sd)
        try:
            if scaler is not None and info.get("scaler"):
                scaler.load_state_dict(info["scaler"])
            if "rng.torch" in tensors:
                _set_rng_state(tensors, info["rng"])
        except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as e:
            raise WeightsFileError(f"checkpoint: {str(path)!r} holds a malformed random-stream or loss-scaler state "
                                   f"({type(e).__name__}: {e}); {hint}") from None
    return info


def truncate_log(log_path: Path, step: int) -> None:
    """Keep the lines of the JSON-lines log ``log_path`` up to ``step`` (the checkpoint a run resumes from;
    0 = a fresh start empties it), so a resumed run does not repeat the steps logged after its checkpoint;
    rewritten atomically."""
    if not log_path.exists():
        return
    keep = []
    for line in log_path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:  # a line cut by a kill mid-write
            continue
        if isinstance(rec, dict) and isinstance(rec.get("step"), int) and rec["step"] <= step:
            keep.append(line + "\n")
    write_text(log_path, "".join(keep))


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
