"""Entry point for the ``deepspeed`` launcher (multi-GPU, multi-node with a hostfile).

    deepspeed --num_gpus 8 train_ds.py --ds-config ds_configs/zero2.json --model Qwen/Qwen2.5-Coder-0.5B-Instruct ...
    deepspeed --hostfile hosts train_ds.py --ds-config ds_configs/zero2.json ...
    deepspeed --num_gpus 8 train_ds.py ttt --tasks kaggle:arc-agi_test_challenges.json --model ... --adapter ...
    deepspeed --num_gpus 8 train_ds.py evaluate --tasks ... --model ... --ttt-dir ...
    deepspeed --num_gpus 8 train_ds.py search-and-learn --tasks ... --model ... --adapter ...

Takes the options of ``arc25-fast train`` (the default command), ``ttt``, ``evaluate`` or ``search-and-learn``;
every rank builds its own data stream (train), takes its share of the tasks (evaluate) or takes the next task from
the run's shared queue (ttt, search-and-learn).
"""
import sys

from arc25_fast.cli import main

COMMANDS = ("train", "ttt", "evaluate", "search-and-learn")

if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank") and not a.startswith("--local-rank")]
    command = args.pop(0) if args and args[0] in COMMANDS else "train"
    main([command, *args], prog_name="train_ds.py")
