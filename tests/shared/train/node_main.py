"""One rank of a two-"node" CPU run (tests/shared/train/test_multinode_resume.py).

    python -m tests.shared.train.node_main <rank> <port> <model> <data> <store root> <local dir> <max_steps>

Each rank is its own node: LOCAL_RANK 0 and its own ``local dir`` (a pod's emptyDir); both
share the checkpoint store, as pods share S3.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def main() -> None:
    rank, port, model, data, root, local, max_steps = sys.argv[1:8]
    os.environ.update(RANK=rank, WORLD_SIZE="2", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", GROUP_RANK=rank,
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    from shared.core.config import parse_config
    from shared.store.storage import FileLocation
    from shared.train.training import CheckpointStore, train

    config = parse_config({"max_input_length": 32, "max_output_length": 16,
                           "training_args": {"max_steps": int(max_steps), "save_steps": 2, "eval_steps": 2, "logging_steps": 1,
                                             "per_device_train_batch_size": 2, "learning_rate": 0.01},
                           # dropout draws from each rank's RNG: a resume that restores only rank 0's state diverges
                           "peft_config": {"r": 4, "lora_alpha": 8, "lora_dropout": 0.3, "target_modules": ["q_proj", "v_proj"]}})
    store = CheckpointStore(FileLocation(Path(root)), {"data": "d1"}, run_id="t", code_version="test")
    result = train(config, Path(model), Path(data), Path(local), store)
    print(json.dumps({"rank": int(rank), "resumed_from": result.resumed_from, "steps": result.steps_completed}))
    import torch.distributed as dist

    dist.destroy_process_group()


if __name__ == "__main__":
    main()
