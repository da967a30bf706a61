"""Segmentation methods, one package each, registered by name in ``weakseg.METHODS``.

Each registers itself when imported; ``weakseg/__init__.py`` declares them, so ``weakseg.create(name)``
imports only the method it builds.
"""
