"""The Hydra presets (config.yaml, launcher/, task/): installed as the package harness.conf."""
