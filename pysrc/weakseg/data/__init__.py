"""weakseg.data: dataset readers and class-name tables (see docs/design.md)."""

from weakseg.data.classnames import CLASS_RENAMES, rename_classes
from weakseg.data.datasets import (
    ADE20K, DATASETS, COCOObject, COCOStuff, Cityscapes, DatasetLayoutError, ImageFolder, PascalContext59,
    PascalContext60, Sample, SegDataset, VOCSegmentation, collate_samples, open_dataset,
)

__all__ = [
    "ADE20K", "CLASS_RENAMES", "COCOObject", "COCOStuff", "Cityscapes", "DATASETS", "DatasetLayoutError",
    "ImageFolder", "PascalContext59", "PascalContext60", "Sample", "SegDataset", "VOCSegmentation",
    "collate_samples", "open_dataset", "rename_classes",
]
