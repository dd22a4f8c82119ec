"""Training configs and their named presets, one module per model."""
