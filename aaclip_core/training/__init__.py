"""Training glue: data loaders, the two stages, and the jobs built from them."""
