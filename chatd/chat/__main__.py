"""``python -m chatd.chat`` runs the terminal client."""

import sys

from chatd.chat.cli import main

sys.exit(main())
