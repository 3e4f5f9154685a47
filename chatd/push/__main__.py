"""``python -m chatd.push sender``: the push sender process (:mod:`chatd.push.sender`),
started by the notifier; not meant to be run by hand."""

import sys

from chatd.push.sender import main

if __name__ == "__main__":
    if sys.argv[1:] != ["sender"]:
        sys.exit("usage: python -m chatd.push sender  (started by chatd serve, not by hand)")
    main()
