"""The fixed-shape decode step (``--decode static``, and ``graph`` on a GPU) gives the samples of transformers' own
forward (``--decode hf``): same seed, same tokens, for prompts of different lengths, rows that stop early (and move
to a smaller step), a LoRA model and a tied head; the step itself never reads a device value, which is what lets
a CUDA graph capture it."""
import pytest
import torch
from peft import LoraConfig, get_peft_model

from arc25_fast.runtime.step_audit import StepAudit
from arc25_fast.solving import decoding
from arc25_fast.solving.static_decode import DecodeStep, StaticKV
from arc25_fast.training.model import load_base_model

CPU = torch.device("cpu")
PROMPTS = [[5, 17, 33, 8, 90, 4], [7, 7, 12], [101, 3, 55, 21, 9, 14, 2, 60, 70]]  # three lengths


@pytest.fixture(scope="module")
def model(tiny_tokenizer):
    return load_base_model("tiny", len(tiny_tokenizer), torch.float32, "sdpa", 0).eval()


def every_eighth(model) -> list[int]:
    """Stop tokens that end about one row in eight at each step of a random model: rows stop at different steps."""
    return list(range(0, model.config.vocab_size, 8))


def both(model, **kwargs):
    args = {**dict(n=6, temperature=1.0, top_p=1.0, max_new_tokens=24, seed=3, batch_size=3, device=CPU), **kwargs}
    return decoding.sample(model, PROMPTS, decode="hf", **args), decoding.sample(model, PROMPTS, decode="static", **args)


def test_static_decode_gives_the_samples_of_transformers_forward(model):
    hf, static = both(model, stop_ids=every_eighth(model))
    assert hf == static
    lengths = sorted(len(s) for samples in static for s in samples)
    # rows stopped at many different steps, half of them well before the last: the live rows moved to a smaller step
    assert len(set(lengths)) > 4 and lengths[len(lengths) // 2] + 2 < lengths[-1], lengths


def test_static_decode_greedy_equals_transformers_forward(model):
    hf, static = both(model, stop_ids=[0], temperature=0.0)
    assert hf == static


def test_static_decode_with_a_lora_adapter_and_a_tied_head(tiny_tokenizer):
    base = load_base_model("tiny", len(tiny_tokenizer), torch.float32, "sdpa", 0)
    assert base.config.tie_word_embeddings
    torch.manual_seed(0)
    lora = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"],
                                           init_lora_weights=False)).eval()
    hf, static = both(lora, stop_ids=every_eighth(lora))
    assert hf == static
    with lora.disable_adapter():
        unadapted, _ = both(lora, stop_ids=every_eighth(lora))
    assert hf != unadapted  # the adapter is applied, not skipped


def test_a_static_step_reads_no_device_value(model):
    """A CUDA graph cannot capture a host read; the step has none (the sampler reads the picked tokens outside)."""
    with torch.no_grad():
        _, cache = decoding._forward(model, torch.tensor([PROMPTS[0]]), None)
    kv = StaticKV.from_prompts([cache], [len(PROMPTS[0])], [0, 0, 0], len(PROMPTS[0]) + 4)
    step = DecodeStep(model, kv, torch.tensor([len(PROMPTS[0])] * 3))
    step(torch.tensor([1, 2, 3]))
    with StepAudit(model.parameters()) as audit:
        step(torch.tensor([4, 5, 6]))
    assert sum(audit.syncs.values()) == 0, audit.syncs
    assert int(kv.write) == len(PROMPTS[0]) + 2 and step.positions.flatten().tolist() == [len(PROMPTS[0]) + 2] * 3


def test_a_static_step_writes_each_token_in_place_and_attends_to_its_prompt_only(model):
    """Two prompts of different lengths in one StaticKV, two rows each: each row's logits equal a forward of its own
    prompt and tokens alone (no attention to another row's columns or to the padding)."""
    prompts = PROMPTS[:2]
    caches = []
    with torch.no_grad():
        for p in prompts:
            caches.append(decoding._forward(model, torch.tensor([p]), None)[1])
    lengths = [len(p) for p in prompts]
    rows = [0, 1, 1, 0]  # a prompt's rows need not be neighbours
    kv = StaticKV.from_prompts(caches, lengths, rows, max(lengths) + 3)
    step = DecodeStep(model, kv, torch.tensor([lengths[i] for i in rows]))
    fed = [[11, 12], [21, 22], [31, 32], [41, 42]]
    for t in range(2):
        logits = step(torch.tensor([f[t] for f in fed]))
    for r, i in enumerate(rows):
        with torch.no_grad():
            want = model(input_ids=torch.tensor([prompts[i] + fed[r]])).logits[0, -1].float()
        torch.testing.assert_close(logits[r], want, atol=1e-4, rtol=1e-4)


def test_decode_refuses_what_it_cannot_run(model, tiny_tokenizer):
    with pytest.raises(ValueError, match="CUDA graphs"):
        decoding.sample(model, PROMPTS, 2, 1.0, 1.0, 4, [0], 0, 2, CPU, decode="graph")
    eager = load_base_model("tiny", len(tiny_tokenizer), torch.float32, "eager", 0).eval()
    with pytest.raises(ValueError, match="not sdpa; use --decode hf"):
        decoding.sample(eager, PROMPTS, 2, 1.0, 1.0, 4, [0], 0, 2, CPU, decode="static")
    with pytest.raises(ValueError, match="use one of"):
        decoding.sample(model, PROMPTS, 2, 1.0, 1.0, 4, [0], 0, 2, CPU, decode="fast")
