"""``python -m gradscope`` runs the same CLI as the ``gradscope`` console script."""
import sys

from .cli import main

sys.exit(main())
