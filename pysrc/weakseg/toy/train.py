"""Train the toy world's tiny CLIP and tiny Stable Diffusion: ``python -m weakseg.toy.train``.

Stages (``--stage``; ``all`` runs them in this order, each one's result feeds the next):

1. ``clip``: the open_clip CLIP of :data:`~weakseg.toy.models.CLIP_CONFIG`, contrastive (InfoNCE) loss
   on (scene, caption) pairs; captions are randomly shortened (colours and the "on <stuff>" part dropped,
   a final period added; a quarter of them shape words only) so that "a photo of a circle." is in
   distribution; images get a random one of the 8 flips/rotations (captions are invariant to them).
   Identical captions in a batch count as positives of each other. Each image also gets a hard
   negative caption, its own with one shape word swapped (:func:`shape_negative`): without it the
   colours and backgrounds identify the caption within a batch and the model learns little about shape.
   Even with them the image tower learned shape slowly, so a second term trains CLIP as the zero-shot classifier it is used as: the
   cross-entropy of each image against the five class prompts "a photo of a {shape}" (with or without
   the period), the target uniform over the shapes its caption names (weak labels read from the
   caption, never from the masks). The image tower's patchify is a :class:`~weakseg.backbones.clip.ConvStem`
   (``CLIP_CONFIG["conv_stem"]``): with open_clip's linear 8x8 patchify the tower stalled. 4,500 steps,
   lr 6e-4. The measurements behind these choices: benchmarks/results/toyworld_training_notes.md.
1b. ``crops``: the clip stage's CLIP trained on (:func:`train_crops`), half of each batch being single
   objects cut out of the scenes (a box around one object, resized to the scene size, captioned with that
   object alone: "a photo of a red star on grass"), the other half whole scenes as in stage 1. Whole scenes
   alone teach the image tower what a scene contains, not where: its patch tokens then tell objects from
   background but not one shape from another, which is what the dense methods read (ModuSeg's retrieval,
   SynSeg, DiCLIP). Its result is the committed CLIP. 800 steps, lr 2e-4.
2. ``text``: the CLIP whose text tower starts Stable Diffusion's text encoder: the same objective with
   open_clip's linear patchify (:data:`TEXT_CLIP_OVERRIDES`), 3,000 steps at lr 1e-3, batches drawn from
   the clip stage's random stream; i.e. the first recipe of stage 1. Its image tower is discarded. (SD's
   text encoder is not the toy CLIP's, as SD 2.x's OpenCLIP-H text tower is not the CLIP ViT-B a
   CLIP-based method uses; why this one: :data:`TEXT_CLIP_OVERRIDES`.)
3. ``vae``: the ``AutoencoderKL`` of :data:`~weakseg.toy.models.VAE_CONFIG` on the scenes (L1 + MSE
   reconstruction of a posterior sample + a small KL term); its ``scaling_factor`` is then set to 1/std of
   the training latents, as SD's.
4. ``unet``: the ``UNet2DConditionModel`` of :data:`~weakseg.toy.models.UNET_CONFIG`, epsilon-prediction
   loss with SD's scaled-linear DDPM noising, conditioned on a transformers ``CLIPTextModel`` initialised
   from the text stage's CLIP text tower and trained with the UNet (:data:`TRAIN_TEXT_ENCODER`), 10% caption
   dropout (the empty prompt). 2,400 steps. Its localisation depends on the seed far more than on any
   recipe change measured, so :data:`UNET_TRIALS` seeds (``--seed``, ``--seed`` + 1, ...) first train
   :data:`UNET_TRIAL_STEPS` steps each, and the one whose class-token cross-attention overlaps the objects
   best on :data:`UNET_PICK_SCENES` val scenes (:func:`weakseg.toy.signal.sd_attention_iou`, raw figure)
   is trained on to the end (:func:`pick_unet_seed`).

What the committed weights learned (CLIP zero-shot accuracy, cross-attention IoU with and without
propagation) is measured by ``python -m weakseg.toy.signal``; the figures are in
benchmarks/results/toyworld_signal_2026-11-22.json and benchmarks/results/toyworld_training_notes.md.

Determinism: every model is initialised from ``--seed``; the batch of step ``s`` (scene indices,
augmentations, caption variants, noise, timesteps, dropout) is drawn from generators seeded with
``(seed, stage, s)`` only, and the learning rate is a function of ``s``. A checkpoint (every
``--ckpt-every`` steps and at the end: model, AdamW state and random streams in one safetensors file, step
and settings in its header, written by :func:`weakseg.train.common.save_checkpoint`) is
therefore all ``--resume`` needs to continue bit for bit.

Data: the training scenes (``ToyWorld(64, "train")``, 1-3 objects) are generated once into
``<work>/cache/`` (a safetensors file of uint8 images and open_clip token ids, captions in its metadata).

Outputs: the fp32 result of each stage under ``<work>/final/<stage>``; the committed weights (fp16; the
loaders restore fp32) under ``--out`` (default: the package's ``weights/``): ``clip/`` after the clip
and crops stages (``CLIPBackbone.save_pretrained``), ``sd/`` after the UNet stage (``StableDiffusionBackbone.save_pretrained``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from weakseg.core import is_int
from weakseg.io import atomic_path, save_safetensors, state_digest, write_json
from weakseg.train import common
from weakseg.toy.world import COLORS, OBJECT_CLASSES, STUFF, ToyWorld, crop_half, crop_objects
from weakseg.toy.models import (CLIP_CONFIG, UNET_CONFIG, VAE_CONFIG, assemble_sd, build_clip, build_unet,
                                     build_vae, text_tower_to_hf)

__all__ = ["STAGES", "StageSettings", "DEFAULT_SETTINGS", "default_work_dir", "default_weights_dir", "SceneCache",
           "load_scene_cache", "scene_objects", "crop_objects", "train_crops", "caption_variant", "shape_negative", "shape_targets", "train_clip", "train_vae", "train_unet", "pick_unet_seed", "train", "snapshot_sd", "main"]

STAGES = ("clip", "crops", "text", "vae", "unet", "hires")
# what ``--stage all`` runs: "hires" is opt-in (its UNet did not beat the unet stage's on the methods yet:
# benchmarks/results/toyworld_v2_2026-12-06.md), so the committed toy SD stays the unet stage's
ALL_STAGES = ("clip", "crops", "text", "vae", "unet")
# the id of each stage's per-step random stream (the text stage draws the clip stage's: see train_clip)
_STAGE_ID = {"clip": 0, "vae": 1, "unet": 2, "hires": 3, "crops": 4}
IMAGE_SIZE = 64
# The hires stage's input side: the 64 px scenes upsampled (bilinear, as iSeg and DiffSegmenter resize) to
# 128 px, so the frozen 4x VAE gives 32x32 latents (SD's 8x VAE on 512 px gives 64x64).
HIRES_SIZE = 128
# The crops stage: objects are cut out of the first CROP_SCENES training scenes (their boxes come from
# rendering those scenes once more: the scene cache keeps no geometry); CROP_FRACTION of each batch are
# crops (boxes: weakseg.toy.world.crop_half, cut by crop_objects).
CROP_SCENES = 6000
CROP_FRACTION = 0.5


@dataclass(frozen=True)
class StageSettings:
    """Optimisation settings of one stage (AdamW, linear warm-up then cosine decay to 10% of ``lr``)."""

    steps: int
    batch: int
    lr: float
    warmup: int
    weight_decay: float
    ckpt_every: int = 250


# Step counts chosen for about two hours on 2 CPU cores in total (seconds per step of each stage:
# benchmarks/results/toyworld_training_notes.md). On a shared machine use --threads 1.
DEFAULT_SETTINGS: dict[str, StageSettings] = {
    "clip": StageSettings(steps=4500, batch=64, lr=6e-4, warmup=100, weight_decay=0.1),
    "crops": StageSettings(steps=800, batch=64, lr=2e-4, warmup=50, weight_decay=0.1),
    "text": StageSettings(steps=3000, batch=64, lr=1e-3, warmup=100, weight_decay=0.1),
    "vae": StageSettings(steps=1200, batch=32, lr=1e-3, warmup=100, weight_decay=0.0),
    "unet": StageSettings(steps=2400, batch=32, lr=5e-4, warmup=200, weight_decay=0.01),
    "hires": StageSettings(steps=600, batch=32, lr=2e-4, warmup=50, weight_decay=0.01),
}
NUM_SCENES = 20000
CAPTION_DROPOUT = 0.1
# The UNet stage trains the text encoder too (initialised from the text stage's CLIP text tower): conditioned
# on frozen text states, the UNet could not tie a class token to its object (the shape words map to nearly the
# same states), and a UNet on the ConvStem CLIP's frozen states localised worse than one that trains them
# (benchmarks/results/toyworld_training_notes.md).
TRAIN_TEXT_ENCODER = True
# Model-config overrides of the text stage's CLIP: open_clip's linear 8x8 patchify (the first CLIP recipe).
# The UNet's text encoder starts from this CLIP's text tower, not from the clip stage's: UNets on the text
# towers of ConvStem CLIPs localised worse, although those towers tell the shape words apart far better
# (benchmarks/results/toyworld_training_notes.md).
TEXT_CLIP_OVERRIDES: dict[str, Any] = {"conv_stem": None}
KL_WEIGHT = 1e-3
# The unet stage's seed trials (:func:`pick_unet_seed`): the same recipe with seeds 0, 1 and 2 gave raw
# class-token cross-attention IoU 0.49 / 0.34 / 0.29 on 60 val scenes, and the order already shows after
# 800 of the 2,400 steps (0.39 / 0.25 / 0.23; benchmarks/results/toyworld_v2_2026-12-07.md).
UNET_TRIALS = 3
UNET_TRIAL_STEPS = 800
UNET_PICK_SCENES = 100


def default_weights_dir() -> Path:
    """The package's ``weights/`` folder (what the loaders read by default)."""
    return Path(__file__).resolve().parent / "weights"


