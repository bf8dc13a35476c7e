import sys

from arrag.cli import main

sys.exit(main())
