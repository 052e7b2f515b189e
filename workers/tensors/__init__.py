"""Checkpoint I/O: a lazy, validated safetensors reader and a streaming sharded writer."""

from workers.tensors.reader import CheckpointReader
from workers.tensors.safetensors_format import DTYPES, TensorInfo
from workers.tensors.writer import ShardedWriter, TensorSpec, plan_shards

__all__ = ["DTYPES", "CheckpointReader", "ShardedWriter", "TensorInfo", "TensorSpec", "plan_shards"]