def default_work_dir() -> Path:
    """``$WEAKSEG_CACHE/toyworld`` if set, else ``~/.cache/weakseg/toy`` (scene cache, checkpoints)."""
    root = os.environ.get("WEAKSEG_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "weakseg") / "toyworld"


# --------------------------------------------------------------------------------------------------
# the scene cache

@dataclass
class SceneCache:
    """Training scenes: images (N, 3, S, S) uint8, tokens (N, 77) int64 (open_clip ids), captions."""

    images: torch.Tensor
    tokens: torch.Tensor
    captions: list[str]

    def __len__(self) -> int:
        return self.images.shape[0]


def _make_chunk(args) -> tuple[np.ndarray, list[str]]:
    size, seed, lo, hi = args
    world = ToyWorld(size=size, split="train", num_scenes=hi, seed=seed)
    imgs, caps = [], []
    for i in range(lo, hi):
        s = world.scene(i)
        imgs.append(s.image.numpy())
        caps.append(s.caption)
    return np.stack(imgs), caps


def load_scene_cache(work_dir: str | os.PathLike, num_scenes: int = NUM_SCENES, seed: int = 0,
                     size: int = IMAGE_SIZE, workers: int | None = None, progress: bool = True) -> SceneCache:
    """The first ``num_scenes`` training scenes of ``ToyWorld(size, "train", seed=seed)`` (1-3 objects),
    generated once (in ``workers`` processes) into ``<work_dir>/cache/`` and read from there afterwards."""
    from open_clip import SimpleTokenizer
    from safetensors.torch import load_file
    from tqdm import tqdm

    if not is_int(num_scenes, 1):
        raise ValueError(f"num_scenes must be a positive int, got {num_scenes!r}")
    path = Path(work_dir) / "cache" / f"toyworld_train_s{size}_n{num_scenes}_seed{seed}.safetensors"
    if path.is_file():
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            captions = json.loads(f.metadata()["captions"])
        t = load_file(str(path))
        return SceneCache(t["images"], t["tokens"].long(), captions)
    workers = workers or max(1, min(4, os.cpu_count() or 1))
    chunk = 250
    jobs = [(size, seed, lo, min(num_scenes, lo + chunk)) for lo in range(0, num_scenes, chunk)]
    imgs, caps = [], []
    bar = tqdm(total=num_scenes, desc="toy scenes", unit="scene", disable=not progress)
    if workers == 1:
        results = map(_make_chunk, jobs)
    else:
        pool = ProcessPoolExecutor(workers)
        results = pool.map(_make_chunk, jobs)
    for im, cp in results:
        imgs.append(im)
        caps.extend(cp)
        bar.update(len(cp))
    bar.close()
    if workers != 1:
        pool.shutdown()
    images = torch.from_numpy(np.concatenate(imgs))
    tokens = SimpleTokenizer(context_length=77)(caps)
    save_safetensors({"images": images, "tokens": tokens.to(torch.int32)}, path, metadata={"captions": json.dumps(caps)})
    return SceneCache(images, tokens.long(), caps)


# --------------------------------------------------------------------------------------------------
# per-step randomness, augmentation, captions

def _step_rng(seed: int, stage: str, step: int) -> np.random.Generator:
    return np.random.default_rng([seed, _STAGE_ID[stage], step])


def _step_gen(seed: int, stage: str, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed) * 1_000_003 + _STAGE_ID[stage] * 100_000_007 + int(step))


def _dihedral(images: torch.Tensor, codes: np.ndarray) -> torch.Tensor:
    """Apply one of the 8 flips/rotations per image (code: bits 0-1 = quarter turns, bit 2 = h-flip)."""
    out = []
    for im, c in zip(images, codes.tolist()):
        im = torch.rot90(im, c & 3, dims=(-2, -1))
        out.append(im.flip(-1) if c & 4 else im)
    return torch.stack(out)


_COLOR_RX = re.compile(r"\b(a|an) (" + "|".join(COLORS) + r") ")
_STUFF_RX = re.compile(r" on (" + "|".join(STUFF) + r")$")


def caption_variant(caption: str, rng: np.random.Generator) -> str:
    """A random shortening of a toy caption: unchanged with probability 0.35; shape words only ("a photo
    of a star and a ring", every colour and the " on <stuff>" part dropped) with probability 0.25; else
    each colour word dropped with probability 1/2 and the " on <stuff>" part with probability 1/2. A final
    period is added with probability 1/2. "a photo of an orange star on sand" -> e.g. "a photo of a star."."""
    u = rng.random()
    if u < 0.35:
        out = caption
    elif u < 0.6:
        out = _STUFF_RX.sub("", _COLOR_RX.sub("a ", caption))
    else:
        out = _COLOR_RX.sub(lambda m: "a " if rng.random() < 0.5 else m.group(0), caption)
        if rng.random() < 0.5:
            out = _STUFF_RX.sub("", out)
    return out + "." if rng.random() < 0.5 else out


