"""Does the toy world's training carry real signal? ``python -m weakseg.toy.signal``.

Three figures on held-out ``"val"`` scenes (never seen in training):

1. CLIP zero-shot accuracy on single-object scenes: the scene's class is the argmax of the cosine between
   the image embedding and the prompt-averaged class embeddings (``templates``: "single" = "a photo of a
   {}.", or "ensemble").
2. SD class-token cross-attention IoU: each scene (1-2 objects) is VAE-encoded (posterior mean), noised to
   timestep ``t`` (seeded noise) and passed once through the UNet with its caption; the cross-attention
   probabilities of the layers at the chosen latent resolution (default: the largest, 16x16) are averaged
   over layers and heads (``LayerCapture(store="mean", group="resolution")``), the columns of the class
   word's token(s) (every occurrence) are averaged into one map per class present, bilinearly upsampled to
   the image, min-max normalised per class, and thresholded at a sweep of thresholds; the figure is the
   mean IoU with the class's mask over all (scene, class) pairs at the best single threshold.
3. The same after propagating the maps with the self-attention of that resolution (head- and layer-mean),
   ``weakseg.ops.refine_propagate`` with ``steps=1`` (one propagation) and ``steps=10`` (iSeg-like).
4. Binding (:func:`binding_figures`, on the maps of 2): whether a class's map favours its own object over
   the scene's other one, and the IoU split into one-object and two-object scenes. The SD methods lose most
   of their signal here, not to the grid (benchmarks/results/toyworld_v2_2026-12-06.md).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from weakseg.core import is_int
from weakseg.toy.world import CLASSES, OBJECT_CLASSES, ToyWorld
from weakseg.io import write_json

__all__ = ["clip_zero_shot_accuracy", "sd_attention_iou", "best_threshold_iou", "binding_figures", "run_signal",
           "main"]

THRESHOLDS = tuple(np.round(np.linspace(0.05, 0.95, 19), 3).tolist())


@torch.no_grad()
def clip_zero_shot_accuracy(clip, num_scenes: int = 200, templates: str = "single", seed: int = 0,
                            batch: int = 100) -> dict[str, Any]:
    """Zero-shot accuracy of ``clip`` (a :class:`~weakseg.backbones.CLIPBackbone`) on the first ``num_scenes``
    single-object val scenes of ``ToyWorld(64, "val", seed=seed)`` -> {"accuracy", "num_scenes",
    "per_class", "templates"}."""
    if num_scenes < 1:
        raise ValueError(f"num_scenes must be >= 1, got {num_scenes}")
    world = ToyWorld(size=64, split="val", num_scenes=num_scenes, min_objects=1, max_objects=1, seed=seed)
    emb = clip.class_embeddings(list(OBJECT_CLASSES), templates=templates).classes.float()
    scenes = [world.scene(i) for i in range(num_scenes)]
    truth = torch.tensor([s.objects[0].cls - 1 for s in scenes])
    size = clip.native_grid[0] * clip.patch_size[0]
    preds = []
    for i in range(0, num_scenes, batch):
        imgs = torch.stack([s.image for s in scenes[i:i + batch]])
        feats = F.normalize(clip(imgs, size=size).cls.float(), dim=-1)
        preds.append((feats @ emb.T.to(feats.device)).argmax(-1).cpu())
    pred = torch.cat(preds)
    per_class = {c: float((pred[truth == k] == k).float().mean()) if (truth == k).any() else None
                 for k, c in enumerate(OBJECT_CLASSES)}
    return {"accuracy": float((pred == truth).float().mean()), "num_scenes": num_scenes, "per_class": per_class,
            "templates": templates}


def best_threshold_iou(maps: list[torch.Tensor], masks: list[torch.Tensor],
                       thresholds=THRESHOLDS) -> tuple[float, float, list[float]]:
    """maps: per (scene, class) a min-max normalised map (H, W) in [0, 1]; masks: the matching bool masks.
    Returns (best mean IoU, its threshold, mean IoU per threshold)."""
    if not maps or len(maps) != len(masks):
        raise ValueError(f"best_threshold_iou: expected equally many maps and masks (>= 1), got {len(maps)}, {len(masks)}")
    m = torch.stack([x.float() for x in maps])
    g = torch.stack([x.bool() for x in masks])
    curve = []
    for th in thresholds:
        p = m >= th
        inter = (p & g).flatten(1).sum(1).float()
        union = (p | g).flatten(1).sum(1).float().clamp_min(1)
        curve.append(float((inter / union).mean()))
    k = int(np.argmax(curve))
    return curve[k], float(thresholds[k]), curve


def binding_figures(maps: list[torch.Tensor], masks: list[torch.Tensor], others: list[torch.Tensor],
                    classes: list[int]) -> dict[str, Any]:
    """Does a class's map sit on its own object or on another one? ``maps``/``masks`` as in
    :func:`best_threshold_iou`; ``others``: per pair the bool mask of the scene's other objects (empty when
    the scene has one); ``classes``: the pair's class id. Returns the share of the pairs with another object
    whose map is higher on its own object than on the others, per pixel ("own_over_other", also per class:
    the mean over each region, so a large other object does not win by its area alone; triangles and stars
    cover about half a circle's pixels), and the best-threshold IoU on one-object scenes, on scenes with
    several, and against all objects' union."""
    if not (len(maps) == len(masks) == len(others) == len(classes)) or not maps:
        raise ValueError(f"binding_figures: expected equally many maps, masks, others and classes (>= 1), got "
                         f"{len(maps)}, {len(masks)}, {len(others)}, {len(classes)}")
    several = [i for i, o in enumerate(others) if bool(o.any())]
    single = [i for i, o in enumerate(others) if not bool(o.any())]
    right = {i: float(maps[i][masks[i]].mean()) > float(maps[i][others[i]].mean()) for i in several
             if bool(masks[i].any())}
    per_class = {}
    for c in sorted({classes[i] for i in right}):
        r = [right[i] for i in right if classes[i] == c]
        per_class[CLASSES[c]] = sum(r) / len(r)

    def iou(idx, target):
        return best_threshold_iou([maps[i] for i in idx], [target[i] for i in idx])[0] if idx else None

    union = [m | o for m, o in zip(masks, others)]
    return {"pairs_with_another_object": len(right),
            "own_over_other": sum(right.values()) / len(right) if right else None, "own_over_other_per_class": per_class,
            "iou_one_object": iou(single, masks), "iou_several_objects": iou(several, masks),
            "iou_vs_all_objects": iou(list(range(len(maps))), union)}


def _minmax(x: torch.Tensor) -> torch.Tensor:
    lo = x.flatten(-2).amin(-1)[..., None, None]
    hi = x.flatten(-2).amax(-1)[..., None, None]
    return (x - lo) / (hi - lo).clamp_min(1e-12)


def _class_token_columns(sd, caption: str, cls_name: str) -> list[int]:
    cols, occ = [], 0
    while True:
        try:
            cols += sd.token_indices(caption, cls_name, occurrence=occ)
        except ValueError:
            return cols
        occ += 1


@torch.no_grad()
def sd_attention_iou(sd, num_scenes: int = 100, t: int = 100, resolution: int | None = None, ent: float = 0.015,
                     seed: int = 0, image_size: int = 64, input_size: int | None = None) -> dict[str, Any]:
    """Figures 2 and 3 of the module docstring for ``sd`` (a :class:`~weakseg.backbones.StableDiffusionBackbone`)
    on the first ``num_scenes`` val scenes with 1-2 objects -> {"cross": {...}, "propagated_1": {...},
    "propagated_10": {...}, "resolution", "t", "num_pairs", ...}, each {"miou", "threshold"}. ``input_size``:
    the side the scenes are resized to (bilinear) before the VAE (default ``image_size``), as a method's
    ``size`` setting does; the maps are scored at ``image_size``."""
    from weakseg.backbones.attention import LayerCapture
    from weakseg.ops import refine_propagate

    if num_scenes < 1:
        raise ValueError(f"num_scenes must be >= 1, got {num_scenes}")
    if input_size is not None and not is_int(input_size, 8):
        raise ValueError(f"input_size must be an int >= 8 or None, got {input_size!r}")
    world = ToyWorld(size=image_size, split="val", num_scenes=num_scenes, min_objects=1, max_objects=2, seed=seed)
    spec = [LayerCapture("*attn2", store="mean", group="resolution"),
            LayerCapture("*attn1", store="mean", group="resolution")]
    maps: dict[str, list[torch.Tensor]] = {"cross": [], "propagated_1": [], "propagated_10": []}
    masks: list[torch.Tensor] = []
    others: list[torch.Tensor] = []
    kept_classes: list[int] = []
    gen = torch.Generator().manual_seed(seed)
    res_used = None
    for i in range(num_scenes):
        s = world.scene(i)
        present = [c for c in s.image_labels if c > 0]
        if not present:
            continue
        z = sd.encode_images(s.image[None], size=input_size or image_size, resample="bilinear")
        noise = torch.randn(z.shape, generator=gen).to(z)
        zt, _ = sd.add_noise(z, t, noise=noise)
        embeds, _ = sd.encode_prompt(s.caption)
        _, store = sd.unet(zt, t, embeds, capture=spec)
        grids = store.resolutions("cross")
        res = (resolution, resolution) if resolution is not None else grids[0]
        res_used = res
        cross = store.resolution_mean("cross", res)[0]  # (P, 77)
        selfa = store.resolution_mean("self", res)      # (1, P, P)
        cols, keep = [], []
        for c in present:
            idx = _class_token_columns(sd, s.caption, CLASSES[c])
            if idx:
                cols.append(cross[:, idx].mean(-1))
                keep.append(c)
        if not cols:
            continue
        m = torch.stack(cols, -1)[None]  # (1, P, K)
        variants = {"cross": m, "propagated_1": refine_propagate(selfa, m, ent=ent, steps=1),
                    "propagated_10": refine_propagate(selfa, m, ent=ent, steps=10)}
        for name, v in variants.items():
            grid = v[0].T.reshape(len(keep), 1, *res).float()
            up = F.interpolate(grid, size=(image_size, image_size), mode="bilinear", align_corners=False)[:, 0]
            maps[name].extend(_minmax(up).cpu())
        masks.extend(s.label == c for c in keep)
        others.extend((s.label > 0) & (s.label != c) for c in keep)
        kept_classes.extend(keep)
    if not masks:
        raise ValueError("sd_attention_iou: no (scene, class) pair with a class token was found")
    out: dict[str, Any] = {"num_scenes": num_scenes, "num_pairs": len(masks), "t": t, "ent": ent,
                           "resolution": list(res_used)}
    for name, lst in maps.items():
        miou, th, curve = best_threshold_iou(lst, masks)
        out[name] = {"miou": miou, "threshold": th, "curve": [round(c, 4) for c in curve]}
    out["binding"] = binding_figures(maps["cross"], masks, others, kept_classes)
    return out


def run_signal(clip=None, sd=None, num_clip: int = 200, num_sd: int = 100, t: int = 100,
               resolution: int | None = None, out: str | Path | None = None,
               input_size: int | None = None) -> dict[str, Any]:
    """All three figures (a part is skipped when its model is None) -> dict, also written to ``out`` (JSON)."""
    result: dict[str, Any] = {}
    if clip is not None:
        result["clip_zero_shot"] = clip_zero_shot_accuracy(clip, num_clip, "single")
        result["clip_zero_shot_ensemble"] = clip_zero_shot_accuracy(clip, num_clip, "ensemble")
    if sd is not None:
        result["sd_attention"] = sd_attention_iou(sd, num_sd, t=t, resolution=resolution,
                                                   input_size=input_size)
    if out is not None:
        write_json(out, result, indent=1)
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from weakseg.toy import load_toy_clip, load_toy_sd, toy_weights_available

    p = argparse.ArgumentParser(prog="python -m weakseg.toy.signal", description=__doc__.split("\n")[0])
    p.add_argument("--clip", default=None, help="CLIP weights folder (default: the committed weights)")
    p.add_argument("--sd", default=None, help="Stable Diffusion weights folder (default: the committed weights)")
    p.add_argument("--num-clip", type=int, default=200)
    p.add_argument("--num-sd", type=int, default=100)
    p.add_argument("--t", type=int, default=100, help="diffusion timestep of the UNet pass")
    p.add_argument("--resolution", type=int, default=None, help="latent grid side of the attention layers")
    p.add_argument("--input-size", type=int, default=None,
                   help="side the 64 px scenes are resized to before SD's VAE (default 64)")
    p.add_argument("--only", choices=("clip", "sd"), default=None, help="measure one model only")
    p.add_argument("--out", default="outputs/toyworld_signal.json")
    a = p.parse_args(argv)
    want_clip, want_sd = a.only in (None, "clip"), a.only in (None, "sd")
    clip = load_toy_clip(a.clip) if want_clip and (a.clip or toy_weights_available("clip")) else None
    sd = load_toy_sd(a.sd) if want_sd and (a.sd or toy_weights_available("sd")) else None
    if clip is None and sd is None:
        p.error("no toy weights found; train them with `python -m weakseg.toy.train`")
    if clip is None and want_clip:
        print("CLIP weights missing: skipping the zero-shot figure")
    if sd is None and want_sd:
        print("Stable Diffusion weights missing: skipping the attention figures")
    res = run_signal(clip, sd, a.num_clip, a.num_sd, a.t, a.resolution, a.out, a.input_size)
    if "clip_zero_shot" in res:
        print(f"CLIP zero-shot accuracy (single-object val, {res['clip_zero_shot']['num_scenes']} scenes): "
              f"{res['clip_zero_shot']['accuracy']:.3f} ('a photo of a {{}}.'), "
              f"{res['clip_zero_shot_ensemble']['accuracy']:.3f} (ensemble)")
    if "sd_attention" in res:
        r = res["sd_attention"]
        print(f"SD class-token mIoU at {r['resolution'][0]}x{r['resolution'][1]}, t={r['t']}, {r['num_pairs']} pairs: "
              f"cross {r['cross']['miou']:.3f} (th {r['cross']['threshold']}), "
              f"1 propagation {r['propagated_1']['miou']:.3f}, 10 steps {r['propagated_10']['miou']:.3f}")
        b = r["binding"]
        if b["own_over_other"] is not None:
            print(f"  binding (raw cross-attention): higher per pixel on its own object than on the others in "
                  f"{b['own_over_other']:.0%} of {b['pairs_with_another_object']} pairs "
                  f"({', '.join(f'{k} {v:.0%}' for k, v in b['own_over_other_per_class'].items())}); IoU "
                  f"one-object scenes {b['iou_one_object'] or float('nan'):.3f}, several objects "
                  f"{b['iou_several_objects']:.3f}, vs all objects {b['iou_vs_all_objects']:.3f}")
    print(f"written to {a.out}")
    return res


if __name__ == "__main__":
    main()
