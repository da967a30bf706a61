"""ModuSeg (``weakseg.create("moduseg")``): class-agnostic mask proposals labelled by cosine KNN retrieval in
an offline feature bank built from eroded pseudo masks. See :mod:`.method` for the pipeline and the module
of each stage. Importing the package registers the method."""

from weakseg.methods.moduseg.bank import BANK_FORMAT, BANK_FORMAT_VERSION, BankError, FeatureBank, outlier_filter
from weakseg.methods.moduseg.build import build_bank
from weakseg.methods.moduseg.config import ModuSegConfig
from weakseg.methods.moduseg.method import ModuSeg, load_backbone, load_proposer
from weakseg.methods.moduseg.paint import nms_per_class
from weakseg.methods.moduseg.pseudo import PseudoMaskDir, majority_in_regions, pseudo_labels_from_scores
from weakseg.methods.moduseg.regions import encode_regions, purify_regions
from weakseg.methods.moduseg.search import FaissSearch, exact_topk, vote_from_neighbors

__all__ = ["ModuSeg", "ModuSegConfig", "FeatureBank", "BankError", "BANK_FORMAT", "BANK_FORMAT_VERSION",
           "build_bank", "load_backbone", "load_proposer", "encode_regions", "purify_regions", "exact_topk",
           "pseudo_labels_from_scores", "majority_in_regions", "outlier_filter", "vote_from_neighbors",
           "FaissSearch", "nms_per_class", "PseudoMaskDir"]
