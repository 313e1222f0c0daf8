"""``python -m aaclip_score``: the ``aaclip-score`` command."""

import sys

from aaclip_score.cli import main

sys.exit(main())
