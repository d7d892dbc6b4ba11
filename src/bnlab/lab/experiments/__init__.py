"""One module per experiment; each registers itself (see bnlab.lab.registry)."""
