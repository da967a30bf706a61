"""weakseg.eval (see DESIGN.md)."""
