"""Local models and their files: hub downloads, verification, updates, the /hf mirror, imports, memory estimates."""
