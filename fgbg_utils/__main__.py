import sys

from fgbg_utils.runs.cli import main

sys.exit(main())