_SHAPE_RX = re.compile(r"\b(" + "|".join(OBJECT_CLASSES) + r")\b")


def shape_negative(caption: str, rng: np.random.Generator) -> str:
    """A hard negative of a toy caption: one of its shape words (chosen at random) replaced by a shape
    the caption does not name (any other shape if it names them all). Contrastive training on scenes
    whose colours and backgrounds already identify the caption within a batch otherwise learns little
    about shape; these negatives differ from the positive in shape only."""
    hits = list(_SHAPE_RX.finditer(caption))
    if not hits:
        raise ValueError(f"shape_negative: no shape word in {caption!r}")
    m = hits[int(rng.integers(len(hits)))]
    named = {h.group(1) for h in hits}
    choices = [c for c in OBJECT_CLASSES if c not in named] or [c for c in OBJECT_CLASSES if c != m.group(1)]
    return caption[:m.start()] + choices[int(rng.integers(len(choices)))] + caption[m.end():]


def _lr_at(step: int, s: StageSettings) -> float:
    if step < s.warmup:
        return s.lr * (step + 1) / s.warmup
    t = (step - s.warmup) / max(1, s.steps - s.warmup)
    return s.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def _make_optimizer(params, s: StageSettings) -> torch.optim.AdamW:
    params = [p for p in params if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": s.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=s.lr, betas=(0.9, 0.98), eps=1e-6)


# --------------------------------------------------------------------------------------------------
# checkpoints

CHECKPOINT_FORMAT = "weakseg-toy-checkpoint"


def _ckpt_path(work_dir: Path, stage: str) -> Path:
    return Path(work_dir) / "ckpt" / stage / "last.safetensors"


def save_checkpoint(work_dir: Path, stage: str, step: int, model: torch.nn.Module, opt: torch.optim.Optimizer,
                    settings: StageSettings, seed: int, extra: dict | None = None) -> Path:
    """``<work>/ckpt/<stage>/last.safetensors``: model, AdamW state and random streams with the step, seed and
    settings in its header, written atomically by the one checkpoint writer (:func:`weakseg.train.common.
    save_checkpoint`)."""
    path = _ckpt_path(work_dir, stage)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"stage": stage, "step": step, "seed": seed, "settings": asdict(settings), "extra": extra or {}}
    common.save_checkpoint(path, model, opt, meta, CHECKPOINT_FORMAT)
    return path


