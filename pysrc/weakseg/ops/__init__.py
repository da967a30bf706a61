"""weakseg ops: each a compiled op in the ``weakseg`` torch library with a
fake (meta) implementation, a Python wrapper, and a pure-PyTorch reference."""

from weakseg.ops.erode import erode, erode_labels, erode_labels_reference, erode_reference
from weakseg.ops.kl_kmeans import kl_kmeans, kl_kmeans_reference
from weakseg.ops.knn_vote import knn_vote, knn_vote_from_neighbors, knn_vote_reference
from weakseg.ops.masked_area_pool import masked_area_pool, masked_area_pool_reference, patch_weights_reference
from weakseg.ops.refine_propagate import (
    head_mean_attention,
    refine_propagate,
    refine_propagate_qk,
    refine_propagate_qk_reference,
    refine_propagate_reference,
)

__all__ = [
    "erode", "erode_labels", "masked_area_pool", "knn_vote", "kl_kmeans",
    "erode_reference", "erode_labels_reference", "masked_area_pool_reference", "patch_weights_reference",
    "knn_vote_reference", "knn_vote_from_neighbors", "kl_kmeans_reference",
    "refine_propagate", "refine_propagate_qk", "refine_propagate_reference", "refine_propagate_qk_reference",
    "head_mean_attention",
]

OPS = ("erode", "erode_labels", "masked_area_pool", "knn_vote", "refine_propagate", "refine_propagate_qk", "kl_kmeans")
