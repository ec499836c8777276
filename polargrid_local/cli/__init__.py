"""The ``polargrid-local`` command."""
from .main import default_models, main

__all__ = ["default_models", "main"]