def load_checkpoint(work_dir: Path, stage: str, model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict | None:
    """Restore model and optimizer from the stage's checkpoint (checked by :func:`weakseg.train.common.
    load_checkpoint`); returns its metadata (None if there is none)."""
    path = _ckpt_path(work_dir, stage)
    if not path.is_file():
        return None
    return common.load_checkpoint(path, model, opt, CHECKPOINT_FORMAT)


def _settings_from(meta: dict, settings: StageSettings, stage: str) -> StageSettings:
    saved = StageSettings(**meta["settings"])
    if replace(saved, ckpt_every=settings.ckpt_every) != replace(settings, ckpt_every=settings.ckpt_every):
        raise ValueError(f"--resume: the {stage} checkpoint was made with {saved}, but this run asks for {settings}; "
                         f"resume with the same settings or start over without --resume")
    return settings


def _run_loop(stage: str, model: torch.nn.Module, step_fn: Callable[[int], torch.Tensor], settings: StageSettings,
              work_dir: Path, seed: int, resume: bool, progress: bool, log: Callable[[str], None],
              stop_at: int | None = None) -> dict:
    """The shared optimisation loop with checkpoints; returns {"losses": [...], "seconds_per_step": ...,
    "start_step", "end_step"}. ``stop_at``: stop (with a checkpoint) once that many steps are done, leaving
    the rest to a later ``--resume``."""
    from tqdm import tqdm

    opt = _make_optimizer(model.parameters(), settings)
    start = 0
    if resume:
        meta = load_checkpoint(work_dir, stage, model, opt)
        if meta is not None:
            _settings_from(meta, settings, stage)
            start = int(meta["step"])
            log(f"[{stage}] resumed at step {start}/{settings.steps}")
    elif _ckpt_path(work_dir, stage).is_file():
        _ckpt_path(work_dir, stage).unlink()
    model.train()
    losses = []
    t0 = time.perf_counter()
    end = settings.steps if stop_at is None else max(start, min(settings.steps, int(stop_at)))
    bar = tqdm(range(start, end), initial=start, total=settings.steps, desc=stage, disable=not progress)
    for step in bar:
        lr = _lr_at(step, settings)
        for g in opt.param_groups:
            g["lr"] = lr
        loss = step_fn(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if step % 10 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}", lr=f"{lr:.2e}")
        if step % 100 == 0 and not progress:
            log(f"[{stage}] step {step} loss {np.mean(losses[-50:]):.4f} lr {lr:.2e}")
        done = step + 1
        if done % settings.ckpt_every == 0 or done == end:
            save_checkpoint(work_dir, stage, done, model, opt, settings, seed)
    bar.close()
    n = end - start
    sps = (time.perf_counter() - t0) / n if n else float("nan")
    model.eval()
    return {"losses": losses, "seconds_per_step": sps, "start_step": start, "end_step": end}


# --------------------------------------------------------------------------------------------------
# stages

def _clip_images(clip, images_u8: torch.Tensor) -> torch.Tensor:
    x = images_u8.float().div(255).to(clip.mean.device)
    return (x - clip.mean) / clip.std


def shape_targets(captions: list[str]) -> torch.Tensor:
    """(B, 5) float: which of :data:`OBJECT_CLASSES` each caption names (the weak labels of the prompt loss)."""
    out = torch.zeros(len(captions), len(OBJECT_CLASSES))
    for i, c in enumerate(captions):
        for m in _SHAPE_RX.finditer(c):
            out[i, OBJECT_CLASSES.index(m.group(1))] = 1.0
    return out


PROMPT_FORMS = ("a photo of a {}", "a photo of a {}.")
PROMPT_WEIGHT = 1.0


def clip_batch_loss(clip, images_u8: torch.Tensor, captions: list[str], tokenizer,
                    negatives: list[str] | None = None, prompt_targets: torch.Tensor | None = None,
                    prompt_form: str = PROMPT_FORMS[0]) -> torch.Tensor:
    """Symmetric InfoNCE of a batch (images uint8 (B, 3, S, S), B captions); identical captions are
    positives of each other (the target row is uniform over them). ``negatives``: extra captions that are
    only negatives, appended to the image->text softmax (hard negatives, e.g. :func:`shape_negative`).
    ``prompt_targets`` (B, 5): adds ``PROMPT_WEIGHT`` x the cross-entropy of each image against the five
    class prompts ``prompt_form.format(shape)`` (the zero-shot classifier CLIP is used as), the target
    uniform over the shapes its caption names (:func:`shape_targets`)."""
    model = clip.model
    device = clip.mean.device
    img = model.encode_image(_clip_images(clip, images_u8), normalize=True)
    texts = list(captions) + list(negatives or [])
    if prompt_targets is not None:
        texts += [prompt_form.format(c) for c in OBJECT_CLASSES]
    txt = model.encode_text(tokenizer(texts).to(device), normalize=True)
    scale = model.logit_scale.clamp(max=math.log(100)).exp()
    B, n_cap = len(captions), len(captions) + len(negatives or [])
    logits = scale * img @ txt[:n_cap].T
    same = torch.tensor([[a == b for b in captions] for a in captions], dtype=torch.float32, device=device)
    target = same / same.sum(1, keepdim=True)
    i2t = F.cross_entropy(logits, F.pad(target, (0, n_cap - B)))
    loss = 0.5 * (i2t + F.cross_entropy(logits[:, :B].T, target))
    if prompt_targets is not None:
        t = prompt_targets.to(device).float()
        keep = t.sum(1) > 0
        if keep.any():
            pl = scale * img[keep] @ txt[n_cap:].T
            loss = loss + PROMPT_WEIGHT * F.cross_entropy(pl, t[keep] / t[keep].sum(1, keepdim=True))
    return loss


def vae_batch_loss(vae, images_u8: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """L1 + MSE reconstruction of the posterior sample ``mean + std * eps`` plus ``KL_WEIGHT`` x the KL
    per latent element; ``eps`` has the latents' shape (B, 4, S/4, S/4)."""
    device = next(vae.parameters()).device
    x = images_u8.float().div(127.5).sub(1).to(device)
    post = vae.encode(x).latent_dist
    rec = vae.decode(post.mean + post.std * eps.to(device)).sample
    kl = post.kl().mean() / post.mean[0].numel()
    return F.l1_loss(rec, x) + F.mse_loss(rec, x) + KL_WEIGHT * kl


def unet_batch_loss(unet, scheduler, latents: torch.Tensor, cond: torch.Tensor, noise: torch.Tensor,
                    t: torch.Tensor) -> torch.Tensor:
    """Epsilon-prediction MSE for latents (B, 4, h, w) (already scaled) noised to timesteps ``t``."""
    device = next(unet.parameters()).device
    noisy = scheduler.add_noise(latents, noise, t)
    pred = unet(noisy.to(device), t.to(device), encoder_hidden_states=cond.to(device)).sample
    return F.mse_loss(pred, noise.to(device))


def train_clip(cache: SceneCache, work_dir: Path, settings: StageSettings, seed: int = 0, device: str = "cpu",
               resume: bool = False, progress: bool = True, overrides: dict | None = None,
               log: Callable[[str], None] = print, stop_at: int | None = None, stage: str = "clip"):
    """Stages 1 and 2: returns the trained :class:`~weakseg.backbones.CLIPBackbone` (also written, fp32, to
    ``<work>/final/<stage>``) and the loop's record. ``stage`` ("clip" or "text") names the checkpoint and
    output folders; both draw their batches from the clip stage's random stream."""
    if stage not in ("clip", "text"):
        raise ValueError(f"stage must be 'clip' or 'text', got {stage!r}")
    from open_clip import SimpleTokenizer

    clip = build_clip(seed, overrides).to(device)
    model = clip.model
    tok = SimpleTokenizer(context_length=model.context_length)
    N = len(cache)
    B = min(settings.batch, N)

    def step_fn(step: int) -> torch.Tensor:
        rng = _step_rng(seed, "clip", step)  # also for stage "text": the first recipe's very batches
        idx = rng.choice(N, B, replace=False)
        return _clip_step_loss(clip, tok, cache.images[idx], [cache.captions[i] for i in idx], rng)

    rec = _run_loop(stage, model, step_fn, settings, work_dir, seed, resume, progress, log, stop_at)
    if rec["end_step"] >= settings.steps:
        _finish_clip(clip, work_dir, stage)
    return clip, rec


def _clip_step_loss(clip, tok, images_u8: torch.Tensor, captions: list[str], rng: np.random.Generator) -> torch.Tensor:
    """The loss of one CLIP batch (clip, text and crops stages), drawing from ``rng`` in this order: a flip or
    rotation per image, a shortening of each caption (:func:`caption_variant`), each shortening's hard
    negative, the prompt form; the prompt term's weak labels come from the full ``captions``."""
    imgs = _dihedral(images_u8, rng.integers(0, 8, len(captions)))
    variants = [caption_variant(c, rng) for c in captions]
    negs = [shape_negative(c, rng) for c in variants]
    form = PROMPT_FORMS[int(rng.integers(len(PROMPT_FORMS)))]
    return clip_batch_loss(clip, imgs, variants, tok, negs, shape_targets(captions), form)


def _finish_clip(clip, work_dir: Path, stage: str) -> None:
    """A finished CLIP stage: logit scale clamped at 100 (as open_clip does), eval mode, written (fp32) to
    ``<work>/final/<stage>``."""
    with torch.no_grad():
        clip.model.logit_scale.clamp_(max=math.log(100))
    clip.eval()
    clip.save_pretrained(Path(work_dir) / "final" / stage)


@dataclass
class SceneObjects:
    """The objects of the first ``len(first) - 1`` training scenes, flat: scene ``i`` owns rows
    ``first[i]:first[i + 1]`` of ``box`` (float32 (M, 3): centre y, centre x, radius, in pixels) and
    ``caption`` (that object alone: "a photo of a red star on grass")."""

    first: np.ndarray
    box: np.ndarray
    caption: list[str]


def scene_objects(work_dir: str | os.PathLike, num_scenes: int, seed: int = 0, size: int = IMAGE_SIZE,
                  progress: bool = True) -> SceneObjects:
    """The visible objects (at least one pixel shown; the same rule as :class:`weakseg.toy.world.ToyCaptions`)
    of the first ``num_scenes`` scenes of ``ToyWorld(size, "train", seed=seed)``, rendered once and cached in
    ``<work_dir>/cache/objects_s{size}_n{num_scenes}_seed{seed}.json``."""
    from tqdm import tqdm

    from weakseg.toy.world import caption_for

    path = Path(work_dir) / "cache" / f"objects_s{size}_n{num_scenes}_seed{seed}.json"
    if path.is_file():
        d = json.loads(path.read_text())
    else:
        world = ToyWorld(size=size, split="train", num_scenes=num_scenes, seed=seed)
        d = {"first": [0], "box": [], "caption": []}
        for i in tqdm(range(num_scenes), desc="object boxes", disable=not progress):
            s = world.scene(i)
            for o in [s.objects[n] for n in s.shown]:   # not a fully covered one (its crop shows a neighbour)
                d["box"].append([o.cy, o.cx, o.radius])
                d["caption"].append(caption_for([o], s.stuff))
            d["first"].append(len(d["box"]))
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, d)
    return SceneObjects(np.asarray(d["first"], np.int64), np.asarray(d["box"], np.float32).reshape(-1, 3),
                        list(d["caption"]))


def train_crops(cache: SceneCache, work_dir: Path, settings: StageSettings, clip, seed: int = 0,
                device: str = "cpu", resume: bool = False, progress: bool = True,
                log: Callable[[str], None] = print, stop_at: int | None = None, num_scenes: int = CROP_SCENES):
    """Stage 1b: ``clip`` (the clip stage's CLIP, copied) trained on with the clip stage's loss, the first
    :data:`CROP_FRACTION` of each batch replaced by single-object crops (:func:`crop_objects`) captioned
    with that object alone; scenes are drawn from the first ``num_scenes``. Returns (clip, record); the
    result is also written, fp32, to ``<work>/final/crops``."""
    import copy

    from open_clip import SimpleTokenizer

    if int(num_scenes) < 1 or len(cache) < 1:
        raise ValueError(f"train_crops: num_scenes must be >= 1 and the scene cache non-empty, got num_scenes="
                         f"{num_scenes} and {len(cache)} cached scenes")
    M = min(int(num_scenes), len(cache))
    clip = copy.deepcopy(clip).float().to(device)
    model = clip.model
    tok = SimpleTokenizer(context_length=model.context_length)
    objs = scene_objects(work_dir, M, seed, int(cache.images.shape[-1]), progress)
    B = min(settings.batch, M)
    S = int(cache.images.shape[-1])

    def step_fn(step: int) -> torch.Tensor:
        rng = _step_rng(seed, "crops", step)
        idx = rng.choice(M, B, replace=False)
        nc = int(round(B * CROP_FRACTION))
        imgs = cache.images[idx].clone()
        caps = [cache.captions[i] for i in idx]
        if nc:
            lo, hi = objs.first[idx[:nc]], objs.first[idx[:nc] + 1]
            rows = lo + (rng.random(nc) * (hi - lo)).astype(np.int64)
            box = objs.box[rows]
            half = crop_half(box[:, 2], rng)
            imgs[:nc] = crop_objects(cache.images[idx[:nc]], box[:, 0], box[:, 1], half, S)
            caps[:nc] = [objs.caption[r] for r in rows]
        return _clip_step_loss(clip, tok, imgs, caps, rng)

    rec = _run_loop("crops", model, step_fn, settings, work_dir, seed, resume, progress, log, stop_at)
    if rec["end_step"] >= settings.steps:
        _finish_clip(clip, work_dir, "crops")
    return clip, rec


def train_vae(cache: SceneCache, work_dir: Path, settings: StageSettings, seed: int = 0, device: str = "cpu",
              resume: bool = False, progress: bool = True, overrides: dict | None = None,
              log: Callable[[str], None] = print, stop_at: int | None = None):
    """Stage 2: returns the trained ``AutoencoderKL`` with ``scaling_factor`` = 1/std of the latents (also
    written, fp32, to ``<work>/final/vae``) and the loop's record."""
    vae = build_vae(seed, overrides).to(device)
    N = len(cache)
    B = min(settings.batch, N)

    def step_fn(step: int) -> torch.Tensor:
        rng = _step_rng(seed, "vae", step)
        g = _step_gen(seed, "vae", step)
        idx = rng.choice(N, B, replace=False)
        imgs = _dihedral(cache.images[idx], rng.integers(0, 8, B))
        S = imgs.shape[-1] // 2 ** (len(vae.config.block_out_channels) - 1)
        eps = torch.randn((B, vae.config.latent_channels, S, S), generator=g)
        return vae_batch_loss(vae, imgs, eps)

    rec = _run_loop("vae", vae, step_fn, settings, work_dir, seed, resume, progress, log, stop_at)
    if rec["end_step"] < settings.steps:
        return vae, rec
    with torch.no_grad():
        n = min(N, 1024)
        x = cache.images[:n].float().div(127.5).sub(1).to(device)
        means = torch.cat([vae.encode(x[i:i + 128]).latent_dist.mean for i in range(0, n, 128)])
        std = float(means.std())
    vae.register_to_config(scaling_factor=1.0 / std)
    rec["latent_std"] = std
    vae.save_pretrained(str(Path(work_dir) / "final" / "vae"), safe_serialization=True)
    return vae, rec


def _noise_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         prediction_type="epsilon", clip_sample=False)


