import sys

from mlproject.cli import main

sys.exit(main())
