"""`python -m perceive_ray` runs the command line."""

import sys

from perceive_ray.cli import main

sys.exit(main())
