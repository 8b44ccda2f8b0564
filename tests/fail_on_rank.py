"""`torchrun … tests/fail_on_rank.py <rank> <step> <mlproject args>`: the mlproject CLI, with a
training callback that raises ``ValueError("boom on rank <rank>")`` on that one rank at the end
of optimizer step 2 (the other ranks are then inside the next step's gradient all-reduce).
Used by tests/test_distributed.py to check that a failure on one rank ends the launch's run
FAILED with that rank's error."""

import os
import sys

from transformers import TrainerCallback

from mlproject import cli
from mlproject.training import trainer

TARGET = int(sys.argv[1])
_train = trainer.train


class Boom(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 2 and int(os.environ.get("RANK", "0")) == TARGET:
            raise ValueError(f"boom on rank {TARGET}")


def train(*args, callbacks=None, **kwargs):
    return _train(*args, callbacks=[*(callbacks or []), Boom()], **kwargs)


trainer.train = train

if __name__ == "__main__":
    sys.exit(cli.main(sys.argv[2:]))
