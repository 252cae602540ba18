# Hydra configs, importable as `sparse_mae_conf` so `pkg://sparse_mae_conf` works from any install.
