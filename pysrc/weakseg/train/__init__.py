"""weakseg.train (see docs/design.md)."""
