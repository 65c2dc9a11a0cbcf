"""State stores: where the JSON states live. One module per store behind ``base.StateStore``."""
