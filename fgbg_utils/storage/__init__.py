"""The run folder's storage, one layer below the stages: atomic writes (`atomic`), the errors a
full or read-only disk gives (`errors`), file hashes of inputs and outputs (`hashes`), the lock
(`lock`), the stages' fingerprints and records (`folder`) and the run's manifest (`manifest`).
The stages import this layer; the runner and the CLI sit above them."""
from fgbg_utils.storage.errors import StageError, StorageError
from fgbg_utils.storage.folder import (check_inputs, expected, fingerprint, locked_stage,
                                       metrics_path, open_stage, refuse_other_params, require_stage,
                                       rerun_hint, stage_dir, stage_params, stage_problem,
                                       update_stage)
from fgbg_utils.storage.lock import LOCK_ENV, LOCK_NAME, run_lock

__all__ = ["StageError", "StorageError", "check_inputs", "expected", "fingerprint", "locked_stage",
           "metrics_path", "open_stage", "refuse_other_params", "require_stage", "rerun_hint",
           "stage_dir", "stage_params", "stage_problem", "update_stage", "LOCK_ENV", "LOCK_NAME",
           "run_lock"]
