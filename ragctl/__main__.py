import sys

from ragctl.cli import main

sys.exit(main())
