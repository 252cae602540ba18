# Hydra configs, importable as `sparse_mae_conf` so `pkg://sparse_mae_conf` works from any install
# (`conf/` at the top of the repository holds this one package, named as it imports).
