import sys

from difftx_edge.cli import main

sys.exit(main())
