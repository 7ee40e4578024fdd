"""``python -m llmstack`` is the ``llmstack`` command."""

import sys

from llmstack.cli import main

sys.exit(main())
