"""The run folder's records now live in the storage layer (`fgbg_utils.storage`); this module
keeps the old import path working."""
from fgbg_utils.storage import *  # noqa: F401,F403
from fgbg_utils.storage.folder import Expected  # noqa: F401
