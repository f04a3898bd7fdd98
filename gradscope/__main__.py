"""``python -m gradscope`` runs the same CLI as the ``gradscope`` console script."""
import sys

from .console import main

sys.exit(main())
