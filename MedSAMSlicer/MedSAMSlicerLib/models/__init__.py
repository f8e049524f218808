"""The models: registry (models.json), safe checkpoint loading, the networks (modeling/), devices, encoder runtimes and CPU optimisations."""
