import sys

from haip_runtime.cli import main

sys.exit(main())
