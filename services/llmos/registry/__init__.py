"""The model registry: catalog, model store, memory estimates and placement."""
