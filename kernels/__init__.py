"""Hand-written kernels (import name `sparse_mae_kernels`), each beside a plain-torch reference."""