def _vae_input(images_u8: torch.Tensor, size: int | None = None) -> torch.Tensor:
    """uint8 (B, 3, S, S) -> [-1, 1] floats, resized to ``size`` first (bilinear, align_corners=False, as
    ``StableDiffusionBackbone.encode_images(resample="bilinear")``) when it differs from S."""
    if size is None or size == images_u8.shape[-1]:
        return images_u8.float().div(127.5).sub(1)
    x = F.interpolate(images_u8.float().div(255), size=(size, size), mode="bilinear", align_corners=False)
    return x.clamp(0, 1) * 2 - 1


@torch.no_grad()
def _latent_moments(vae, images: torch.Tensor, device: str, batch: int = 256, size: int | None = None,
                    progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    from tqdm import tqdm

    means, stds = [], []
    for i in tqdm(range(0, images.shape[0], batch), desc="vae encode", unit="batch", leave=False,
                  disable=not progress):
        x = _vae_input(images[i:i + batch], size).to(device)
        d = vae.encode(x).latent_dist
        means.append(d.mean.cpu())
        stds.append(d.std.cpu())
    # contiguous: the VAE returns channels-last strides on some builds; a cached copy loads contiguous, and the
    # layout changes the UNet's float results (a resume from the cache must equal an uninterrupted run)
    return torch.cat(means).contiguous(), torch.cat(stds).contiguous()


def _cached_latent_moments(work_dir: Path, vae, cache: SceneCache, device: str, size: int | None,
                           progress: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_latent_moments` of the scene cache, stored in ``<work>/cache/`` under the VAE's state digest, the
    input size and the scenes' count, so a ``--resume`` (or a second stage on the same VAE) does not encode
    20,000 scenes again (8 minutes at 128 px on 2 cores). A file whose key differs is not used."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    side = size or cache.images.shape[-1]
    key = state_digest(vae)
    path = Path(work_dir) / "cache" / f"latents_s{side}_n{len(cache)}_{key[:16]}.safetensors"
    if path.is_file():
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        t = load_file(str(path))
        if (meta.get("vae_digest") == key and set(t) == {"mean", "std"} and t["mean"].shape[0] == len(cache)
                and t["mean"].shape == t["std"].shape):
            return t["mean"], t["std"]
    mean, std = _latent_moments(vae, cache.images, device, size=size, progress=progress)
    save_safetensors({"mean": mean, "std": std}, path, metadata={"vae_digest": key, "size": str(side)})
    return mean, std


@torch.no_grad()
def _text_states(text_encoder, tokens: torch.Tensor, device: str, batch: int = 512) -> torch.Tensor:
    return torch.cat([text_encoder(tokens[i:i + batch].to(device))[0].cpu() for i in range(0, tokens.shape[0], batch)])


class _UNetWithText(torch.nn.Module):
    """The UNet and the text encoder trained together (one optimizer, one checkpoint)."""

    def __init__(self, unet, text_encoder):
        super().__init__()
        self.unet = unet
        self.text_encoder = text_encoder


def train_unet(cache: SceneCache, work_dir: Path, settings: StageSettings, vae, text_encoder, seed: int = 0,
               device: str = "cpu", resume: bool = False, progress: bool = True, overrides: dict | None = None,
               log: Callable[[str], None] = print, stop_at: int | None = None, train_text: bool | None = None,
               stage: str = "unet", init_unet=None, input_size: int | None = None, run_dir: Path | None = None):
    """Stage 4 (``stage="unet"``): returns the trained ``UNet2DConditionModel`` (also written, fp32, to
    ``<run>/final/unet``; ``run_dir``: where the checkpoint and the result go, default ``work_dir``, whose
    ``cache/`` holds the latents in any case), the text encoder and the loop's record. The VAE is frozen; the text encoder
    (initialised from the CLIP text tower) is trained with the UNet when ``train_text`` (default
    :data:`TRAIN_TEXT_ENCODER`; written to ``<run>/final/text_encoder``), else frozen.

    Stage 5 (``stage="hires"``, :func:`train_hires`): the same loop continued from ``init_unet`` (a trained
    UNet, copied) on the scenes resized to ``input_size``; outputs under ``<work>/final/hires/``."""
    import copy

    from open_clip import SimpleTokenizer

    if stage not in ("unet", "hires"):
        raise ValueError(f"stage must be 'unet' or 'hires', got {stage!r}")
    train_text = TRAIN_TEXT_ENCODER if train_text is None else bool(train_text)
    unet = (copy.deepcopy(init_unet).float() if init_unet is not None else build_unet(seed, overrides)).to(device)
    vae = vae.to(device).eval()
    text_encoder = copy.deepcopy(text_encoder).to(device).float()
    text_encoder.train(train_text).requires_grad_(train_text)
    log(f"[{stage}] encoding the scenes with the frozen VAE" + ("" if train_text else " and the captions with the frozen "
                                                             "text encoder"))
    mean, std = _cached_latent_moments(work_dir, vae, cache, device, input_size, progress)
    empty_ids = SimpleTokenizer(context_length=77)([""])
    if not train_text:
        states = _text_states(text_encoder, cache.tokens, device)
        empty = _text_states(text_encoder, empty_ids, device)
    scale = float(vae.config.scaling_factor)
    sched = _noise_scheduler()
    N = len(cache)
    B = min(settings.batch, N)

    def step_fn(step: int) -> torch.Tensor:
        rng = _step_rng(seed, stage, step)
        g = _step_gen(seed, stage, step)
        idx = torch.from_numpy(rng.choice(N, B, replace=False))
        z = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=g)) * scale
        noise = torch.randn(z.shape, generator=g)
        t = torch.randint(0, sched.config.num_train_timesteps, (B,), generator=g)
        drop = torch.from_numpy(rng.random(B) < CAPTION_DROPOUT)
        if train_text:
            ids = torch.where(drop[:, None], empty_ids.expand(B, -1), cache.tokens[idx])
            cond = text_encoder(ids.to(device))[0]
        else:
            cond = torch.where(drop[:, None, None], empty.expand(B, -1, -1), states[idx])
        return unet_batch_loss(unet, sched, z, cond, noise, t)

    model = _UNetWithText(unet, text_encoder) if train_text else unet
    run_dir = Path(work_dir) if run_dir is None else Path(run_dir)
    rec = _run_loop(stage, model, step_fn, settings, run_dir, seed, resume, progress, log, stop_at)
    text_encoder.eval().requires_grad_(False)
    if rec["end_step"] < settings.steps:
        return unet, text_encoder, rec
    if input_size is not None:
        unet.register_to_config(sample_size=int(mean.shape[-1]))
    final = _final_unet_dir(run_dir, stage)
    unet.save_pretrained(str(final / "unet"), safe_serialization=True)
    text_encoder.save_pretrained(str(final / "text_encoder"), safe_serialization=True)
    return unet, text_encoder, rec


def pick_unet_seed(cache: SceneCache, work_dir: Path, settings: StageSettings, vae, text_encoder, seed: int = 0,
                   device: str = "cpu", resume: bool = False, progress: bool = True, overrides: dict | None = None,
                   log: Callable[[str], None] = print, stop_at: int | None = None, trials: int = UNET_TRIALS,
                   trial_steps: int = UNET_TRIAL_STEPS, pick_scenes: int = UNET_PICK_SCENES) -> dict | None:
    """The unet stage's seed trials: seeds ``seed`` .. ``seed + trials - 1`` each run the stage's first
    ``trial_steps`` steps (in ``<work>/trials/seed<s>/``); each result's raw class-token cross-attention IoU
    on the first ``pick_scenes`` val scenes is its score (the lowest seed wins a tie). The winner's checkpoint
    becomes ``<work>/ckpt/unet/last.safetensors``, so :func:`train_unet` with ``resume=True`` and the
    winner's seed continues it exactly as an uninterrupted run of that seed. Returns ``{"seed": winner,
    "scores": {seed: score}, "trial_steps": ...}`` (also in ``<work>/trials/pick.json``), or None when
    ``stop_at`` ended a trial early (a later ``resume`` goes on from there). With ``resume``, finished
    trials and a recorded pick are read back, not re-run."""
    import copy
    import shutil

    from weakseg.toy.signal import sd_attention_iou

    if not is_int(trials, 1):
        raise ValueError(f"trials must be an int >= 1, got {trials!r}")
    if not is_int(trial_steps, 1) or trial_steps >= settings.steps:
        raise ValueError(f"trial_steps must be an int in [1, {settings.steps}) (the stage's steps), got {trial_steps!r}")
    if not is_int(pick_scenes, 1):
        raise ValueError(f"pick_scenes must be an int >= 1, got {pick_scenes!r}")
    root = Path(work_dir) / "trials"
    pick_path = root / "pick.json"
    if resume and pick_path.is_file():
        return json.loads(pick_path.read_text())
    if not resume:
        shutil.rmtree(root, ignore_errors=True)
    scores: dict[int, float] = {}
    for s in range(seed, seed + trials):
        run = root / f"seed{s}"
        score_path = run / "score.json"
        if resume and score_path.is_file():
            scores[s] = float(json.loads(score_path.read_text())["cross"])
            continue
        log(f"[unet] seed trial {s - seed + 1}/{trials}: seed {s}, {trial_steps} steps")
        stop = trial_steps if stop_at is None else min(trial_steps, int(stop_at))
        unet, text_encoder_s, rec = train_unet(cache, work_dir, settings, vae, text_encoder, s, device, resume,
                                               progress, overrides, log, stop, run_dir=run)
        if rec["end_step"] < trial_steps:
            return None
        sd = assemble_sd(copy.deepcopy(vae).float(), unet.eval(), text_encoder_s.eval())
        r = sd_attention_iou(sd, num_scenes=pick_scenes)
        scores[s] = float(r["cross"]["miou"])
        write_json(score_path, {"seed": s, "steps": trial_steps, "scenes": pick_scenes, "cross": scores[s],
                                "propagated_1": float(r["propagated_1"]["miou"])}, indent=1)
        log(f"[unet] seed {s}: class-token cross-attention IoU {scores[s]:.3f} on {pick_scenes} val scenes")
    best = max(scores, key=lambda s: (scores[s], -s))
    with atomic_path(_ckpt_path(work_dir, "unet")) as tmp:
        shutil.copyfile(_ckpt_path(root / f"seed{best}", "unet"), tmp)
    pick = {"seed": best, "scores": {str(k): v for k, v in scores.items()}, "trial_steps": trial_steps,
            "scenes": pick_scenes}
    write_json(pick_path, pick, indent=1)
    log(f"[unet] picked seed {best} ({scores[best]:.3f}); training it on to {settings.steps} steps")
    return pick


def train_hires(cache: SceneCache, work_dir: Path, settings: StageSettings, vae, unet, text_encoder, seed: int = 0,
                device: str = "cpu", resume: bool = False, progress: bool = True, log: Callable[[str], None] = print,
                stop_at: int | None = None, input_size: int = HIRES_SIZE):
    """Stage 5: the unet stage's UNet and text encoder trained on, with the same loss, on the scenes upsampled
    to ``input_size`` (default :data:`HIRES_SIZE`: 32x32 latents from the frozen 4x VAE). A UNet trained from
    scratch on 32x32 latents of a 2x VAE never tied its class tokens to the objects (cross-attention IoU
    0.10), while the 16x16-latent UNet, run as it is on 128 px input, already scored 0.44 at 32x32
    (benchmarks/results/toyworld_v2_2026-12-06.md); this stage adapts it. Returns (unet, text_encoder, record)."""
    if not is_int(input_size, 8) or input_size % 8:
        raise ValueError(f"input_size must be a positive multiple of 8, got {input_size!r}")
    return train_unet(cache, work_dir, settings, vae, text_encoder, seed, device, resume, progress, None, log,
                      stop_at, stage="hires", init_unet=unet, input_size=input_size)


# --------------------------------------------------------------------------------------------------
# final weights

def write_clip_weights(clip, out_dir: Path) -> Path:
    """``out_dir/clip``: the CLIP in open_clip's hf-hub layout, fp16 tensors."""
    import copy

    half = copy.deepcopy(clip).to(dtype=torch.float16)
    half.save_pretrained(Path(out_dir) / "clip")
    return Path(out_dir) / "clip"


def write_sd_weights(vae, unet, text_encoder, out_dir: Path) -> Path:
    """``out_dir/sd``: the diffusers pipeline layout (vae, unet, text_encoder, tokenizer, scheduler), fp16."""
    import copy

    sd = assemble_sd(copy.deepcopy(vae), copy.deepcopy(unet), copy.deepcopy(text_encoder)).to(dtype=torch.float16)
    return sd.save_pretrained(Path(out_dir) / "sd")


def _load_final_clip(work_dir: Path, device: str, stage: str = "clip"):
    from weakseg.backbones.clip import CLIPBackbone

    path = Path(work_dir) / "final" / stage
    if not path.is_dir():
        raise FileNotFoundError(f"{path} not found: run the {stage} stage first (--stage {stage})")
    return CLIPBackbone.from_pretrained(str(path), device=device)


def _load_final_vae(work_dir: Path, device: str):
    from diffusers import AutoencoderKL

    path = Path(work_dir) / "final" / "vae"
    if not path.is_dir():
        raise FileNotFoundError(f"{path} not found: run the vae stage first (--stage vae)")
    return AutoencoderKL.from_pretrained(str(path), local_files_only=True).to(device)


def _final_unet_dir(work_dir: Path, stage: str) -> Path:
    """Where the unet stage (``<work>/final``) or the hires stage (``<work>/final/hires``) writes its ``unet/``
    and ``text_encoder/``."""
    return Path(work_dir) / "final" / ("hires" if stage == "hires" else "")


def _load_final_unet(work_dir: Path, device: str, stage: str = "unet"):
    """The finished unet (or hires) stage's UNet and text encoder."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    root = _final_unet_dir(work_dir, stage)
    if not (root / "unet").is_dir() or not (root / "text_encoder").is_dir():
        raise FileNotFoundError(f"{root / 'unet'} and {root / 'text_encoder'} not found: run the {stage} stage "
                                f"first (--stage {stage})")
    unet = UNet2DConditionModel.from_pretrained(str(root / "unet"), local_files_only=True).to(device)
    text_encoder = CLIPTextModel.from_pretrained(str(root / "text_encoder"), local_files_only=True).to(device)
    return unet.float().eval(), text_encoder.float().eval()


def snapshot_sd(work_dir: str | os.PathLike | None = None, out_dir: str | os.PathLike = "toy_sd_snapshot",
                overrides: dict | None = None, device: str = "cpu", train_text: bool | None = None,
                stage: str = "unet") -> Path:
    """The unet (or hires: ``stage``) stage's latest checkpoint as Stable Diffusion weights in ``out_dir/sd`` (the committed layout,
    fp16), with the finished vae stage's VAE and the text stage's text tower (replaced by the checkpoint's
    text encoder when the stage trains it: ``train_text``, default :data:`TRAIN_TEXT_ENCODER`, as in
    :func:`train_unet`); so the signal (``python -m weakseg.toy.signal --sd out_dir/sd``) can be read while
    the stage is still running, as it was when the v2 toy SD was dropped
    (benchmarks/results/toyworld_v2_2026-12-06.md). ``overrides``: the unet config overrides the stage was
    run with. Returns ``out_dir/sd``."""
    if stage not in ("unet", "hires"):
        raise ValueError(f"snapshot_sd: stage must be 'unet' or 'hires', got {stage!r}")
    work_dir = Path(work_dir) if work_dir is not None else default_work_dir()
    path = _ckpt_path(work_dir, stage)
    if not path.is_file():
        raise FileNotFoundError(f"snapshot_sd: no {stage}-stage checkpoint at {path}; run --stage {stage} first")
    train_text = TRAIN_TEXT_ENCODER if train_text is None else bool(train_text)
    vae = _load_final_vae(work_dir, device)
    if stage == "hires":
        unet, text_encoder = _load_final_unet(work_dir, device)
        unet.register_to_config(sample_size=HIRES_SIZE // 2 ** (len(vae.config.block_out_channels) - 1))
    else:
        text_encoder = text_tower_to_hf(_load_final_clip(work_dir, device, "text").model)
        unet = build_unet(0, overrides)
    common.load_checkpoint(path, _UNetWithText(unet, text_encoder) if train_text else unet, None, CHECKPOINT_FORMAT)
    return write_sd_weights(vae, unet.eval(), text_encoder.eval(), Path(out_dir))


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def train(stage: str = "all", out_dir: str | os.PathLike | None = None, work_dir: str | os.PathLike | None = None,
          steps: dict[str, int] | None = None, batch: dict[str, int] | None = None, device: str = "cpu",
          resume: bool = False, seed: int = 0, num_scenes: int = NUM_SCENES, progress: bool = True,
          overrides: dict[str, dict] | None = None, ckpt_every: int | None = None, stop_at: int | None = None,
          log: Callable[[str], None] = print, unet_trials: int = UNET_TRIALS,
          unet_trial_steps: int = UNET_TRIAL_STEPS) -> dict[str, Any]:
    """Run ``stage`` ("clip", "crops", "text", "vae", "unet", "hires" or "all"); returns a summary (per stage: seconds per step,
    first/last losses; output paths and sizes). ``steps``/``batch``: per-stage overrides of
    :data:`DEFAULT_SETTINGS`; ``overrides``: per-stage model-config overrides (tests use tiny models).
    ``stop_at``: each stage stops (checkpointed) after that many steps; an unfinished stage ends the run
    (``summary["finished"]`` is False) and a later call with ``resume=True`` continues it. ``unet_trials``
    / ``unet_trial_steps``: the unet stage's seed trials (:func:`pick_unet_seed`; none when ``unet_trials``
    is 1 or the trial would not be shorter than the stage)."""
    if stage not in STAGES + ("all",):
        raise ValueError(f"stage must be one of {', '.join(STAGES + ('all',))}, got {stage!r}")
    if not is_int(unet_trials, 1) or not is_int(unet_trial_steps, 1):
        raise ValueError(f"unet_trials and unet_trial_steps must be ints >= 1, got {unet_trials!r} and "
                         f"{unet_trial_steps!r}")
    out_dir = Path(out_dir) if out_dir is not None else default_weights_dir()
    work_dir = Path(work_dir) if work_dir is not None else default_work_dir()
    work_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    todo = ALL_STAGES if stage == "all" else (stage,)
    settings = {}
    for s in STAGES:
        st = DEFAULT_SETTINGS[s]
        if steps and s in steps:
            st = replace(st, steps=int(steps[s]), warmup=min(st.warmup, max(1, int(steps[s]) // 10)))
        if batch and s in batch:
            st = replace(st, batch=int(batch[s]))
        if ckpt_every:
            st = replace(st, ckpt_every=int(ckpt_every))
        settings[s] = st
    overrides = overrides or {}
    cache = load_scene_cache(work_dir, num_scenes=num_scenes, seed=seed, progress=progress)
    summary: dict[str, Any] = {"device": device, "num_scenes": num_scenes, "seed": seed, "stages": {},
                               "threads": torch.get_num_threads(), "finished": True}

    def record(name, rec, st):
        summary["finished"] = rec["end_step"] >= st.steps
        losses = rec["losses"]
        summary["stages"][name] = {"settings": asdict(st), "seconds_per_step": rec["seconds_per_step"],
                                   "start_step": rec["start_step"],
                                   "loss_first50": float(np.mean(losses[:50])) if losses else None,
                                   "loss_last50": float(np.mean(losses[-50:])) if losses else None}
        if "latent_std" in rec:
            summary["stages"][name]["latent_std"] = rec["latent_std"]
        log(f"[{name}] done: {rec['seconds_per_step']:.3f} s/step, loss "
            f"{summary['stages'][name]['loss_first50']} -> {summary['stages'][name]['loss_last50']}")

    clip = text_clip = vae = None
    if "clip" in todo:
        clip, rec = train_clip(cache, work_dir, settings["clip"], seed, device, resume, progress,
                               overrides.get("clip"), log, stop_at)
        record("clip", rec, settings["clip"])
        if not summary["finished"]:
            return summary
        if "crops" not in todo:
            summary["clip_weights"] = str(write_clip_weights(clip, out_dir))
    if "crops" in todo:
        clip = clip if clip is not None else _load_final_clip(work_dir, device, "clip")
        clip, rec = train_crops(cache, work_dir, settings["crops"], clip, seed, device, resume, progress, log,
                                stop_at)
        record("crops", rec, settings["crops"])
        if not summary["finished"]:
            return summary
        summary["clip_weights"] = str(write_clip_weights(clip, out_dir))
    if "text" in todo:
        text_over = {**TEXT_CLIP_OVERRIDES, **(overrides.get("text") or {})}
        text_clip, rec = train_clip(cache, work_dir, settings["text"], seed, device, resume, progress, text_over, log,
                                    stop_at, stage="text")
        record("text", rec, settings["text"])
        if not summary["finished"]:
            return summary
    if "vae" in todo:
        vae, rec = train_vae(cache, work_dir, settings["vae"], seed, device, resume, progress,
                             overrides.get("vae"), log, stop_at)
        record("vae", rec, settings["vae"])
        if not summary["finished"]:
            return summary
    if "unet" in todo:
        text_clip = text_clip if text_clip is not None else _load_final_clip(work_dir, device, "text")
        vae = vae if vae is not None else _load_final_vae(work_dir, device)
        text_encoder = text_tower_to_hf(text_clip.model)
        unet_seed, unet_resume = seed, resume
        if unet_trials > 1 and unet_trial_steps < settings["unet"].steps:
            pick = pick_unet_seed(cache, work_dir, settings["unet"], vae, text_encoder, seed, device, resume,
                                  progress, overrides.get("unet"), log, stop_at, unet_trials, unet_trial_steps)
            if pick is None:
                summary["finished"] = False
                return summary
            summary["unet_trials"] = pick
            unet_seed, unet_resume = int(pick["seed"]), True
        unet, text_encoder, rec = train_unet(cache, work_dir, settings["unet"], vae, text_encoder, unet_seed, device,
                                             unet_resume, progress, overrides.get("unet"), log, stop_at)
        record("unet", rec, settings["unet"])
        if not summary["finished"]:
            return summary
        summary["sd_weights"] = str(write_sd_weights(vae, unet, text_encoder, out_dir))
    if "hires" in todo:
        vae = vae if vae is not None else _load_final_vae(work_dir, device)
        if "unet" not in todo:
            unet, text_encoder = _load_final_unet(work_dir, device)
        unet, text_encoder, rec = train_hires(cache, work_dir, settings["hires"], vae, unet, text_encoder, seed,
                                              device, resume, progress, log, stop_at)
        record("hires", rec, settings["hires"])
        if not summary["finished"]:
            return summary
        summary["sd_weights"] = str(write_sd_weights(vae, unet, text_encoder, out_dir))
    sizes = {p.name: dir_size(p) for p in (out_dir / "clip", out_dir / "sd") if p.is_dir()}
    summary["weights_bytes"] = sizes
    write_json(work_dir / f"summary_{stage}.json", summary, indent=1)
    return summary


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m weakseg.toy.train", description=__doc__.split("\n")[0])
    p.add_argument("--stage", default="all", choices=STAGES + ("all",))
    p.add_argument("--out", default=None, help="weights folder (default: the package's weights/)")
    p.add_argument("--work", default=None, help="scene cache and checkpoints (default: ~/.cache/weakseg/toy)")
    p.add_argument("--steps", type=int, default=None, help="steps of the selected stage (default: DEFAULT_SETTINGS)")
    p.add_argument("--batch", type=int, default=None, help="batch size of the selected stage")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--resume", action="store_true", help="continue from the stage's checkpoint")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-scenes", type=int, default=NUM_SCENES)
    p.add_argument("--ckpt-every", type=int, default=None)
    p.add_argument("--stop-at", type=int, default=None,
                   help="stop each stage after this many steps (checkpointed); continue later with --resume")
    p.add_argument("--unet-trials", type=int, default=UNET_TRIALS,
                   help="seeds the unet stage tries for UNET_TRIAL_STEPS steps before it trains the best on (1: no trials)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-progress", action="store_true", help="log lines instead of progress bars")
    p.add_argument("--snapshot", default=None, metavar="DIR",
                   help="write the unet stage's (with --stage hires: the hires stage's) latest checkpoint as SD "
                        "weights to DIR/sd (to measure the signal mid-training) and exit")
    a = p.parse_args(argv)
    if a.snapshot is not None:
        try:
            where = snapshot_sd(a.work, a.snapshot, device=a.device,
                                stage="hires" if a.stage == "hires" else "unet")
        except FileNotFoundError as e:
            p.error(str(e))
        print(f"written to {where}")
        return {"snapshot": str(where)}
    if a.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    if a.unet_trials < 1:
        p.error(f"--unet-trials must be >= 1, got {a.unet_trials}")
    if a.threads is not None:
        if a.threads < 1:
            p.error(f"--threads must be >= 1, got {a.threads}")
        torch.set_num_threads(a.threads)
    per = (ALL_STAGES if a.stage == "all" else (a.stage,))
    steps = {s: a.steps for s in per} if a.steps is not None else None
    batch = {s: a.batch for s in per} if a.batch is not None else None
    summary = train(a.stage, a.out, a.work, steps, batch, a.device, a.resume, a.seed, a.num_scenes,
                    progress=not a.no_progress, ckpt_every=a.ckpt_every, stop_at=a.stop_at,
                    log=lambda m: print(m, flush=True), unet_trials=a.unet_trials)
    print(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    main()
