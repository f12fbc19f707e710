"""Tools on the public surface: the command line, the demo, `diagnose`, the bench, the lab and the
small models they run (`pip install openpi-prune[tools]`: rich and matplotlib)."""
