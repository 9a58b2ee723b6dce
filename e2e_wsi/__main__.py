import sys

from e2e_wsi.cli import main

sys.exit(main())
