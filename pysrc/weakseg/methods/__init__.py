"""Segmentation methods, one module each, registered by name in ``weakseg.METHODS``.

The methods of DESIGN.md (moduseg, synseg, diclip, diffsegmenter, iseg) land
here with their issues; importing this package registers every one present.
"""

from weakseg.methods import diclip, diffsegmenter, iseg, moduseg, synseg  # noqa: E402,F401
