"""A follower rank of a data-parallel run: no Prefect, no files, no tracking; it trains its
share of each batch when rank 0 says (ddpm.run.follow).

    python -m flows.follow       # started by rank 0 (flows.group), settings from rank 0
    torchrun ... flows/train_flow.py --flags   # every rank but 0 lands here (flows.cli)

SIGINT and SIGTERM are rank 0's to act on: it stops the whole group after the current step,
with a checkpoint. Exit status: 0 when rank 0 ended the run, 1 when the group broke.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from typing import Any

from ddpm.errors import first_line


def follow_main(overrides: dict[str, Any]) -> int:
    """Join the group named by RANK, WORLD_SIZE and MASTER_ADDR:MASTER_PORT and follow rank 0
    until it ends the run; returns the exit status above."""
    from ddpm.distributed import RankFailed, environment, join
    from ddpm.run import follow
    from settings import core_config, load_settings

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    env = environment()
    assert env is not None, "RANK and WORLD_SIZE are set by rank 0 or torchrun"
    config = core_config(load_settings(overrides))
    try:
        group = join(env["rank"], env["world_size"], env["local_rank"], config.train.device,
                     config.train.rank_timeout)  # fmt: skip
        try:
            follow(group, config)
        finally:
            group.close()
    except RankFailed as err:
        print(f"error: rank {env['rank']}: {first_line(err)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    from flows.group import FOLLOW_OVERRIDES

    sys.exit(follow_main(json.loads(os.environ.get(FOLLOW_OVERRIDES, "{}"))))
