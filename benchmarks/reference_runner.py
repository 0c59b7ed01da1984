"""Run the published TransBrain DNN stage (transbrain 1.8.7) on CPU, unchanged but for `.cuda()`.

Invoked by compare.py in its own process; prints one JSON line with its timings.
The wheel is fetched into a cache outside the repository; none of its code is kept here.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    for name in ("wheel", "deps", "train", "human", "mouse", "genes", "homology", "out"):
        ap.add_argument(f"--{name}", required=True)
    ap.add_argument("--replicates", type=int, required=True)
    ap.add_argument("--epochs", type=int, required=True)
    ap.add_argument("--inputs", type=int, required=True)
    ap.add_argument("--outputs", type=int, required=True)
    ap.add_argument("--learning-rate", type=float, default=None, help="default: the published code's own")
    a = ap.parse_args()
    wheel = Path(a.wheel)
    sys.path[:0] = [a.deps, str(wheel)]
    sys.path.append(str(wheel / "pipeline" / "code" / "dnn"))  # its `from analyzer import ...`

    import torch

    torch.set_num_threads(torch.get_num_threads())
    if not torch.cuda.is_available():  # the published code calls .cuda() everywhere
        torch.Tensor.cuda = lambda self, *args, **kwargs: self
        torch.nn.Module.cuda = lambda self, *args, **kwargs: self

    import pipeline.code.dnn.pipeline as ref_pipeline
    from pipeline.code.dnn.config.logger import init_logger
    from pipeline.code.dnn.config.parse import Config

    split_seconds: list[float] = []
    original_split = ref_pipeline.train_test_split

    def timed_split(*args, **kwargs):
        start = time.perf_counter()
        out = original_split(*args, **kwargs)
        split_seconds.append(time.perf_counter() - start)
        return out

    ref_pipeline.train_test_split = timed_split
    cfg = Config()
    cfg.update_parameters(
        train=True,
        trans=True,
        repeat_n=a.replicates,
        max_epochs=a.epochs,
        input_units=a.inputs,
        output_units=a.outputs,
        use_bestrank=False,
        use_bestvalid=True,
        **({"learning_rate": a.learning_rate} if a.learning_rate else {}),
    )
    cfg.update_paths(
        gene_path=a.genes,
        data_path=a.train,
        save_path=a.out,
        mouse_trans_path=a.mouse,
        human_trans_path=a.human,
        human_mouse_path=a.homology,
    )
    init_logger(log_dir=a.out, log_file="train_dnn.log")
    start = time.perf_counter()
    ref_pipeline.DnnPipeline(config=cfg).execute()
    wall = time.perf_counter() - start
    print(json.dumps({"wall": wall, "split_seconds": split_seconds}))


if __name__ == "__main__":
    main()
