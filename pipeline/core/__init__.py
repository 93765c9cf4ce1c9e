"""The maths and the schema: models, losses, the training step, metrics, datasets, config. Pure torch and
numpy; reads local files at most. Imports nothing from io, ray or the entry points."""
