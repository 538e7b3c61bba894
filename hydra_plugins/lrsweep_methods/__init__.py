"""lrsweep's method base configs as a Hydra config source (Hydra loads plugins only from hydra_plugins)."""
