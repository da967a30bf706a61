"""weakseg.data (see DESIGN.md)."""
