import sys

from slam.cli import main

sys.exit(main())
