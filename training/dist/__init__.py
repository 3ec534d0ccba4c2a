"""Launch anywhere: find rank/world from whatever started us, initialise the process group, fail fast.

* `discovery`: rank, world size and rendezvous address from the DeepSpeed launcher, torchrun, Slurm, MPI, or
  none (a single process); `DistEnv`.
* `process_group`: `init_distributed` (through DeepSpeed), `shutdown`, and `check_consistent` (ranks agree on
  config, world size and code at start-up).
* `watchdog`: `Watchdog` / `start_watchdog` (a dead or frozen rank ends all ranks in bounded time, naming it)
  and `EXIT_REQUEUE`.
"""
import socket  # noqa: F401  (tests patch socket.getfqdn through this package)

from training.dist.discovery import (SLURM_PORT_BASE, SLURM_PORT_SPAN, DistEnv, add_launcher_args,  # noqa: F401
                                     discover, expand_tasks_per_node, first_host, free_port, slurm_port)
from training.dist.process_group import check_consistent, code_version, init_distributed, shutdown  # noqa: F401
from training.dist.watchdog import EXIT_REQUEUE, Watchdog, start_watchdog  # noqa: F401
