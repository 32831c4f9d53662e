"""Bad options and bad config files: one line naming the option (and file), non-zero exit, before any expensive work;
the output directory is never reused silently."""
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from arc25_fast.cli import main
from arc25_fast.commands.configs import DataConfig, EvalConfig, ProfileConfig, SearchConfig, TrainConfig, TTTConfig
from arc25_fast.runtime.extensions import build_op, lock_holders, use_private_extensions_dir
from arc25_fast.runtime.options import ConfigError, configure, options, resolve

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--max-tokens", "1024", "--verify-samples", "0", "--eval-every", "0", "--num-workers", "0"]


def run(args: list[str], tmp_path: Path):
    result = CliRunner().invoke(main, args)
    lines = [line for line in result.output.splitlines() if line.strip()]
    return result, lines


BAD_OPTIONS = [
    (["--grad-accum", "0"], "--grad-accum: must be at least 1, got 0"),
    (["--max-steps", "0"], "--max-steps: must be at least 1, got 0"),
    (["--max-steps", "-3"], "--max-steps: must be at least 1, got -3"),
    (["--warmup-steps", "-1"], "--warmup-steps: must be at least 0"),
    (["--grad-clip", "-1"], "--grad-clip: must be at least 0.0"),
    (["--save-every", "-1"], "--save-every: must be at least 0"),
    (["--keep-checkpoints", "0"], "--keep-checkpoints: must be at least 1"),
    (["--lr-schedule", "bogus"], "--lr-schedule: 'bogus' is not one of cosine, linear, constant"),
    (["--loss-chunk-tokens", "0"], "--loss-chunk-tokens: must be at least 1"),
    (["--dtype", "fp16"], "--dtype: 'fp16' is not one of auto, bf16, fp32"),
    (["--encoder", "nonsense"], "--encoder: 'nonsense' is not one of auto, fast, text"),
    (["--train-as-test", "1.5"], "--train-as-test: must be at most 1.0, got 1.5"),
    (["--max-tokens", "0"], "--max-tokens: must be at least 64, got 0"),
    (["--lr", "nan"], "--lr: must be a finite number"),
    (["--model", "/nonexistent/model"], "model /nonexistent/model: no such file or directory"),
    (["--model", "./missing.json"], "model ./missing.json: no such file or directory"),
    (["--tokenizer", "/nonexistent/tok"], "tokenizer /nonexistent/tok: no such directory"),
    (["--task-source", "synthetic@nan"], "task source 'synthetic@nan': weight nan must be a finite positive number"),
    (["--task-source", "synthetic@inf"], "weight inf must be a finite positive number"),
    (["--task-source", "synthetic@0"], "weight 0.0 must be a finite positive number"),
    (["--task-source", "synthetic@abc"], "task source 'synthetic@abc': weight 'abc' is not a number"),
    (["--task-source", "her:/nonexistent.jsonl"], "--task-source her:/nonexistent.jsonl: /nonexistent.jsonl does not exist"),
    (["--max-tokens", "65536"], "--max-tokens 65536 is more than model tiny's 32768 positions"),
    (["--attn", "flash-attn"], "attention backend flash-attn is not available on cpu"),
    (["--global-batch-tokens", "4096", "--global-batch-samples", "8"], "both set the batch size"),
    (["--lora-targets", "q_proj,nonexistent_proj"], "has no module named nonexistent_proj"),
    (["--adapter", "/nonexistent/adapter"], "--adapter /nonexistent/adapter: no adapter_config.json"),
    (["--task-source", "synthetic", "--synthetic-min-side", "8", "--synthetic-max-side", "5"],
     "--synthetic-min-side 8 is more than --synthetic-max-side 5"),
    (["--synthetic-background", "10"], "--synthetic-background: must be at most 9, got 10"),
    (["--eval-tasks", "synthetic:x", "--eval-tasks-every", "5"], "use synthetic:COUNT[:SEED]"),
]


@pytest.mark.parametrize("args,message", BAD_OPTIONS, ids=[" ".join(a) for a, _ in BAD_OPTIONS])
def test_bad_option_is_one_line_before_any_work(tmp_path, args, message):
    out = tmp_path / "run"
    result, lines = run(["train", "--output-dir", str(out), *FAST, *args], tmp_path)
    assert result.exit_code == 1, result.output
    assert len(lines) == 1 and lines[0].startswith("Error: ") and message in lines[0], lines
    assert not (out / "config.json").exists() and not (out / "base_model").exists()  # stopped before the work


