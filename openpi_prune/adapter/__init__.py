"""The OpenPI adapter: what openpi-prune knows of OpenPI's code (JAX pi0 / pi0.5) and nothing of the
pruning math. `table` lists every patch, one row each; `wrappers` hands each patched call to
`prefix` (OpenPI's prefix, split for the pruner) and `checkpoints`; `install` patches and unpatches
(all or nothing, waiting for calls in flight: `inflight`); `bootstrap` waits for OpenPI's import
when `OPENPI_PRUNE` asks. Importing this package is cheap: the start-up hook does.
"""
