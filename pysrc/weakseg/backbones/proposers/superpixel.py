"""Weight-free proposals: scikit-image superpixels merged by colour over a region adjacency graph."""

from __future__ import annotations

import numpy as np
import torch

from weakseg.backbones.proposers.base import Proposals, check_image
from weakseg.core import PROPOSERS

__all__ = ["SuperpixelProposer"]


# ----------------------------------------------------------------------------------------------
# Classical superpixels merged by colour
# ----------------------------------------------------------------------------------------------
@PROPOSERS.register("superpixel")
class SuperpixelProposer:
    """Weight-free proposals: scikit-image superpixels merged by colour.

    1. Over-segment the image with ``felzenszwalb`` (scale, sigma, min_size; on RGB in [0, 1]) or
       ``slic`` (n_segments, compactness; in CIELAB).
    2. Build a region adjacency graph whose edge weights are the distances between mean CIELAB
       colours (``skimage.graph.rag_mean_color``), and merge every pair of adjacent regions closer
       than ``merge_thresh`` (``skimage.graph.cut_threshold``; 0 disables merging). Merged regions
       are connected by construction.
    3. Score each region: ``score="area"`` (default) gives its area as a fraction of the image
       (large regions first); ``score="homogeneity"`` gives 1 / (1 + s) with s the mean per-channel
       standard deviation of its CIELAB colour (flat regions first).

    Regions under ``min_area`` pixels are dropped. Deterministic; the regions tile the image.
    """

    FAMILY = "superpixel"

    @classmethod
    def from_spec(cls, spec=None, *, device=None, dtype=None, cache_dir: str | None = None,
                  **options) -> "SuperpixelProposer":
        """Weight-free: no spec (``options``: the constructor's settings)."""
        if spec is not None:
            raise ValueError(f"proposer 'superpixel' has no weights; got the model spec {str(spec)!r}")
        return cls(**options)

    def __init__(self, method: str = "felzenszwalb", *, scale: float = 100.0, sigma: float = 0.5,
                 min_size: int = 50, n_segments: int = 200, compactness: float = 10.0,
                 merge_thresh: float = 10.0, score: str = "area", min_area: int = 0):
        if method not in ("felzenszwalb", "slic"):
            raise ValueError(f"method: expected 'felzenszwalb' or 'slic', got {method!r}")
        if score not in ("area", "homogeneity"):
            raise ValueError(f"score: expected 'area' or 'homogeneity', got {score!r}")
        if merge_thresh < 0:
            raise ValueError(f"merge_thresh: expected >= 0, got {merge_thresh}")
        if min_area < 0:
            raise ValueError(f"min_area: expected >= 0, got {min_area}")
        self.method = method
        self.scale, self.sigma, self.min_size = float(scale), float(sigma), int(min_size)
        self.n_segments, self.compactness = int(n_segments), float(compactness)
        self.merge_thresh = float(merge_thresh)
        self.score = score
        self.min_area = int(min_area)

    def segment(self, image: torch.Tensor) -> np.ndarray:
        """The merged label map (H, W) int64 with labels 1..R."""
        from skimage import color, graph, segmentation

        rgb = check_image(image).permute(1, 2, 0).cpu().numpy().astype(np.float64) / 255.0
        lab = color.rgb2lab(rgb)
        if self.method == "felzenszwalb":
            labels = segmentation.felzenszwalb(rgb, scale=self.scale, sigma=self.sigma, min_size=self.min_size,
                                               channel_axis=-1)
        else:
            labels = segmentation.slic(rgb, n_segments=self.n_segments, compactness=self.compactness, start_label=0,
                                       convert2lab=True, channel_axis=-1)
        labels = labels.astype(np.int64)
        if self.merge_thresh > 0 and labels.max() > 0:
            rag = graph.rag_mean_color(lab, labels, mode="distance")
            labels = graph.cut_threshold(labels, rag, self.merge_thresh, in_place=True)
        _, labels = np.unique(labels, return_inverse=True)
        return labels.reshape(rgb.shape[:2]).astype(np.int64) + 1

    def __call__(self, image: torch.Tensor) -> Proposals:
        image = check_image(image)
        labels = self.segment(image)
        H, W = labels.shape
        n = int(labels.max())
        flat = labels.ravel()
        area = np.bincount(flat, minlength=n + 1)[1:].astype(np.float64)
        if self.score == "area":
            scores = area / (H * W)
        else:
            from skimage import color
            lab = color.rgb2lab(image.permute(1, 2, 0).cpu().numpy().astype(np.float64) / 255.0).reshape(-1, 3)
            s1 = np.stack([np.bincount(flat, weights=lab[:, c], minlength=n + 1)[1:] for c in range(3)], 1)
            s2 = np.stack([np.bincount(flat, weights=lab[:, c] ** 2, minlength=n + 1)[1:] for c in range(3)], 1)
            mean = s1 / area[:, None]
            var = np.clip(s2 / area[:, None] - mean ** 2, 0.0, None)
            scores = 1.0 / (1.0 + np.sqrt(var).mean(1))
        props = Proposals.from_id_map(torch.from_numpy(labels), torch.from_numpy(scores.astype(np.float32)),
                                      min_area=self.min_area)
        return props.to(image.device)
