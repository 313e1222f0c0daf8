"""Jobs: the library's entry points that tie data, model, training, evaluation and the registry
together. The CLI is a thin face over these functions."""
