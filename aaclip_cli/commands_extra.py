"""Imports every further command module so that its commands register on `app`."""

from . import transfer_cmd  # noqa: E402,F401
from . import predict_cmd  # noqa: E402,F401
from . import compare_cmd  # noqa: E402,F401
from . import doctor_cmd  # noqa: E402,F401
