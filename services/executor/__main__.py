"""`python -m services.executor`: the executor service alone (same flags as `pagedserve executor`)."""
import argparse
import sys

from services.executor import service

parser = argparse.ArgumentParser(prog="python -m services.executor", description="pagedserve model executor")
service.add_arguments(parser)
try:
    sys.exit(service.run(parser.parse_args()))
except KeyboardInterrupt:
    sys.exit(130)
