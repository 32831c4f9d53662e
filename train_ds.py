"""Entry point for the ``deepspeed`` launcher (multi-GPU, multi-node with a hostfile).

    deepspeed --num_gpus 8 train_ds.py --ds-config ds_configs/zero2.json --model Qwen/Qwen2.5-Coder-0.5B-Instruct ...
    deepspeed --hostfile hosts train_ds.py --ds-config ds_configs/zero2.json ...

Takes the same options as ``arc25-fast train``; every rank builds its own data stream.
"""
import sys

from arc25_fast.cli import main

if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank") and not a.startswith("--local-rank")]
    main(["train", *args], prog_name="train_ds.py")
