"""Defaults every command group shares (the paths and addresses `make up` uses)."""
DEFAULT_STORE = ".cmesh/store"
DEFAULT_ROUTER = "127.0.0.1:8000"
DEFAULT_CONFIG = "compose/mesh.yaml"
