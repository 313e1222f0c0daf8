"""Kept so that ``aaclip_core.jobs.reporter.Reporter`` still imports; the class lives in
:mod:`aaclip_core.reporter`, below the jobs, because predict, doctor and compare report too."""

from aaclip_core.reporter import Reporter

__all__ = ["Reporter"]
