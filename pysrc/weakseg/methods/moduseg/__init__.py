"""ModuSeg (``weakseg.create("moduseg")``): class-agnostic mask proposals labelled by cosine KNN retrieval in
an offline feature bank built from eroded pseudo masks. See :mod:`.method` for the pipeline."""

from weakseg.methods.moduseg.method import *  # noqa: F401,F403
from weakseg.methods.moduseg.method import __all__  # noqa: F401
