"""Hyperparameter search with Optuna: the recipe's search space as Optuna distributions, samplers and
pruners (:mod:`.space`), and the study several workers share (:mod:`.study`). The job that trains
each trial is :mod:`aaclip_core.jobs.sweep`. Importing this package imports nothing heavy; its
modules import Optuna."""
