"""`python -m services.executor` == `pagedserve executor`."""
import sys

from services.cli import main

sys.exit(main(["executor", *sys.argv[1:]]))
