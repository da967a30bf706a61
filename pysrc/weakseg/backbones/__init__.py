"""weakseg.backbones (see DESIGN.md)."""
