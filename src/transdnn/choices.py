"""The closed sets of values that more than one layer names: params.yaml's settings validate them, the
CLI offers them as choices, the library takes them. Each is spelled once, here, in a module that imports
nothing heavy, so the CLI can annotate its options with them without loading the library."""

from typing import Literal, get_args

Partition = Literal["cortex", "subcortex"]
Precision = Literal["fp32", "bf16"]
Checkpoint = Literal["best_valid", "best_rank", "last"]
DropoutMode = Literal["unit", "row"]
CheckpointDtype = Literal["float32", "float16", "int8"]

PARTITIONS: tuple[Partition, ...] = get_args(Partition)
CHECKPOINTS: tuple[Checkpoint, ...] = get_args(Checkpoint)
