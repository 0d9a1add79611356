"""The Ray-free core: everything that decides what a model learns and how it is scored. Never imports the edge,
the results or Ray."""
