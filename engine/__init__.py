"""spherelab engine: scale-invariant models, data, the trainer, metrics, analysis, worker and CLI."""
