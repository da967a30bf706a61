"""DiCLIP's key-value cache (TSA, docs/specs/diclip.md §3a): the file format and its builder.

File: safetensors with

* ``keys`` (M, D) float32: k-means centroids of mask-average-pooled CLIP token features, the
  background centroids first, then each class's;
* ``values`` (M, C + 1) float32: the one-hot class of each key (column 0 = background);
* ``text_weights`` (M, C + 1) float32: the text-weighted values (§3b step 2: per class a softmax over
  its own keys of K·T21ᵀ), computed with the text embeddings of the build;

and string metadata ``format`` = ``weakseg-diclip-cache``, ``version``, ``class_names`` (JSON, background
first), ``embed_dim``, ``clip_model``, ``source`` ("generated" or the dataset), ``fg_centroids``,
``bg_centroids``, ``counts`` (pooled features per class before clustering), ``config`` (JSON).

Build (:func:`build_cache`): for every image (SD-generated single-class images with the paper's prompt,
45 steps, guidance 10, 384² resized to 512 with LANCZOS; or a dataset's real images with their
image-level labels) the training-free pipeline gives a pseudo mask (CAM -> CAA 0.79 -> SD walk x10 ->
argmax), the VCE token features are pooled under each present class's mask and under the background
(``weakseg.ops.masked_area_pool``, masks nearest-downsampled to the patch grid as in the code, or the
area weights as an option), and the per-image results are written to ``<work_dir>/items/`` one file
each (atomic, so an interrupted build resumes). The mask is made at the image's own size (512 px for
generated images, as the code's masks) and nearest-downsampled to the patch grid. Then per class k-means
(scikit-learn on float32 features, random_state 0, one k-means++ start as the code's ``KMeans(n, random_state=0)``
runs on scikit-learn >= 1.4; fg 10 for VOC / 5 for COCO, background 20) and the final file, written
atomically.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from weakseg.core import is_int, read_safetensors
from weakseg.io import save_safetensors, write_text

__all__ = ["KVCache", "CacheError", "CacheBuildConfig", "build_cache", "kmeans_centroids", "GENERATION_PROMPT",
           "FORMAT", "VERSION"]

FORMAT = "weakseg-diclip-cache"
VERSION = "1"
GENERATION_PROMPT = ("a realistic photograph of a fully visible, entire {c} with natural colors, centered in the "
                     "image, with a clear and distinct background, high color contrast, and the {c} not occupying "
                     "the entire frame, ensuring it is completely visible without cropping.")


class CacheError(ValueError):
    """A cache file is unreadable, malformed, or does not fit the model / classes it is used with."""


@dataclass
class KVCache:
    """A loaded cache (see the module docstring)."""

    keys: torch.Tensor
    values: torch.Tensor
    text_weights: torch.Tensor
    class_names: list[str]
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        k, v, w = self.keys, self.values, self.text_weights
        if k.dim() != 2 or v.dim() != 2 or w.dim() != 2:
            raise CacheError(f"cache: expected keys (M, D), values and text_weights (M, C + 1), got "
                             f"{tuple(k.shape)}, {tuple(v.shape)}, {tuple(w.shape)}")
        if not (k.shape[0] == v.shape[0] == w.shape[0]) or v.shape != w.shape:
            raise CacheError(f"cache: keys, values and text_weights disagree: {tuple(k.shape)}, {tuple(v.shape)}, "
                             f"{tuple(w.shape)}")
        if v.shape[1] != len(self.class_names):
            raise CacheError(f"cache: {v.shape[1]} value columns for {len(self.class_names)} class names")
        if v.numel() and not (((v == 0) | (v == 1)).all() and (v.sum(1) == 1).all()):
            raise CacheError("cache: values must be one-hot rows")
        if not torch.isfinite(k).all() or not torch.isfinite(w).all():
            raise CacheError("cache: keys / text_weights contain non-finite numbers")

    @property
    def num_keys(self) -> int:
        return int(self.keys.shape[0])

    @property
    def embed_dim(self) -> int:
        return int(self.keys.shape[1])

    def save(self, path: str | os.PathLike) -> Path:
        p = Path(path)
        meta = {"format": FORMAT, "version": VERSION, "class_names": json.dumps(self.class_names),
                "embed_dim": str(self.embed_dim)}
        meta.update({k: (v if isinstance(v, str) else json.dumps(v)) for k, v in self.meta.items()
                     if k not in meta})
        save_safetensors({"keys": self.keys.float(), "values": self.values.float(),
                          "text_weights": self.text_weights.float()}, p, meta)
        return p

    @classmethod
    def load(cls, path: str | os.PathLike) -> "KVCache":
        tensors, meta = read_safetensors(path, "cache", "build one with `weakseg cache build`", CacheError)
        p = Path(path)
        missing = {"keys", "values", "text_weights"} - set(tensors)
        if missing:
            raise CacheError(f"cache {str(p)!r}: missing tensor(s) {sorted(missing)}; expected keys, values, "
                             f"text_weights")
        keys, values, tw = (tensors[n].float() for n in ("keys", "values", "text_weights"))
        if meta.get("format") != FORMAT:
            raise CacheError(f"cache {str(p)!r}: format {meta.get('format')!r} is not {FORMAT!r}")
        if meta.get("version") != VERSION:
            raise CacheError(f"cache {str(p)!r}: version {meta.get('version')!r}, this weakseg reads {VERSION!r}")
        try:
            class_names = json.loads(meta["class_names"])
        except (KeyError, json.JSONDecodeError) as e:
            raise CacheError(f"cache {str(p)!r}: metadata 'class_names' is missing or not JSON") from e
        extra = {k: v for k, v in meta.items() if k not in ("format", "version", "class_names", "embed_dim")}
        try:
            return cls(keys, values, tw, list(class_names), extra)
        except CacheError as e:
            raise CacheError(f"cache {str(p)!r}: {e}") from None

    def check(self, class_names: Sequence[str], embed_dim: int) -> None:
        """Raise :class:`CacheError` unless the cache fits ``class_names`` (background first) and CLIP
        features of ``embed_dim``."""
        if self.embed_dim != int(embed_dim):
            raise CacheError(f"cache: keys of dimension {self.embed_dim} do not fit this CLIP's {embed_dim}-d features "
                             f"(built with clip_model={self.meta.get('clip_model')!r})")
        if [str(c) for c in class_names] != self.class_names:
            raise CacheError(f"cache: built for classes {self.class_names}, used with {list(class_names)}")


# ------------------------------------------------------------------------------------------- build

@dataclass
class CacheBuildConfig:
    """Options of :func:`build_cache` (defaults: the code's VOC build).

    source: "generated" (SD images, one class each) or "dataset" (real images with image-level labels).
    images_per_class: generated images per class (~100 in the reference). gen_prompt: the paper's
    template, ``{c}`` = class name. gen_steps / gen_guidance / gen_seed / gen_size / gen_resize: 45, 10,
    4307 (image i of the build uses seed gen_seed + i), 384² generated, LANCZOS-resized to 512.
    gen_batch: images per generation call. max_images: cap on the dataset images used (None = all).
    fg_centroids / bg_centroids: k-means centroids per class (VOC 10, COCO 5) / for the background (20;
    the top-level script 25). kmeans_seed: 0. kmeans_n_init: k-means++ starts, 1 (the code's call on
    scikit-learn >= 1.4, where ``n_init="auto"`` means one start; older scikit-learn ran 10, which weakseg
    pinned before: pass 10 for that behaviour, about 10x the clustering time). mask_pooling: "nearest" (the code: mask nearest-downsampled
    to the patch grid) or "area" (covered fraction of each patch). caa_threshold / walk_steps: the mask
    pipeline (0.79, 10). batch_size: images per CAM pass."""

    source: str = "generated"
    images_per_class: int = 100
    gen_prompt: str = GENERATION_PROMPT
    gen_steps: int = 45
    gen_guidance: float = 10.0
    gen_seed: int = 4307
    gen_size: int = 384
    gen_resize: int | None = 512
    gen_batch: int = 4
    max_images: int | None = None
    fg_centroids: int = 10
    bg_centroids: int = 20
    kmeans_seed: int = 0
    kmeans_n_init: int = 1
    mask_pooling: str = "nearest"
    caa_threshold: float = 0.79
    walk_steps: int = 10
    batch_size: int = 4

    def __post_init__(self) -> None:
        if self.source not in ("generated", "dataset"):
            raise ValueError(f"CacheBuildConfig.source: expected 'generated' or 'dataset', got {self.source!r}")
        if self.mask_pooling not in ("nearest", "area"):
            raise ValueError(f"CacheBuildConfig.mask_pooling: expected 'nearest' or 'area', got {self.mask_pooling!r}")
        for n in ("images_per_class", "gen_steps", "gen_size", "gen_batch", "fg_centroids", "bg_centroids",
                  "batch_size", "kmeans_n_init"):
            v = getattr(self, n)
            if not is_int(v, 1):
                raise ValueError(f"CacheBuildConfig.{n}: expected an int >= 1, got {v!r}")
        if "{c}" not in self.gen_prompt:
            raise ValueError(f"CacheBuildConfig.gen_prompt: expected a template with {{c}} for the class, got "
                             f"{self.gen_prompt!r}")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "CacheBuildConfig":
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"CacheBuildConfig: unknown option(s) {', '.join(unknown)}; known: "
                             f"{', '.join(sorted(known))}")
        return cls(**values)


def kmeans_centroids(x: torch.Tensor, k: int, seed: int = 0, n_init: int = 1) -> torch.Tensor:
    """scikit-learn KMeans (k-means++, random_state ``seed``, ``n_init`` starts) of the rows of ``x`` (n, D)
    as float32 (the code clusters its float32 features) -> (min(k, n), D) centroids in float32; with
    n <= k the rows themselves."""
    if not is_int(n_init, 1):
        raise ValueError(f"kmeans_centroids: n_init must be an int >= 1, got {n_init!r}")
    if x.shape[0] <= k:
        return x.float().clone()
    try:
        from sklearn.cluster import KMeans
    except ImportError:
        raise ImportError("building a DiCLIP cache clusters with scikit-learn: pip install scikit-learn") from None
    km = KMeans(n_clusters=int(k), random_state=int(seed), n_init=n_init).fit(x.float().numpy())
    return torch.from_numpy(km.cluster_centers_).float()


def _item_path(work: Path, key: str) -> Path:
    return work / "items" / f"{key}.safetensors"


# method options that do not change the pooled features (left out of a build's fingerprint)
_NOT_FINGERPRINTED = ("device", "dtype", "cache", "checkpoint", "mode", "cam_source", "static_weight", "dynamic_weight",
                      "test_scales", "flip", "merge_scale", "head_use_image_labels", "preset", "cache_dir")


def _fingerprint(method_cfg: dict, build_cfg: dict, class_names: Sequence[str]) -> str:
    m = {k: v for k, v in method_cfg.items()
         if k not in _NOT_FINGERPRINTED and not k.startswith(("crf", "head_", "adapter_"))}
    b = {k: v for k, v in build_cfg.items() if k not in ("gen_batch", "batch_size")}
    blob = json.dumps({"m": m, "b": b, "c": list(class_names)}, sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def _pool(method, sized: torch.Tensor, labels: torch.Tensor, feats: torch.Tensor, grid, classes_per_image,
          pooling: str):
    """Per image: {class id (0 = background): pooled feature (D,)} for the present classes.

    "nearest" (the code): the label map nearest-downsampled to the patch grid once, then the mean of the
    patch features under each class's cells (one (M, P) x (P, D) product); "area": the covered fraction of
    each patch (``weakseg.ops.masked_area_pool`` on the full-resolution masks)."""
    from weakseg.ops import masked_area_pool

    import torch.nn.functional as F

    B = sized.shape[0]
    D = feats.shape[-1]
    out = []
    for b in range(B):
        ids = [0] + [c for c in classes_per_image[b] if c != 0]
        if pooling == "nearest":
            small = F.interpolate(labels[b][None, None].float(), size=grid, mode="nearest")[0, 0].flatten()
            m = (small[None, :] == torch.tensor(ids, dtype=small.dtype, device=small.device)[:, None]).float()
            area = m.sum(1)
            pooled = (m @ feats[b, 1:].float().to(m.device)) / area.clamp_min(1)[:, None]
        else:
            f = feats[b:b + 1, 1:].transpose(1, 2).reshape(1, D, grid[0], grid[1]).contiguous()
            masks = torch.stack([labels[b] == c for c in ids])[None].float()  # (1, M, S, S)
            pooled, area = masked_area_pool(f, masks, normalize=False)
            pooled, area = pooled[0], area[0]
        out.append({c: pooled[j] for j, c in enumerate(ids) if float(area[j]) > 0})
    return out


def build_cache(method, class_names: Sequence[str], out: str | os.PathLike, config: CacheBuildConfig | None = None,
                dataset=None, work_dir: str | os.PathLike | None = None, progress: bool = True) -> KVCache:
    """Build a cache with the DiCLIP segmenter ``method`` (its CLIP, SD and VCE settings give the masks and
    features) for ``class_names`` (background first) and write it to ``out``. ``dataset``: a reader whose
    items have ``image`` and ``image_labels`` (source "dataset"). ``work_dir`` (default ``<out>.work``)
    holds the per-image results; rerunning with the same settings skips what is there."""
    from tqdm.auto import tqdm

    cfg = config or CacheBuildConfig()
    names = [str(c) for c in class_names]
    from weakseg.methods.common import has_background

    if not has_background(names) or len(names) < 2:
        raise ValueError(f"class_names: DiCLIP's cache needs the background first and at least one class, got {names}")
    out = Path(out)
    work = Path(work_dir) if work_dir is not None else out.with_name(out.name + ".work")
    fp = _fingerprint(method.config.to_dict(), asdict(cfg), names)
    stamp = work / "fingerprint.txt"
    if stamp.exists() and stamp.read_text().strip() != fp:
        raise ValueError(f"work_dir {str(work)!r} holds a build with other settings (fingerprint "
                         f"{stamp.read_text().strip()} != {fp}); use another work_dir or delete it")
    work.mkdir(parents=True, exist_ok=True)
    write_text(stamp, fp + "\n")
    fg = names[1:]
    C = len(names)

    # ---- the work list: (key, class ids present, image source)
    jobs: list[tuple[str, list[int], Any]] = []
    if cfg.source == "generated":
        for c in range(1, C):
            for i in range(cfg.images_per_class):
                jobs.append((f"gen_{c:03d}_{i:05d}", [0, c], ("gen", c, (c - 1) * cfg.images_per_class + i)))
    else:
        if dataset is None:
            raise ValueError("build_cache: source 'dataset' needs dataset= (a reader with image and image_labels)")
        n = len(dataset) if cfg.max_images is None else min(cfg.max_images, len(dataset))
        for i in range(n):
            jobs.append((f"real_{i:07d}", None, ("real", i)))
    todo = [j for j in jobs if not _item_path(work, j[0]).exists()]
    bar = tqdm(total=len(jobs), initial=len(jobs) - len(todo), desc="diclip cache", disable=not progress)
    step = cfg.gen_batch if cfg.source == "generated" else cfg.batch_size
    for s in range(0, len(todo), step):
        chunk = todo[s:s + step]
        images, present = [], []
        if cfg.source == "generated":
            images = _generate(method, cfg, [fg[j[2][1] - 1] for j in chunk], [j[2][2] for j in chunk])
            present = [j[1] for j in chunk]
        else:
            for key, _, (_, i) in chunk:
                smp = dataset[i]
                images.append(smp.image)
                present.append(sorted({int(c) for c in smp.image_labels if 0 <= int(c) < C} | {0}))
        for (key, _, _), img, cls_ids in zip(chunk, images, present):
            tensors = {}
            if len(cls_ids) > 1:
                pooled = method.pseudo_mask_features(img, names, cls_ids, caa_threshold=cfg.caa_threshold,
                                                     walk_steps=cfg.walk_steps, pooling=cfg.mask_pooling)
                tensors = {f"c{c}": v for c, v in pooled.items()}
            if not tensors:
                tensors = {"empty": torch.zeros(1)}
            save_safetensors(tensors, _item_path(work, key), {"key": key})
            bar.update(1)
    bar.close()

    # ---- collect and cluster
    from safetensors.torch import load_file

    per_class: dict[int, list[torch.Tensor]] = {c: [] for c in range(C)}
    for key, _, _ in jobs:
        for name, v in load_file(str(_item_path(work, key))).items():
            if name.startswith("c"):
                per_class[int(name[1:])].append(v.float())
    counts = {names[c]: len(v) for c, v in per_class.items()}
    keys, values = [], []
    for c in range(C):
        if not per_class[c]:
            continue
        k = cfg.bg_centroids if c == 0 else cfg.fg_centroids
        cent = kmeans_centroids(torch.stack(per_class[c]), k, cfg.kmeans_seed, cfg.kmeans_n_init)
        keys.append(cent)
        v = torch.zeros(cent.shape[0], C)
        v[:, c] = 1
        values.append(v)
    if not keys:
        raise ValueError("build_cache: no image gave a usable mask; nothing to cache")
    K, V = torch.cat(keys), torch.cat(values)
    W = method.text_weights_for(K, V, names)
    cache = KVCache(K, V, W, names, meta={
        "clip_model": method.config.clip_model, "source": cfg.source if cfg.source == "generated" else
        str(getattr(dataset, "name", type(dataset).__name__)), "fg_centroids": cfg.fg_centroids,
        "bg_centroids": cfg.bg_centroids, "counts": counts, "config": asdict(cfg), "fingerprint": fp,
        "template": json.dumps(method.config.templates)})
    cache.save(out)
    return cache


def _generate(method, cfg: CacheBuildConfig, class_names: list[str], indices: list[int]) -> list[torch.Tensor]:
    """SD text-to-image of the class prompts, seed gen_seed + index each; LANCZOS-resized to gen_resize."""
    sd = method.generation_sd()
    prompts = [cfg.gen_prompt.replace("{c}", method.prompt_name(c)) for c in class_names]
    gens = [torch.Generator(device=sd.device).manual_seed(cfg.gen_seed + i) for i in indices]
    imgs = sd.generate(prompts, num_inference_steps=cfg.gen_steps, guidance_scale=cfg.gen_guidance, generator=gens,
                       height=cfg.gen_size, width=cfg.gen_size)
    out = []
    for im in imgs:
        if cfg.gen_resize and cfg.gen_resize != cfg.gen_size:
            import numpy as np
            from PIL import Image

            pil = Image.fromarray(im.permute(1, 2, 0).numpy()).resize((cfg.gen_resize, cfg.gen_resize), Image.LANCZOS)
            im = torch.from_numpy(np.asarray(pil)).permute(2, 0, 1).contiguous()
        out.append(im)
    return out
