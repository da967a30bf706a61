"""SynSeg's training (``weakseg train synseg``; specs/synseg.md §4) and its toy-world demo.

Data: image-caption pairs (:mod:`weakseg.data.captions`: webdataset tar shards, an image/caption folder
or the toy world's captions). Each caption becomes its noun phrases (:mod:`weakseg.data.phrases`: spaCy
noun chunks with a NOUN token when a pipeline is installed, else the documented fallback; the
generic-phrase exclusion list; or a precomputed phrases file); images without a phrase are skipped, at
most ``k_max`` (4) phrases per image are kept (a random subset). Each phrase is one category; the text
embeddings ("a photo of a {}.") of all phrases are computed once before the first step, in sorted order.

One iteration, per image of the batch (random resized crop to the method's ``size`` + flip): the frozen
CLIP once (no gradients) -> the decoder on B·K rows (one per phrase, padded phrases masked) -> FSS
(fg / bg synergy vectors, projector) -> the four MCCL losses, weighted; AdamW (lr 1e-3, cosine to 1e-4,
weight decay 1e-4 [R]); bf16 autocast on CUDA by default. Paper: batch 256, 10,000 iterations, seed 42.

Determinism and resume: the data order (one permutation per epoch), the crops and the phrase subsets come
from generators seeded by (seed, position), so a resumed run sees exactly the batches of the uninterrupted
run; the phrase embeddings do not depend on the batches (see above), and the checkpoint restores the
global random streams, so a resumed run equals the uninterrupted one bit for bit on the CPU (README:
"Checkpoints and resume"); ``log.jsonl`` is cut back to the checkpoint's step. Checkpoints are safetensors
with JSON metadata, written atomically (temp file + rename) by rank 0: ``last.safetensors`` (head weights,
AdamW state, step, data position, random streams, fp16 scaler) every ``save_every`` iterations and
``model.safetensors`` (weights + the architecture, what ``SynSegConfig.checkpoint`` reads) at the end.
Under ``torchrun`` (WORLD_SIZE > 1) the process group is initialised (NCCL on CUDA, Gloo on the CPU), the
head runs in DistributedDataParallel and rank r takes positions r·B .. r·B + B − 1 of each global batch of
B·world positions (DistributedSampler-style sharding; the effective batch is ``batch_size × world``).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from weakseg.core import TRAINERS, is_int
from weakseg.train.common import (TrainOptions, after_step, dist_context, finish_training, load_checkpoint,
                                  save_checkpoint, seeded_generator, truncate_log)

__all__ = ["SynSegTrainConfig", "train_synseg", "lr_at", "random_resized_crop", "prepare_phrases",
           "CHECKPOINT_FORMAT"]

CHECKPOINT_FORMAT = "weakseg-synseg-checkpoint"


@dataclass
class SynSegTrainConfig(TrainOptions):
    """Training options. iterations / batch_size / seed: 10000, 256, 42 [P]. lr / lr_min / warmup_iters /
    weight_decay / betas: AdamW, 1e-3 cosine to 1e-4, no warmup, 1e-4 [R, CLIPSeg]. k_max: phrases per image
    (4) [R]. scale_range / ratio_range / flip: the random resized crop [R]. amp: "auto" (bf16 on CUDA),
    "none", "bf16", "fp16". extractor / spacy_model / exclusions / phrases_file: noun phrases (see
    :mod:`weakseg.data.phrases`). num_workers: DataLoader workers. save_every / log_every: iterations.
    max_images: only the first N pairs."""

    iterations: int = 10000
    batch_size: int = 256
    lr: float = 1e-3
    lr_min: float = 1e-4
    warmup_iters: int = 0
    weight_decay: float = 1e-4
    betas: tuple = (0.9, 0.999)
    k_max: int = 4
    scale_range: tuple = (0.5, 1.0)
    ratio_range: tuple = (0.75, 4 / 3)
    flip: bool = True
    amp: str = "auto"
    extractor: str = "auto"
    spacy_model: str = "en_core_web_sm"
    exclusions: str | None = None
    phrases_file: str | None = None
    num_workers: int = 0
    save_every: int = 500
    log_every: int = 50
    max_images: int | None = None
    seed: int = 42

    def __post_init__(self) -> None:
        self.betas = tuple(float(b) for b in self.betas)
        self.scale_range = tuple(float(s) for s in self.scale_range)
        self.ratio_range = tuple(float(s) for s in self.ratio_range)
        for n in ("iterations", "batch_size", "k_max", "save_every", "log_every"):
            v = getattr(self, n)
            if not is_int(v, 1):
                raise ValueError(f"SynSegTrainConfig.{n}: expected an int >= 1, got {v!r}")
        if not is_int(self.num_workers, 0):
            raise ValueError(f"SynSegTrainConfig.num_workers: expected an int >= 0, got {self.num_workers!r}")
        if not self.lr > 0 or not 0 <= self.lr_min <= self.lr:
            raise ValueError(f"SynSegTrainConfig.lr / lr_min: expected lr > 0 and 0 <= lr_min <= lr, got "
                             f"{self.lr!r} / {self.lr_min!r}")
        if len(self.scale_range) != 2 or not 0 < self.scale_range[0] <= self.scale_range[1] <= 1:
            raise ValueError(f"SynSegTrainConfig.scale_range: expected (lo, hi) with 0 < lo <= hi <= 1, got "
                             f"{self.scale_range}")
        if self.amp not in ("auto", "none", "bf16", "fp16"):
            raise ValueError(f"SynSegTrainConfig.amp: expected auto, none, bf16 or fp16, got {self.amp!r}")
        if self.extractor not in ("auto", "spacy", "simple"):
            raise ValueError(f"SynSegTrainConfig.extractor: expected auto, spacy or simple, got {self.extractor!r}")



def lr_at(step: int, cfg: SynSegTrainConfig) -> float:
    """Linear warmup over ``warmup_iters``, then cosine from ``lr`` to ``lr_min`` at ``iterations``."""
    if step < cfg.warmup_iters:
        return cfg.lr * (step + 1) / cfg.warmup_iters
    span = max(1, cfg.iterations - cfg.warmup_iters)
    t = min(1.0, (step - cfg.warmup_iters) / span)
    return cfg.lr_min + (cfg.lr - cfg.lr_min) * 0.5 * (1 + math.cos(math.pi * t))


def random_resized_crop(image: torch.Tensor, size: int, scale=(0.5, 1.0), ratio=(0.75, 4 / 3), flip: bool = True,
                        generator: torch.Generator | None = None) -> torch.Tensor:
    """RGB uint8 (3, H, W) -> (3, size, size) uint8: a crop of ``scale`` × the area and aspect ``ratio``
    (10 tries, else the central largest crop), resized (bilinear, antialiased), flipped with p = 0.5."""
    from torchvision.transforms.v2 import functional as TF

    H, W = image.shape[-2:]
    area = H * W
    box = None
    for _ in range(10):
        u = torch.rand(3, generator=generator)
        a = area * (scale[0] + (scale[1] - scale[0]) * float(u[0]))
        r = math.exp(math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * float(u[1]))
        w, h = int(round(math.sqrt(a * r))), int(round(math.sqrt(a / r)))
        if 0 < w <= W and 0 < h <= H:
            top = int(torch.randint(0, H - h + 1, (), generator=generator))
            left = int(torch.randint(0, W - w + 1, (), generator=generator))
            box = (top, left, h, w)
            break
    if box is None:
        s = min(H, W)
        box = ((H - s) // 2, (W - s) // 2, s, s)
    out = TF.resized_crop(image, *box, size=[size, size], antialias=True)
    if flip and float(torch.rand((), generator=generator)) < 0.5:
        out = out.flip(-1)
    return out.contiguous()


def prepare_phrases(dataset, cfg: SynSegTrainConfig) -> list[list[str]]:
    """The noun phrases of every caption of ``dataset`` (``captions`` and ``keys`` attributes, or items
    with ``caption``), the phrases file taking precedence for its keys."""
    from weakseg.data.phrases import NounPhraseExtractor, read_phrases_file

    n = len(dataset) if cfg.max_images is None else min(cfg.max_images, len(dataset))
    captions = list(getattr(dataset, "captions", None) or [dataset[i].caption for i in range(n)])[:n]
    keys = list(getattr(dataset, "keys", None) or [str(i) for i in range(n)])[:n]
    given = read_phrases_file(cfg.phrases_file) if cfg.phrases_file else {}
    todo = [i for i in range(n) if keys[i] not in given]
    extractor = NounPhraseExtractor(cfg.extractor, cfg.spacy_model, cfg.exclusions) if todo else None
    found = extractor.extract_many([captions[i] for i in todo]) if todo else []
    out: list[list[str]] = [[] for _ in range(n)]
    for i, ph in zip(todo, found):
        out[i] = ph
    for i in range(n):
        if keys[i] in given:
            out[i] = list(dict.fromkeys(p.strip().lower() for p in given[keys[i]] if p.strip()))
    return out


class _Positions(torch.utils.data.Dataset):
    """Position in the training stream -> (crop, phrases); deterministic in (seed, position)."""

    def __init__(self, dataset, eligible: list[int], phrases: list[list[str]], size: int, cfg: SynSegTrainConfig):
        self.dataset, self.eligible, self.phrases, self.size, self.cfg = dataset, eligible, phrases, size, cfg
        self._perm: dict[int, torch.Tensor] = {}

    def index(self, pos: int) -> int:
        n = len(self.eligible)
        epoch, at = divmod(pos, n)
        if epoch not in self._perm:
            self._perm.clear()
            self._perm[epoch] = torch.randperm(n, generator=seeded_generator(self.cfg.seed, 17, epoch))
        return self.eligible[int(self._perm[epoch][at])]

    def __len__(self) -> int:
        return 2 ** 62

    def __getitem__(self, pos: int):
        cfg = self.cfg
        i = self.index(pos)
        g = seeded_generator(cfg.seed, 23, pos)
        img = random_resized_crop(self.dataset[i].image, self.size, cfg.scale_range, cfg.ratio_range, cfg.flip, g)
        ph = self.phrases[i]
        if len(ph) > cfg.k_max:
            keep = sorted(torch.randperm(len(ph), generator=g)[:cfg.k_max].tolist())
            ph = [ph[j] for j in keep]
        return img, list(ph)


def _collate(batch):
    return torch.stack([b[0] for b in batch]), [b[1] for b in batch]


def train_synseg(method, dataset, out_dir: str | os.PathLike, config: SynSegTrainConfig | None = None,
                 resume: bool = True, progress: bool = True, stop_after: int | None = None) -> dict[str, Any]:
    """Train the head of ``method`` (a :class:`~weakseg.methods.synseg.SynSeg`; its loss options come from
    its config) on the caption ``dataset``; writes ``out_dir/last.safetensors`` (resumable), ``log.jsonl``
    and, after the last iteration, ``out_dir/model.safetensors``. ``stop_after``: stop (checkpointed) after
    that many iterations of this call. Returns {"step", "losses" (one dict per iteration of this call),
    "model", "checkpoint", "images", "phrases"}."""
    from tqdm.auto import tqdm

    from weakseg.methods.synseg import MODEL_FORMAT, mccl_losses

    cfg = config or SynSegTrainConfig()
    mcfg = method.config
    if mcfg.mode != "decoder":
        raise ValueError("SynSegConfig.mode: training needs mode='decoder'")
    phrases = prepare_phrases(dataset, cfg)
    eligible = [i for i, p in enumerate(phrases) if p]
    if not eligible:
        raise ValueError(f"dataset: none of its {len(phrases)} captions has a noun phrase left after the exclusion "
                         f"list; check the captions or pass a phrases_file")
    rank, world, use_dist = dist_context()
    device = method.device
    head = method.head.to(device).train()
    optimizer = torch.optim.AdamW(head.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    last = out / "last.safetensors"
    meta = {"arch": method.arch, "train_config": asdict(cfg), "method_config": mcfg.to_dict()}
    amp = cfg.amp if cfg.amp != "auto" else ("bf16" if device.type == "cuda" else "none")
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    scaler = torch.amp.GradScaler(device.type) if amp == "fp16" else None
    B = cfg.batch_size
    # every phrase's text embedding, computed once in a fixed order (sorted, fixed chunks): a phrase's
    # embedding must not depend on which other phrases were new in its first batch (float sums differ in
    # the last bits with the batch's make-up), or a resumed run would drift from the uninterrupted one
    vocab = sorted({p for i in eligible for p in phrases[i]})
    text_table = torch.cat([method.clip.class_embeddings(vocab[i:i + 1024], templates=mcfg.templates,
                                                         synonym_sep=mcfg.synonym_sep).embeddings.float()
                            for i in range(0, len(vocab), 1024)]).to(device)
    text_row = {p: i for i, p in enumerate(vocab)}
    step = position = 0  # iterations done, positions of the data stream consumed (all ranks)
    if resume and last.exists():
        info = load_checkpoint(last, head, optimizer, CHECKPOINT_FORMAT, method.arch, scaler)
        step = info["step"]
        position = info.get("position", step * world * B)
    log = out / "log.jsonl"
    if rank == 0:
        truncate_log(log, step)
    ddp = head
    if use_dist and world > 1:
        from torch.nn.parallel import DistributedDataParallel

        ddp = DistributedDataParallel(head, device_ids=[device.index] if device.type == "cuda" else None)
    end = cfg.iterations if stop_after is None else min(cfg.iterations, step + int(stop_after))
    start, first = step, position
    batches = [[first + ((s - start) * world + rank) * B + j for j in range(B)] for s in range(start, end)]
    # the loader draws its workers' base seed from its own generator, not from the restored global stream
    loader = torch.utils.data.DataLoader(_Positions(dataset, eligible, phrases, mcfg.size, cfg), batch_sampler=batches,
                                         num_workers=cfg.num_workers, collate_fn=_collate,
                                         generator=seeded_generator(cfg.seed, 37, start))
    weights = mcfg.loss_weights
    losses: list[dict[str, float]] = []
    bar = tqdm(total=cfg.iterations, initial=step, desc="train synseg", disable=not progress or rank != 0)
    for images, plist in loader:
        K = max(len(p) for p in plist)
        text = torch.zeros(len(plist), K, method.clip.embed_dim, device=device)
        valid = torch.zeros(len(plist), K, dtype=torch.bool, device=device)
        for b, ps in enumerate(plist):
            for k, p in enumerate(ps):
                text[b, k] = text_table[text_row[p]]
                valid[b, k] = True
        with torch.no_grad():
            pixels = method.clip.preprocess(images)
            acts = method.clip.encode_layers(pixels, mcfg.extract_layers, mcfg.pos_interp)
        lr = lr_at(step, cfg)
        for g in optimizer.param_groups:
            g["lr"] = lr
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            _, fg, bg = ddp(acts, text, mcfg.fss_norm, mcfg.fss_eps)
        terms = mccl_losses(fg.float(), bg.float(), text, valid, weights, mcfg.cos_eps, mcfg.cos_mode, mcfg.fb_gate)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(terms["loss"]).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            terms["loss"].backward()
            optimizer.step()
        step += 1
        position = first + (step - start) * world * B
        rec = {"step": step, **{k: float(v.detach()) for k, v in terms.items()}, "lr": lr, "K": K}
        losses.append(rec)
        after_step(rec, step, end, cfg, rank, log, bar,
                   lambda: save_checkpoint(last, head, optimizer, {**meta, "step": step, "position": position},
                                           CHECKPOINT_FORMAT, scaler))
    bar.close()
    model_path = finish_training(out, step, cfg.iterations, rank, use_dist, world,
                                 lambda p: save_checkpoint(p, head, None, {**meta, "step": step}, MODEL_FORMAT))
    head.eval()
    method.trained_steps = step
    return {"step": step, "losses": losses, "model": str(model_path) if model_path else None,
            "checkpoint": str(last), "images": len(eligible), "phrases": len({p for ps in phrases for p in ps})}


# ----------------------------------------------------------------------------------------- command line
def _command(args) -> int:
    import weakseg
    from weakseg.core import parse_set_options
    from weakseg.data.captions import open_caption_dataset
    from weakseg.eval.arguments import check_out_dir

    check_out_dir(args.out)
    dataset = open_caption_dataset(args.data, limit=args.limit)  # before the (possibly downloaded) CLIP
    method = weakseg.create("synseg", config_file=args.config, set_options=args.set or ())
    opts = parse_set_options(args.train or (), SynSegTrainConfig)
    if args.limit is not None and args.data != "toyworld":
        opts.setdefault("max_images", args.limit)
    res = train_synseg(method, dataset, args.out, SynSegTrainConfig.from_dict(opts), resume=not args.no_resume,
                       progress=not args.quiet)
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun only rank 0 reports
        return 0
    last = res["losses"][-1] if res["losses"] else {}
    print(json.dumps({"out": args.out, "step": res["step"], "model": res["model"], "checkpoint": res["checkpoint"],
                      "images": res["images"], "phrases": res["phrases"], "last": last}, indent=2))
    return 0


@TRAINERS.register("synseg")
def add_parser(sub) -> None:
    """``weakseg train synseg``."""
    s = sub.add_parser("synseg", help="SynSeg on image-caption pairs (FSS + MCCL; FiLM, decoder, projector)")
    s.add_argument("--data", required=True,
                   help="webdataset shards (a .tar, a folder of .tar files or a glob), an image folder with "
                        "same-stem .txt captions, or toyworld (toy captions)")
    s.add_argument("--limit", type=int, default=None, help="use only the first N pairs (toyworld: N scenes)")
    s.add_argument("--out", required=True, help="output directory (checkpoints, log)")
    s.add_argument("--config", default=None, help="a TOML/YAML/JSON file of SynSeg options")
    s.add_argument("--set", nargs="*", default=None, metavar="KEY=VALUE",
                   help="SynSeg options (clip_model, extract_layers, loss_weights, ...; SynSegConfig)")
    s.add_argument("--train", nargs="*", default=None, metavar="KEY=VALUE",
                   help="training options (iterations, batch_size, lr, k_max, extractor, ...; SynSegTrainConfig)")
    s.add_argument("--no-resume", action="store_true", help="start over even if out/last.safetensors exists")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=_command)