def test_bad_options_stay_one_line_next_to_a_busy_process(tmp_path, busy_core):
    for args, message in BAD_OPTIONS:
        result, lines = run(["train", "--output-dir", str(tmp_path / "run"), *FAST, *args], tmp_path)
        assert result.exit_code == 1 and len(lines) == 1 and message in lines[0], (args, lines)


def test_a_failed_start_leaves_no_output_directory(tmp_path):
    her = tmp_path / "bad.jsonl"
    her.write_text('{"inputs": [[[1]]], "outputs": [[[2]]], "code": "def task(img):\\n    return img"}\n{"inputs": 3}\n')
    out = tmp_path / "run"
    result, lines = run(["train", "--output-dir", str(out), *FAST, "--task-source", f"her:{her}"], tmp_path)
    assert result.exit_code == 1 and len(lines) == 1 and "line 2" in lines[0], lines
    assert not out.exists()  # neither an empty directory nor a lone train.log


def test_default_lora_targets_follow_the_architecture():
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM

    from arc25_fast.training.model import ModelError, add_adapter, lora_targets

    neox = GPTNeoXForCausalLM(GPTNeoXConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                            intermediate_size=64, vocab_size=100))
    assert lora_targets("attention", neox) == ["query_key_value", "dense"]
    assert lora_targets("attention+mlp", neox) == ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]
    model = add_adapter(neox, configure(TrainConfig, model="tiny"))  # the default, --lora-targets attention
    assert any("query_key_value.lora_A" in n for n, _ in model.named_parameters())
    llama = LlamaForCausalLM(LlamaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                         intermediate_size=64, vocab_size=100))
    assert lora_targets("attention", llama) == ["q_proj", "k_proj", "v_proj", "o_proj"]
    with pytest.raises(ModelError, match="its linear modules: .*q_proj"):
        lora_targets("q_proj,nonexistent_proj", llama)


