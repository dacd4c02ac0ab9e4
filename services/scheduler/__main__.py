"""`python -m services.scheduler`: the scheduler service alone (same flags as `pagedserve scheduler`)."""
import argparse
import sys

from services.scheduler import service

parser = argparse.ArgumentParser(prog="python -m services.scheduler",
                                 description="pagedserve scheduler service (pure CPU, no torch)")
service.add_arguments(parser)
try:
    sys.exit(service.run(parser.parse_args()))
except KeyboardInterrupt:
    sys.exit(130)
