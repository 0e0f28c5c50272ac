import sys

from recfm.cli import main

sys.exit(main())
