"""Atomic writes (kept here for the modules and notebooks that import `fgbg_utils.io`; the code is
`fgbg_utils.storage.atomic`)."""
from fgbg_utils.storage.atomic import *  # noqa: F401,F403
from fgbg_utils.storage.atomic import UMASK

_UMASK = UMASK  # the name tests/test_io.py reads
