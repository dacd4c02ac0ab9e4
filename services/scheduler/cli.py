"""`pagedserve scheduler`: the scheduler service as a process. Its flags are the options of
shared/config.py that the scheduler uses."""
from __future__ import annotations

import argparse
import logging
import signal
import sys

import zmq

from services.scheduler.executor_channel import ZmqExecutorChannel
from services.scheduler.service import SchedulerService
from shared import transport
from shared.config import ConfigError, add_options, config_from_args

log = logging.getLogger("pagedserve.scheduler")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_options(p, "scheduler")


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    try:
        config = config_from_args(args, "scheduler")
    except ConfigError as e:
        print(f"pagedserve scheduler: error: {e}", file=sys.stderr)
        return 2
    engine, proc = config.engine, config.process
    ctx = zmq.Context()
    try:
        gateway = transport.router(ctx, proc.gateway_addr)
        channel = ZmqExecutorChannel(ctx, proc.executor_addr, proc.hello_interval, proc.step_timeout)
    except zmq.ZMQError as e:
        print(f"pagedserve scheduler: error: cannot bind/connect ({e})", file=sys.stderr)
        return 1
    service = SchedulerService(engine.scheduler, engine.cache, gateway, channel,
                               shutdown_executor=proc.shutdown_executor, recovery_timeout=proc.recovery_timeout,
                               model=engine.model)
    signal.signal(signal.SIGTERM, service.stop)
    signal.signal(signal.SIGINT, service.stop)
    log.info("scheduler serving gateways at %s, executor at %s", proc.gateway_addr, proc.executor_addr)
    try:
        service.serve_forever()
    except ConfigError as e:
        log.error("%s", e)
        return 1
    finally:
        gateway.close(linger=0)
        ctx.term()
    log.info("scheduler stopped")
    return 0
