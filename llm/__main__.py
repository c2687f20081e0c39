"""``python -m llm`` (and ``accelerate launch -m llm train ...``)."""

import sys

from .cli import main

sys.exit(main())
