"""weakseg.train (see DESIGN.md)."""
