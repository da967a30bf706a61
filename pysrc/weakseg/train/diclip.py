"""DiCLIP's single-stage training (``weakseg train diclip``; specs/diclip.md §0, §3c, §5).

Every iteration, on a batch of augmented crops (random rescale in [0.5, 2], horizontal flip, crop to
the method's ``size`` with the padding ignored):

1. the SD pass and the VCE-enhanced CLIP forward of the DiCLIP segmenter (frozen, no gradients);
2. the adapter's logits on the token features and the head's logits + ``attn_pred`` on the frozen
   original-path CLIP layers (the two trained parts);
3. pseudo labels (no gradients): the dynamic CAM (``cam_source`` "dynamic" from ``dynamic_from``, the
   static one before it) -> CAA (0.79, gated by the head's ``attn_pred`` from ``caa_seg_from``) -> SD
   walk (5 steps) -> bg = 1 − max -> argmax; padding = 255;
4. loss = 1.0 · balanced CE(head) + 0.1 · affinity(attn_pred) + 0.1 · balanced CE(adapter), against the
   same pseudo labels (``adapter_target="static"``: the adapter learns from the static CAM's labels,
   the paper's Eq. 14);
5. AdamW (wd 0.01, betas 0.9/0.999) with the poly-warmup schedule: base lr 2e-4 × 10 for both trained
   groups, 50 warmup iterations from ratio 1e-6, poly power 1.

Determinism and resume: the data order (one permutation per epoch), the augmentation, the SD noise and
dropout all come from generators seeded by (seed, iteration, rank), so a run resumed from a checkpoint
continues exactly as the uninterrupted run would (bit for bit on the CPU; ``log.jsonl`` is cut back to the
checkpoint's step). Checkpoints (``last.safetensors``: weights, AdamW state, the iteration, the data
position and the global random streams; ``model.safetensors`` at the end: weights only) are safetensors
with JSON metadata, written atomically by rank 0. Under ``torchrun`` (WORLD_SIZE > 1) the trained parts run in
DistributedDataParallel (NCCL on CUDA, Gloo on the CPU) and each rank takes its share of the batch
order; the effective batch is ``batch_size × world_size``.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from weakseg.core import TRAINERS, is_int
from weakseg.train.common import (TrainOptions, after_step, dist_context, finish_training, load_checkpoint,
                                  save_checkpoint, seeded_generator, truncate_log)

__all__ = ["DiCLIPTrainConfig", "train_diclip", "lr_at", "augment", "CHECKPOINT_FORMAT", "DiCLIPTrainable"]

CHECKPOINT_FORMAT = "weakseg-diclip-checkpoint"
IMAGENET_MEAN_RGB = (124, 116, 104)


@dataclass
class DiCLIPTrainConfig(TrainOptions):
    """Training options (defaults: the code's VOC run; COCO: lr 1e-4, 100k iterations, warmup 200,
    caa_threshold 0.88, walk_steps 10, caa_seg_from 40000, dynamic_from 60000).

    iterations / batch_size / lr / lr_mult / weight_decay / betas / warmup_iters / warmup_ratio / power:
    20000, 4, 2e-4, ×10 for the adapter and head, 0.01, (0.9, 0.999), 50, 1e-6, 1.0.
    scale_range / flip: the augmentation; crops have the method's ``size``.
    seg_weight / aff_weight / dyn_weight: 1.0 / 0.1 / 0.1. aff_radius: 8.
    caa_threshold / walk_steps: the pseudo-label pipeline (0.79, 5). refine: its steps ("caa", "walk";
    "par" as an option, the paper's PAR refinement). caa_seg_from: the iteration from
    which the head's attn_pred gates the CAA affinity (4000). dynamic_from: the iteration from which the
    pseudo labels come from the dynamic CAM (0 for VOC). adapter_target: "dynamic" (the code) or
    "static" (the paper). save_every / log_every: iterations between checkpoints / log lines.
    max_images: use only the first N dataset items. seed: the run's seed.
    """

    iterations: int = 20000
    batch_size: int = 4
    lr: float = 2e-4
    lr_mult: float = 10.0
    weight_decay: float = 0.01
    betas: tuple = (0.9, 0.999)
    warmup_iters: int = 50
    warmup_ratio: float = 1e-6
    power: float = 1.0
    scale_range: tuple = (0.5, 2.0)
    flip: bool = True
    seg_weight: float = 1.0
    aff_weight: float = 0.1
    dyn_weight: float = 0.1
    aff_radius: int = 8
    caa_threshold: float = 0.79
    walk_steps: int = 5
    caa_seg_from: int = 4000
    dynamic_from: int = 0
    adapter_target: str = "dynamic"
    refine: tuple = ("caa", "walk")
    save_every: int = 1000
    log_every: int = 50
    max_images: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        self.betas = tuple(float(b) for b in self.betas)
        self.scale_range = tuple(float(s) for s in self.scale_range)
        self.refine = tuple(self.refine)
        if any(st not in ("caa", "walk", "par") for st in self.refine):
            raise ValueError(f"DiCLIPTrainConfig.refine: expected steps from caa, walk, par, got {self.refine!r}")
        for n in ("iterations", "batch_size", "save_every", "log_every"):
            v = getattr(self, n)
            if not is_int(v, 1):
                raise ValueError(f"DiCLIPTrainConfig.{n}: expected an int >= 1, got {v!r}")
        if self.adapter_target not in ("dynamic", "static"):
            raise ValueError(f"DiCLIPTrainConfig.adapter_target: expected 'dynamic' or 'static', got "
                             f"{self.adapter_target!r}")
        if len(self.scale_range) != 2 or not 0 < self.scale_range[0] <= self.scale_range[1]:
            raise ValueError(f"DiCLIPTrainConfig.scale_range: expected (lo, hi) with 0 < lo <= hi, got "
                             f"{self.scale_range}")
        if not self.lr > 0:
            raise ValueError(f"DiCLIPTrainConfig.lr: expected a number > 0, got {self.lr!r}")



def lr_at(step: int, base: float, cfg: DiCLIPTrainConfig) -> float:
    """PolyWarmupAdamW's learning rate at ``step`` (0-based): linear warmup from ``warmup_ratio`` over
    ``warmup_iters``, then (1 − step / iterations) ** power."""
    if step < cfg.warmup_iters:
        return base * (1 - (1 - step / cfg.warmup_iters) * (1 - cfg.warmup_ratio))
    if step < cfg.iterations:
        return base * (1 - step / cfg.iterations) ** cfg.power
    return 0.0


def augment(image: torch.Tensor, crop: int, scale_range=(0.5, 2.0), flip: bool = True,
            generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """RGB uint8 (3, H, W) -> (crop (3, crop, crop) uint8, valid (crop, crop) bool): random rescale in
    ``scale_range``, random horizontal flip, padding with the ImageNet mean colour to at least
    ``crop``, random crop."""
    g = generator
    lo, hi = scale_range
    s = lo + (hi - lo) * float(torch.rand((), generator=g))
    H, W = image.shape[-2:]
    h, w = max(1, round(H * s)), max(1, round(W * s))
    x = F.interpolate(image[None].float(), size=(h, w), mode="bilinear", align_corners=False)[0]
    if flip and float(torch.rand((), generator=g)) < 0.5:
        x = x.flip(-1)
    ph, pw = max(crop, h), max(crop, w)
    canvas = torch.tensor(IMAGENET_MEAN_RGB, dtype=torch.float32)[:, None, None].expand(3, ph, pw).clone()
    valid = torch.zeros(ph, pw, dtype=torch.bool)
    oy = int(torch.randint(0, ph - h + 1, (), generator=g))
    ox = int(torch.randint(0, pw - w + 1, (), generator=g))
    canvas[:, oy:oy + h, ox:ox + w] = x
    valid[oy:oy + h, ox:ox + w] = True
    cy = int(torch.randint(0, ph - crop + 1, (), generator=g))
    cx = int(torch.randint(0, pw - crop + 1, (), generator=g))
    out = canvas[:, cy:cy + crop, cx:cx + crop].round().clamp(0, 255).to(torch.uint8)
    return out, valid[cy:cy + crop, cx:cx + crop]


class DiCLIPTrainable(nn.Module):
    """The trained parts in one module (what DDP wraps): ``adapter`` and ``head``."""

    def __init__(self, adapter: nn.Module, head: nn.Module):
        super().__init__()
        self.adapter = adapter
        self.head = head

    def forward(self, tokens: torch.Tensor, layers: Sequence[torch.Tensor], grid: tuple[int, int]):
        return self.adapter(tokens), *self.head(layers, grid)


def _arch(method, cache, trainable: DiCLIPTrainable) -> dict[str, Any]:
    cfg = method.config
    return {"adapter_keys": cache.num_keys, "adapter_prompts": cfg.adapter_prompts,
            "adapter_dropout": cfg.adapter_dropout, "head_in_width": method.clip.width,
            "head_layers": method.clip.num_layers, "head_dim": cfg.head_dim, "head_blocks": cfg.head_blocks,
            "head_heads": cfg.head_heads, "head_dropout": cfg.head_dropout, "embed_dim": method.clip.embed_dim}


def train_diclip(method, dataset, class_names: Sequence[str], out_dir: str | os.PathLike,
                 config: DiCLIPTrainConfig | None = None, resume: bool = True, progress: bool = True,
                 stop_after: int | None = None) -> dict[str, Any]:
    """Train the adapter and head of ``method`` (a DiCLIP segmenter with a ``cache``) on ``dataset``
    (items with ``image`` uint8 (3, H, W) and ``image_labels`` class ids) for ``class_names``
    (background first). Writes ``out_dir/last.safetensors`` (resumable) and, when the last iteration is
    done, ``out_dir/model.safetensors``. ``stop_after``: stop (checkpointed) after that many iterations
    of this call (tests of resume). Returns {"step", "losses" (per iteration of this call), "model"}."""
    from tqdm.auto import tqdm

    from weakseg.methods.common import has_background
    from weakseg.methods.diclip.modules import KVAdapter, SegHead, affinity_labels, affinity_loss, balanced_seg_loss

    cfg = config or DiCLIPTrainConfig()
    names = [str(c) for c in class_names]
    if not has_background(names) or len(names) < 2:
        raise ValueError(f"class_names: DiCLIP trains with the background first and at least one class, got {names}")
    if method.cache is None:
        raise ValueError("DiCLIPConfig.cache: training needs the key-value cache (it initialises the adapter); build "
                         "one with `weakseg cache build`")
    method.cache.check(names, method.clip.embed_dim)
    n = len(dataset) if cfg.max_images is None else min(cfg.max_images, len(dataset))
    if n < 1:
        raise ValueError("dataset: expected at least one training image")
    rank, world, use_dist = dist_context()
    device = torch.device(method.config.device)
    mcfg = method.config
    cache = method.cache
    C1 = len(names)
    adapter = KVAdapter(cache.keys, cache.values, prompts=mcfg.adapter_prompts, dropout=mcfg.adapter_dropout,
                        zero_bias=mcfg.adapter_zero_bias,
                        fc2_values=cache.text_weights if mcfg.adapter_text_values else None, seed=cfg.seed)
    head = SegHead(method.clip.width, method.clip.num_layers, C1, dim=mcfg.head_dim, blocks=mcfg.head_blocks,
                   heads=mcfg.head_heads, dropout=mcfg.head_dropout, seed=cfg.seed + 1)
    module = DiCLIPTrainable(adapter, head).to(device)
    base = cfg.lr * cfg.lr_mult
    optimizer = torch.optim.AdamW([{"params": list(adapter.parameters())}, {"params": list(head.parameters())}],
                                  lr=base, betas=cfg.betas, weight_decay=cfg.weight_decay, eps=1e-8)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    last = out / "last.safetensors"
    meta = {"class_names": names, "arch": _arch(method, cache, module), "train_config": asdict(cfg),
            "method_config": method.config.to_dict()}
    B = cfg.batch_size
    step = position = 0  # iterations done, positions of the data stream consumed (all ranks)
    if resume and last.exists():
        info = load_checkpoint(last, module, optimizer, CHECKPOINT_FORMAT)
        if info.get("class_names") != names or info.get("arch") != meta["arch"]:
            raise ValueError(f"checkpoint {str(last)!r} was written for other classes or another architecture; "
                             f"use another out_dir or resume=False")
        step = info["step"]
        position = info.get("position", step * world * B)
    start, first = step, position
    log = out / "log.jsonl"
    if rank == 0:
        truncate_log(log, step)
    ddp = module
    if use_dist and world > 1:
        from torch.nn.parallel import DistributedDataParallel

        ddp = DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)
    S = mcfg.size
    losses: list[dict[str, float]] = []
    end = cfg.iterations if stop_after is None else min(cfg.iterations, step + int(stop_after))
    bar = tqdm(total=cfg.iterations, initial=step, desc="train diclip", disable=not progress or rank != 0)
    perm_cache: dict[int, torch.Tensor] = {}
    while step < end:
        # ---- the batch: positions [step·B·world + rank·B, +B) of the epoch permutations (counted from the
        # checkpoint's data position)
        batch, valid, labels = [], [], []
        for j in range(B):
            pos = first + ((step - start) * world + rank) * B + j
            epoch, at = divmod(pos, n)
            if epoch not in perm_cache:
                perm_cache.clear()
                perm_cache[epoch] = torch.randperm(n, generator=seeded_generator(cfg.seed, 17, epoch))
            smp = dataset[int(perm_cache[epoch][at])]
            img, ok = augment(smp.image, S, cfg.scale_range, cfg.flip, seeded_generator(cfg.seed, 23, step, rank, j))
            batch.append(img)
            valid.append(ok)
            labels.append([int(c) for c in smp.image_labels])
        sized = torch.stack(batch)
        allowed = torch.zeros(len(batch), C1 - 1, dtype=torch.bool)
        for b, ls in enumerate(labels):
            for c in ls:
                if 0 < c < C1:
                    allowed[b, c - 1] = True
        for g in optimizer.param_groups:
            g["lr"] = lr_at(step, base, cfg)
        torch.manual_seed(int(seeded_generator(cfg.seed, 29, step, rank).initial_seed()))  # dropout
        fwd = method.forward(sized, vce=mcfg.vce, need_sd=True, generator=seeded_generator(cfg.seed, 31, step, rank),
                             return_attn=True, return_layers=True)
        module.train()
        ad_logits, seg_logits, attn_pred = ddp(fwd.feats[:, 1:].to(device), [x.to(device) for x in fwd.out.layers],
                                               fwd.grid)
        with torch.no_grad():
            source = "dynamic" if step >= cfg.dynamic_from else "static"
            seg_attn = attn_pred.detach() if step >= cfg.caa_seg_from else None

            def pseudo(src):
                cams = method.cams(fwd, names, src, adapter_logits=ad_logits.detach())
                maps = method.refine_maps(cams, fwd, allowed, sized, steps=cfg.refine,
                                          caa_threshold=cfg.caa_threshold, walk_steps=cfg.walk_steps,
                                          seg_attn=seg_attn)
                _, lab = method.labels_from_maps(maps, allowed, names, (S, S))
                return lab.masked_fill(~torch.stack(valid), 255).to(device)

            plabels = pseudo(source)
            alabels = plabels if cfg.adapter_target == "dynamic" or source == "static" else pseudo("static")
            aff_lab = affinity_labels(plabels, fwd.grid, cfg.aff_radius)
        h, w = fwd.grid
        ad_maps = ad_logits.transpose(1, 2).reshape(len(batch), C1, h, w)
        seg_loss = balanced_seg_loss(F.interpolate(seg_logits, size=(S, S), mode="bilinear", align_corners=False),
                                     plabels)
        aff_loss = affinity_loss(attn_pred, aff_lab)
        dyn_loss = balanced_seg_loss(F.interpolate(ad_maps, size=(S, S), mode="bilinear", align_corners=False), alabels)
        loss = cfg.seg_weight * seg_loss + cfg.aff_weight * aff_loss + cfg.dyn_weight * dyn_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        position = first + (step - start) * world * B
        rec = {"step": step, "loss": float(loss.detach()), "seg": float(seg_loss.detach()),
               "aff": float(aff_loss.detach()), "dyn": float(dyn_loss.detach()), "lr": optimizer.param_groups[0]["lr"]}
        losses.append(rec)
        after_step(rec, step, end, cfg, rank, log, bar,
                   lambda: save_checkpoint(last, module, optimizer, {**meta, "step": step, "position": position},
                                           CHECKPOINT_FORMAT))
    bar.close()
    model_path = finish_training(out, step, cfg.iterations, rank, use_dist, world,
                                 lambda p: save_checkpoint(p, module, None, {**meta, "step": step}, CHECKPOINT_FORMAT))
    module.eval()
    method.adapter, method.head, method.head_classes = module.adapter.eval(), module.head.eval(), names
    return {"step": step, "losses": losses, "model": str(model_path) if model_path else None,
            "checkpoint": str(last)}


# ----------------------------------------------------------------------------------------- command line
def _command(args) -> int:
    import json

    import weakseg
    from weakseg.core import parse_set_options
    from weakseg.eval.arguments import check_out_dir, open_train_dataset

    check_out_dir(args.out)
    sets = list(args.set or ())
    if args.cache:
        sets.append(f"cache={args.cache}")
    dataset = open_train_dataset(args.dataset, args.root, args.split, args.limit)  # before the model loads
    method = weakseg.create("diclip", config_file=args.config, set_options=sets)
    cfg = DiCLIPTrainConfig.from_dict(parse_set_options(args.train or (), DiCLIPTrainConfig))
    res = train_diclip(method, dataset, list(dataset.class_names), args.out, cfg, resume=not args.no_resume,
                       progress=not args.quiet)
    last = res["losses"][-1] if res["losses"] else {}
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun only rank 0 reports
        return 0
    print(json.dumps({"out": args.out, "step": res["step"], "model": res["model"], "checkpoint": res["checkpoint"],
                      "last": last}, indent=2))
    return 0


@TRAINERS.register("diclip")
def add_parser(sub) -> None:
    """``weakseg train diclip``."""
    s = sub.add_parser("diclip", help="DiCLIP's single-stage training (adapter + segmentation head)")
    s.add_argument("--dataset", required=True, help="voc, coco_object, ..., or toyworld")
    s.add_argument("--root", default=None, help="dataset root directory (not needed for toyworld)")
    s.add_argument("--split", default=None, help="split (default: train; VOC: train_aug)")
    s.add_argument("--limit", type=int, default=None, help="toyworld: number of scenes (default 1000)")
    s.add_argument("--cache", default=None, help="the key-value cache (weakseg cache build)")
    s.add_argument("--out", required=True, help="output directory (checkpoints, log)")
    s.add_argument("--config", default=None, help="a TOML/YAML/JSON file of DiCLIP options")
    s.add_argument("--set", nargs="*", default=None, metavar="KEY=VALUE", help="DiCLIP options (e.g. preset=voc)")
    s.add_argument("--train", nargs="*", default=None, metavar="KEY=VALUE",
                   help="training options (iterations, batch_size, lr, ...; see DiCLIPTrainConfig)")
    s.add_argument("--no-resume", action="store_true", help="start over even if out/last.safetensors exists")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=_command)
