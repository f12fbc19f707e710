"""The lab: rendered scenes where the right tokens are known, and the training that compares
pruning methods on a small real pi0.5 (`openpi-prune lab`)."""
