"""`aaclip compare`: training runs side by side on their test results, with the fairness of every
comparison checked and a paired-bootstrap interval on the difference (SPEC §5-7, §11).

Rows are training runs (base, cross, feedback, imported); a feedback run gets one row per loop
that has a test run or held-out metrics. A row's test metrics come from the test runs whose
``aaclip.source_run`` is the run: the latest FINISHED one per (test dataset, checkpoint). Values
are raw floats in [0, 1] everywhere here; the CLI shows them x100.

Fairness of a row against the reference row on a test dataset:

* UNFAIR: test dataset or test images differ, fidelity, backbone or weights, image size,
  QuickGELU (it changes the frozen backbone's function), each test's own protocol (its
  ``protocol.*`` params: ``eval.*`` except ``eval.batch_size`` and ``eval.aupro``, which do not
  change any number, ``data.domain``, prompt settings, and the fidelity, image size, QuickGELU and
  backbone the test ran with), the prompt names the tests used (a test run that logged none used
  aaclip's old table), a test run with other model settings than its training run
  (``test --set model.image_size=...``), one test on its model's training data and the other not,
  or the row is a feedback loop other than the held-out selected one (preferring it can only
  rest on its test score: selection on the test set).
* note: seed, total epochs, trainable-parameter count, training dataset, declared checkpoint vs
  held-out loop selection, AUPRO computed for one side only, a protocol setting an older test
  run did not record.

Modules: ``store`` (reading runs), ``rows`` (one row per run or loop), ``fairness``, ``groups``
(seed means), ``paired`` (the bootstrap on a pair of rows), ``comparison`` (`compare_runs`), ``plot``.
"""

from aaclip_core.compare.comparison import Comparison, compare_runs
from aaclip_core.compare.fairness import differences, fairness
from aaclip_core.compare.groups import seed_groups
from aaclip_core.compare.plot import plot_loops
from aaclip_core.compare.rows import STAGE_ORDER, TRAINING_STAGES, Row, TestResult, run_epochs

__all__ = [
    "STAGE_ORDER", "TRAINING_STAGES", "Comparison", "Row", "TestResult", "compare_runs", "differences",
    "fairness", "plot_loops", "run_epochs", "seed_groups",
]