def test_ds_config_problems_name_the_file(tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text('{"zero_optimization": {"stage": 2,}}')
    stage3 = tmp_path / "stage3.json"
    stage3.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    for path, message in ((broken, f"--ds-config {broken}: malformed JSON"),
                          (stage3, f"--ds-config {stage3}: ZeRO stage 3 is not supported"),
                          (tmp_path / "missing.json", "cannot read")):
        result, lines = run(["train", "--output-dir", str(tmp_path / "o"), *FAST, "--ds-config", str(path)], tmp_path)
        assert result.exit_code == 1 and len(lines) == 1 and message in lines[0], lines


def test_output_dir_that_is_a_file_or_not_writable(tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    result, lines = run(["train", "--output-dir", str(a_file), *FAST], tmp_path)
    assert result.exit_code == 1 and lines == [f"Error: --output-dir {a_file}: exists and is not a directory"]
    result, lines = run(["train", "--output-dir", "/proc/arc25-not-writable", *FAST], tmp_path)
    assert result.exit_code == 1 and len(lines) == 1 and "/proc/arc25-not-writable: not writable" in lines[0]


CONFIG_FILES = [
    ("syntax.yaml", "max_steps: 2\ndata: [\n", "syntax.yaml: YAML syntax error at line 3"),
    ("list.yaml", "- max_steps: 2\n", "list.yaml: expected a mapping of options, got a list"),
    ("type.yaml", "max_steps: two\n", "type.yaml: max_steps: expected an integer, got 'two'"),
    ("datatype.yaml", "data:\n  max_tokens: big\n", "datatype.yaml: data.max_tokens: expected an integer, got 'big'"),
    ("string.yaml", "data:\n  task_sources: synthetic\n", "data.task_sources: expected a list, got 'synthetic'"),
    ("unknown.yaml", "max_stepz: 2\n", "unknown option 'max_stepz'"),
    ("badjson.json", '{"max_steps": 2,}', "badjson.json: malformed JSON"),
    ("range.yaml", "data:\n  train_as_test: 2\n", "range.yaml: data.train_as_test: must be at most 1.0"),
]


@pytest.mark.parametrize("name,text,message", CONFIG_FILES, ids=[c[0] for c in CONFIG_FILES])
def test_config_file_problems_name_the_file_and_key(tmp_path, name, text, message):
    path = tmp_path / name
    path.write_text(text)
    result, lines = run(["train", "--config", str(path), "--output-dir", str(tmp_path / "o")], tmp_path)
    assert result.exit_code == 1 and len(lines) == 1 and message in lines[0], lines
    assert not (tmp_path / "o" / "config.json").exists()


def test_command_line_overrides_the_file_and_types_are_kept(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("max_steps: 5\nlr: 1\ndata:\n  max_tokens: 2048\n  task_sources: [synthetic]\n")
    cfg = resolve(TrainConfig, str(path), {"max_steps": 7, "seed": 3})
    assert cfg.optim.max_steps == 7 and cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    assert cfg.packing.max_tokens == 2048 and cfg.data.seed == 3 and cfg.sources.task_sources == ["synthetic"]
    # the data commands read the data options of a file written for training
    assert resolve(DataConfig, str(path), {}, (TrainConfig,)).packing.max_tokens == 2048
    with pytest.raises(ConfigError, match="--max-steps: expected an integer, got True"):
        resolve(TrainConfig, None, {"max_steps": True})


def test_reused_output_dir_is_refused_and_overwrite_starts_clean(tmp_path):
    out = tmp_path / "run"
    base = ["train", "--output-dir", str(out), *FAST, "--max-steps", "2", "--save-every", "1"]
    first, _ = run(base, tmp_path)
    assert first.exit_code == 0, first.output
    assert len(list((out / "checkpoints").iterdir())) == 2
    again, lines = run(base + ["--lr", "3e-4"], tmp_path)
    assert again.exit_code == 1 and "holds another run; pass --resume to continue it, --overwrite" in lines[0]
    (out / "notes.txt").write_text("mine")  # not a run output: kept
    fresh, _ = run(base[:-2] + ["--save-every", "0", "--overwrite"], tmp_path)
    assert fresh.exit_code == 0, fresh.output
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-000002"]  # nothing of the first run is left
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert (out / "notes.txt").read_text() == "mine"


def test_main_job_config_runs_twice_in_a_row(tmp_path):
    config = tmp_path / "tiny_cpu.yaml"
    shutil.copy(ROOT / "configs" / "tiny_cpu.yaml", config)
    args = ["train", "--config", str(config), "--output-dir", str(tmp_path / "main"), "--max-steps", "2",
            "--eval-every", "0", "--verify-samples", "0", "--save-every", "0"]
    for _ in range(2):
        result, lines = run(args, tmp_path)
        assert result.exit_code == 0, result.output
        assert lines[-1].startswith("done: 2 steps") and "model -> " in lines[-1]
    assert [json.loads(x)["step"] for x in (tmp_path / "main" / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_only_invalid_task_under_skip_invalid_says_so(tmp_path):
    path = tmp_path / "bad_challenges.json"
    path.write_text(json.dumps({"t1": {"train": [{"input": [[1, 2], [3]], "output": [[1]]}], "test": []}}))
    result, lines = run(["show-sample", "--task-source", f"kaggle:{path}", "--skip-invalid", "--verify-samples", "0"],
                        tmp_path)
    assert result.exit_code == 1 and len(lines) == 1
    assert "every task is invalid (1 skipped with --skip-invalid)" in lines[0] and "not rectangular" in lines[0]


def test_her_line_with_a_raw_line_separator_is_valid(tmp_path):
    code = "def task(img):\n    s = 'a\u2028b'\n    return img"
    path = tmp_path / "her.jsonl"
    path.write_text(json.dumps({"inputs": [[[1]]], "outputs": [[[1]]], "code": code}, ensure_ascii=False) + "\n",
                    encoding="utf-8")
    assert "\u2028" in path.read_text(encoding="utf-8")
    from arc25_fast.data.tasks import load_her

    tasks, report = load_her(path)
    assert len(tasks) == 1 and tasks[0].code == code and not report.skipped


HOLD_LOCK = ("import os, sys, time\nfd = os.open(sys.argv[1], os.O_CREAT | os.O_EXCL)\nprint('held', flush=True)\n"
             "time.sleep(600)")


def hold_lock(lock: Path) -> subprocess.Popen:
    """A process that takes ``lock`` exactly as torch's FileBaton does (create, keep the descriptor open)."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(lock)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def dead_lock(lock: Path) -> None:
    proc = hold_lock(lock)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


@pytest.mark.parametrize("env", ["TORCH_EXTENSIONS_DIR set", "TORCH_EXTENSIONS_DIR unset"])
def test_dead_build_locks_are_taken_over_at_once_where_torch_puts_them(tmp_path, monkeypatch, capsys, env):
    """The locks are planted in the build directory torch itself computes for an op (one folder below
    TORCH_EXTENSIONS_DIR, which the trainer always sets: to a private folder under HOME when the user did not).
    A lock whose builder was killed goes at once, whatever its age; one held by a live build stays."""
    from torch.utils.cpp_extension import _get_build_directory

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    if env == "TORCH_EXTENSIONS_DIR set":
        monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    else:
        monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    use_private_extensions_dir()
    dead = Path(_get_build_directory("cpu_adam", False)) / "lock"
    live = Path(_get_build_directory("other_op", False)) / "lock"
    assert dead.parent.parent == Path(os.environ["TORCH_EXTENSIONS_DIR"])
    dead_lock(dead)
    builder = hold_lock(live)
    try:
        assert lock_holders(live) == [builder.pid] and lock_holders(dead) == []
        use_private_extensions_dir()
        assert not dead.exists() and live.exists()  # a build in progress elsewhere keeps its lock
    finally:
        builder.kill()
        builder.wait()
    assert "the build that made it no longer runs" in capsys.readouterr().err


@pytest.mark.slow
def test_a_run_survives_a_build_that_died_while_it_waited(tmp_path, monkeypatch, capsys):
    """A real torch JIT build: this process waits on another builder's lock, that builder is killed with -9, and
    ``build_op`` takes the lock over, builds the op itself and loads it (torch alone would load an op never built)."""
    from torch.utils.cpp_extension import _get_build_directory, load_inline

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    name = f"arc25_lock_probe_{os.getpid()}"
    lock = Path(_get_build_directory(name, False)) / "lock"
    builder = hold_lock(lock)
    source = "int twice(int x) { return 2 * x; }"
    result = {}

    def load():
        return load_inline(name, cpp_sources=source, functions=["twice"], extra_cflags=["-O0"])

    waiter = threading.Thread(target=lambda: result.update(op=build_op(load, name)))
    waiter.start()
    time.sleep(2)
    assert waiter.is_alive() and "process %d is compiling the op" % builder.pid in capsys.readouterr().err
    builder.send_signal(signal.SIGKILL)
    builder.wait()
    waiter.join(timeout=400)
    assert not waiter.is_alive() and result["op"].twice(21) == 42
    assert "building it here" in capsys.readouterr().err




@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_file_resolves(path):
    cfg = resolve(TrainConfig, str(path), {})
    assert cfg.sources.task_sources and cfg.optim.max_steps >= 1


COMMAND_CONFIGS = (TrainConfig, TTTConfig, SearchConfig, EvalConfig, ProfileConfig, DataConfig)


@pytest.mark.parametrize("cls", COMMAND_CONFIGS, ids=lambda c: c.__name__)
def test_command_configs_are_composed_of_parts_with_options_declared_once(cls):
    """No config inherits another's fields; every option name belongs to one part; the same part class (with its
    help text) serves every command that has it."""
    assert cls.__bases__ == (object,)
    opts = options(cls)  # raises on a name two parts declare
    for opt in opts.values():
        assert opt.help and opt.flag.startswith("--")
    for other in COMMAND_CONFIGS:
        for name in set(opts) & set(options(other)):
            assert options(other)[name].spec is opts[name].spec, name


def test_a_file_may_group_options_under_a_part_name_but_not_invent_any(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("optim:\n  lr: 0.5\nlora_rank: 4\n")
    cfg = resolve(TrainConfig, str(path), {})
    assert cfg.optim.lr == 0.5 and cfg.lora.rank == 4
    path.write_text("optim:\n  lr_typo: 0.5\n")
    with pytest.raises(ConfigError, match=r"run.yaml: optim.lr_typo: unknown option 'lr_typo'"):
        resolve(TrainConfig, str(path), {})
    with pytest.raises(ConfigError, match="unknown option 'eval_every'"):  # a train option ttt does not have
        configure(TTTConfig, eval_every=3)
