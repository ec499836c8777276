"""Where models come from: the models.toml registry, pulling files into the cache, conversions at pull."""
