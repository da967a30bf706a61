"""The toy world: a deterministic procedural generator of segmentation scenes.

Each scene is a few coloured shapes (the object classes) over one textured
"stuff" background, with its pixel label map, its image-level labels and a
caption such as ``"a photo of a red circle and a blue star on grass"``. The
toy world is the offline test bed of weakseg: the tiny CLIP and diffusion
models are trained on it and every method is scored on held-out scenes.

Scene ``i`` of a world depends only on ``(seed, i)``, so any subset can be
regenerated in any order; the splits use disjoint seeds, so the demo's
held-out scenes are never seen in training.

Labels: 0 = background (the stuff), 1.. = the object classes of ``CLASSES``.
Masks are the visible pixels: a later object covers an earlier one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from weakseg.core import GENERATED_DATASETS, is_int
from weakseg.data.captions import CaptionSample

__all__ = ["CLASSES", "OBJECT_CLASSES", "COLORS", "STUFF", "SPLIT_SEEDS", "ToyObject", "ToyScene", "ToyWorld",
           "caption_for", "crop_half", "crop_objects", "CROP_HALF", "CROP_MIN_HALF", "ToyCaptions", "open_toyworld", "open_toy_captions"]

OBJECT_CLASSES = ("circle", "square", "triangle", "star", "ring")
CLASSES = ("background",) + OBJECT_CLASSES
# colour name -> RGB in [0, 1]
COLORS = {
    "red": (0.86, 0.16, 0.14), "green": (0.15, 0.66, 0.22), "blue": (0.16, 0.3, 0.88),
    "yellow": (0.95, 0.84, 0.15), "purple": (0.55, 0.22, 0.72), "orange": (0.97, 0.55, 0.1),
    "white": (0.95, 0.95, 0.95), "black": (0.08, 0.08, 0.1),
}
# stuff name -> (base RGB, texture kind)
STUFF = {
    "grass": ((0.3, 0.58, 0.22), "blades"),
    "sky": ((0.55, 0.75, 0.95), "gradient"),
    "sand": ((0.86, 0.76, 0.52), "grain"),
    "water": ((0.15, 0.42, 0.62), "waves"),
    "brick": ((0.62, 0.3, 0.24), "bricks"),
}
# Base seeds of the splits: scenes of different splits never coincide.
SPLIT_SEEDS = {"train": 0, "val": 1_000_003, "test": 2_000_029}
_SUPER = 4  # supersampling factor of the image (anti-aliased edges); labels use pixel centres


@dataclass
class ToyObject:
    cls: int          # class id in CLASSES (>= 1)
    color: str        # key of COLORS
    cy: float         # centre, pixels
    cx: float
    radius: float     # pixels
    angle: float      # radians


@dataclass
class ToyScene:
    image: torch.Tensor            # (3, H, W) uint8 RGB
    label: torch.Tensor            # (H, W) int64, 0 = background, 1.. = CLASSES[1:]
    image_labels: list[int]        # sorted classes with at least one visible pixel (0 included)
    caption: str
    stuff: str
    objects: list[ToyObject] = field(default_factory=list)
    name: str = ""
    shown: list[int] = field(default_factory=list)   # indices into objects with at least one visible pixel


def _shape_mask(kind: str, y: np.ndarray, x: np.ndarray, o: ToyObject) -> np.ndarray:
    """Inside-test of one object on pixel coordinates (y, x) (float arrays)."""
    dy, dx = y - o.cy, x - o.cx
    c, s = math.cos(o.angle), math.sin(o.angle)
    u, v = c * dx + s * dy, -s * dx + c * dy  # rotated frame
    r = o.radius
    if kind == "circle":
        return u * u + v * v <= r * r
    if kind == "ring":
        d2 = u * u + v * v
        return (d2 <= r * r) & (d2 >= (0.55 * r) ** 2)
    if kind == "square":
        h = r * 0.82
        return (np.abs(u) <= h) & (np.abs(v) <= h)
    if kind == "triangle":  # equilateral, circumradius r
        inside = np.ones_like(u, dtype=bool)
        for k in range(3):
            a = math.pi / 2 + k * 2 * math.pi / 3  # outward normals at 90, 210, 330 degrees
            inside &= (u * math.cos(a) + v * math.sin(a)) <= r * 0.5
        return inside
    if kind == "star":  # 5 points, inner radius 0.45 r
        theta = np.arctan2(v, u)
        rho = np.hypot(u, v)
        k = 5
        sector = np.mod(theta + math.pi / 2, 2 * math.pi / k) / (2 * math.pi / k)  # 0..1 within a point's sector
        tri = np.abs(sector - 0.5) * 2  # 0 at the tip direction, 1 at the notch
        # edge of a star polygon between tip (radius r) and notch (radius ri), in polar form
        ri = 0.45 * r
        alpha = math.pi / k * tri
        tip_angle = math.pi / k
        # the line from the tip (r, 0) to the notch (ri, tip_angle): distance to origin along alpha
        x1, y1 = r, 0.0
        x2, y2 = ri * math.cos(tip_angle), ri * math.sin(tip_angle)
        nx, ny = y2 - y1, x1 - x2
        dist = (nx * x1 + ny * y1) / (nx * np.cos(alpha) + ny * np.sin(alpha))
        return rho <= dist
    raise ValueError(f"unknown shape {kind!r}")


def _texture(stuff: str, rng: np.random.Generator, H: int, W: int) -> np.ndarray:
    """The background (H, W, 3) in [0, 1] at supersampled resolution."""
    base, kind = STUFF[stuff]
    y, x = np.mgrid[0:H, 0:W].astype(np.float32) / max(H, W)
    img = np.empty((H, W, 3), np.float32)
    img[:] = base
    if kind == "blades":
        f = rng.uniform(40, 70)
        ph = rng.uniform(0, 6.28)
        img *= (1 + 0.18 * np.sin(f * x + 3 * np.sin(9 * y + ph)))[..., None]
    elif kind == "gradient":
        img *= (0.85 + 0.3 * (1 - y))[..., None]
        cy, cx = rng.uniform(0.1, 0.5), rng.uniform(0.1, 0.9)
        cloud = np.exp(-(((y - cy) / 0.08) ** 2 + ((x - cx) / 0.2) ** 2))
        img = img * (1 - 0.6 * cloud[..., None]) + 0.6 * cloud[..., None]
    elif kind == "grain":
        img *= (1 + 0.12 * rng.standard_normal((H, W)).astype(np.float32))[..., None]
    elif kind == "waves":
        ph = rng.uniform(0, 6.28)
        img *= (1 + 0.25 * np.sin(30 * y + 4 * np.sin(12 * x + ph)))[..., None]
    elif kind == "bricks":
        rows = np.floor(y * 10)
        off = (rows % 2) * 0.5
        mortar = (np.mod(y * 10, 1) < 0.12) | (np.mod(x * 5 + off, 1) < 0.06)
        img[mortar] = (0.78, 0.76, 0.72)
    return img


def caption_for(objects: list[ToyObject], stuff: str) -> str:
    """``"a photo of a red circle, a blue star and a ring on grass"``-style caption."""
    parts = [f"{'an' if o.color[0] in 'aeiou' else 'a'} {o.color} {CLASSES[o.cls]}" for o in objects]
    if len(parts) > 1:
        listed = ", ".join(parts[:-1]) + " and " + parts[-1]
    else:
        listed = parts[0]
    return f"a photo of {listed} on {stuff}"


# An object crop: a square box 2 x CROP_HALF radii wide (times a random 0.9-1.3), at least 2 x CROP_MIN_HALF
# px, around the object's centre (the toy CLIP's crops stage and SynSeg's toy training captions).
CROP_HALF = 1.2
CROP_MIN_HALF = 6.0


def crop_half(radius, rng: np.random.Generator) -> np.ndarray:
    """Half sides (pixels) of the crop boxes of objects of ``radius`` (array, pixels); draws one uniform per
    object from ``rng``."""
    radius = np.asarray(radius, np.float32)
    return np.maximum(CROP_MIN_HALF, CROP_HALF * radius * rng.uniform(0.9, 1.3, radius.shape[0]))


def crop_objects(images_u8: torch.Tensor, cy, cx, half, size: int) -> torch.Tensor:
    """Square boxes (centre ``cy``, ``cx``, half side ``half``, pixels; one per image) cut out of ``images_u8``
    (B, 3, H, W) uint8 and resized (bilinear; outside the image: the border pixels) to ``size`` -> uint8
    (B, 3, size, size)."""
    B, _, H, W = images_u8.shape
    cy, cx, half = (torch.as_tensor(v, dtype=torch.float32).reshape(B) for v in (cy, cx, half))
    theta = torch.zeros(B, 2, 3)
    theta[:, 0, 0] = half / (W / 2)
    theta[:, 0, 2] = (cx - W / 2) / (W / 2)
    theta[:, 1, 1] = half / (H / 2)
    theta[:, 1, 2] = (cy - H / 2) / (H / 2)
    grid = F.affine_grid(theta, [B, 3, size, size], align_corners=False)
    out = F.grid_sample(images_u8.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out.round().clamp(0, 255).to(torch.uint8)


class ToyWorld:
    """Scenes of ``size`` x ``size`` pixels with ``min_objects``..``max_objects`` objects.

    ``world.scene(i)`` is deterministic in ``(seed, i)``; ``split`` picks a
    disjoint seed range (``"train"``, ``"val"``, ``"test"``), ``num_scenes``
    the length when used as a dataset (``len(world)``, ``world[i]``).
    """

    def __init__(self, size: int = 64, split: str = "train", num_scenes: int = 1000, min_objects: int = 1,
                 max_objects: int = 3, radius: tuple[float, float] = (0.13, 0.22), seed: int = 0):
        if not is_int(size, 16):
            raise ValueError(f"ToyWorld: size must be an int >= 16, got {size!r}")
        if split not in SPLIT_SEEDS:
            raise ValueError(f"ToyWorld: split must be one of {sorted(SPLIT_SEEDS)}, got {split!r}")
        if not (1 <= min_objects <= max_objects):
            raise ValueError(f"ToyWorld: need 1 <= min_objects <= max_objects, got {min_objects}, {max_objects}")
        if not (0 < radius[0] <= radius[1] < 0.5):
            raise ValueError(f"ToyWorld: radius must be fractions 0 < lo <= hi < 0.5 of the size, got {radius}")
        if num_scenes < 0:
            raise ValueError(f"ToyWorld: num_scenes must be >= 0, got {num_scenes}")
        self.size, self.split, self.num_scenes = size, split, num_scenes
        self.min_objects, self.max_objects, self.radius, self.seed = min_objects, max_objects, radius, seed
        self.class_names = list(CLASSES)
        self.num_classes = len(CLASSES)
        self.has_background = True
        self.ignore_index = 255

    def __len__(self) -> int:
        return self.num_scenes

    def __getitem__(self, i: int) -> ToyScene:
        if not 0 <= i < self.num_scenes:
            raise IndexError(f"ToyWorld: index {i} out of range for {self.num_scenes} scenes")
        return self.scene(i)

    def _rng(self, i: int) -> np.random.Generator:
        return np.random.default_rng([SPLIT_SEEDS[self.split], self.seed, i])

    def sample_layout(self, rng: np.random.Generator) -> tuple[str, list[ToyObject]]:
        S = self.size
        stuff = list(STUFF)[rng.integers(len(STUFF))]
        n = int(rng.integers(self.min_objects, self.max_objects + 1))
        bg = np.array(STUFF[stuff][0])
        colors = [c for c, rgb in COLORS.items() if np.abs(np.array(rgb) - bg).sum() > 0.45]
        objects: list[ToyObject] = []
        for _ in range(n):
            for _attempt in range(50):  # keep objects mostly apart
                r = rng.uniform(*self.radius) * S
                cy, cx = rng.uniform(r * 0.8, S - r * 0.8, size=2)
                if all(math.hypot(cy - o.cy, cx - o.cx) > 0.75 * (r + o.radius) for o in objects):
                    break
            objects.append(ToyObject(cls=int(rng.integers(1, len(CLASSES))), color=str(rng.choice(colors)),
                                     cy=float(cy), cx=float(cx), radius=float(r), angle=float(rng.uniform(0, 2 * math.pi))))
        return stuff, objects

    def render(self, stuff: str, objects: list[ToyObject], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """(image (S, S, 3) uint8, label (S, S) int64) of a layout."""
        S, k = self.size, _SUPER
        ys = (np.arange(S * k, dtype=np.float32) + 0.5) / k
        y, x = np.meshgrid(ys, ys, indexing="ij")
        img = _texture(stuff, rng, S * k, S * k)
        yc, xc = np.meshgrid(np.arange(S, dtype=np.float32) + 0.5, np.arange(S, dtype=np.float32) + 0.5, indexing="ij")
        label = np.zeros((S, S), np.int64)
        self._instances = np.zeros((S, S), np.int64)
        for n, o in enumerate(objects):
            kind = CLASSES[o.cls]
            # work inside the object's bounding box only
            y0, y1 = max(0, int(o.cy - o.radius) - 1), min(S, int(math.ceil(o.cy + o.radius)) + 1)
            x0, x1 = max(0, int(o.cx - o.radius) - 1), min(S, int(math.ceil(o.cx + o.radius)) + 1)
            by, bx = y[y0 * k:y1 * k, x0 * k:x1 * k], x[y0 * k:y1 * k, x0 * k:x1 * k]
            inside = _shape_mask(kind, by, bx, o)
            rgb = np.array(COLORS[o.color], np.float32)
            shade = 1 + 0.09 * ((bx - o.cx) - (by - o.cy)) / max(o.radius, 1)  # soft light from the top left
            fill = np.clip(rgb[None, None] * shade[..., None], 0, 1)
            box = img[y0 * k:y1 * k, x0 * k:x1 * k]
            box[inside] = fill[inside]
            m = _shape_mask(kind, yc[y0:y1, x0:x1], xc[y0:y1, x0:x1], o)
            label[y0:y1, x0:x1][m] = o.cls
            self._instances[y0:y1, x0:x1][m] = n + 1
        img = img.reshape(S, k, S, k, 3).mean(axis=(1, 3))
        img = img + 0.02 * rng.standard_normal(img.shape).astype(np.float32)
        return (np.clip(img, 0, 1) * 255).round().astype(np.uint8), label

    def scene(self, i: int) -> ToyScene:
        rng = self._rng(i)
        stuff, objects = self.sample_layout(rng)
        img, label = self.render(stuff, objects, rng)
        present = sorted(int(c) for c in np.unique(label))
        shown = set(np.unique(self._instances).tolist())
        idx = [n for n in range(len(objects)) if n + 1 in shown]
        visible = [objects[n] for n in idx]
        return ToyScene(image=torch.from_numpy(img).permute(2, 0, 1).contiguous(), label=torch.from_numpy(label),
                        image_labels=present, caption=caption_for(visible or objects, stuff), stuff=stuff,
                        objects=objects, name=f"toy_{self.split}_{self.seed}_{i:06d}", shown=idx)


class ToyCaptions:
    """The toy world's scenes as (image, caption) pairs: no masks, no labels. Rendered scenes are kept in
    memory (``cache``; a 64 px scene is 12 kB and rendering one costs tens of milliseconds).

    ``crops`` > 0 appends that many single-object crops after the ``num_scenes`` scenes: crop ``j`` is one
    object (drawn with ``crop_seed``) of scene ``j`` of the split, cut out (:func:`crop_half`,
    :func:`crop_objects`) and captioned alone ("a photo of a red star on grass"); keys ``toycrop{j:06d}``."""

    def __init__(self, num_scenes: int = 1000, split: str = "train", size: int = 64, cache: bool = True,
                 crops: int = 0, crop_seed: int = 0):
        if not is_int(crops, 0):
            raise ValueError(f"crops must be an int >= 0, got {crops!r}")
        self.world = ToyWorld(size=size, split=split, num_scenes=num_scenes)
        self.num_scenes, self.crops, self.crop_seed = len(self.world), crops, int(crop_seed)
        self._captions: list[str] | None = None
        self._scenes: dict[int, CaptionSample] | None = {} if cache else None

    def __len__(self) -> int:
        return self.num_scenes + self.crops

    @property
    def captions(self) -> list[str]:
        if self._captions is None:
            self._captions = [self[i].caption for i in range(len(self))]
        return self._captions

    @property
    def keys(self) -> list[str]:
        return [f"toy{i:06d}" for i in range(self.num_scenes)] + [f"toycrop{j:06d}" for j in range(self.crops)]

    def _crop(self, j: int) -> CaptionSample:
        s = self.world.scene(j)
        rng = np.random.default_rng([self.crop_seed, j])
        shown = [s.objects[n] for n in s.shown] or s.objects  # not a fully covered one
        o = shown[int(rng.integers(len(shown)))]
        half = crop_half([o.radius], rng)
        img = crop_objects(s.image[None], [o.cy], [o.cx], half, self.world.size)[0]
        return CaptionSample(img, caption_for([o], s.stuff), f"toycrop{j:06d}")

    def __getitem__(self, i: int) -> CaptionSample:
        if not 0 <= i < len(self):
            raise IndexError(f"ToyCaptions index {i} out of range [0, {len(self)})")
        if self._scenes is not None and i in self._scenes:
            return self._scenes[i]
        if i < self.num_scenes:
            s = self.world[i]
            out = CaptionSample(s.image, s.caption, f"toy{i:06d}")
        else:
            out = self._crop(i - self.num_scenes)
        if self._scenes is not None:
            self._scenes[i] = out
        return out


@GENERATED_DATASETS.register("toyworld")
def open_toyworld(split: str | None = None, **kwargs) -> ToyWorld:
    """``--dataset toyworld``: the generated scenes of ``split`` (default the held-out ``"test"``)."""
    return ToyWorld(split=split or "test", **kwargs)


@GENERATED_DATASETS.register("toyworld-captions")
def open_toy_captions(split: str | None = None, **kwargs) -> "ToyCaptions":
    """``--data toyworld``: the toy scenes of ``split`` (default ``"train"``) as image-caption pairs."""
    return ToyCaptions(split=split or "train", **kwargs)
