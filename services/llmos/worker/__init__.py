"""The worker: loaded models and the inference engine."""
