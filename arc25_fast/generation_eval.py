"""``train --eval-tasks``: tasks solved by generation during training, scored as ``evaluate`` scores them."""
import os

import torch

from .config import EvalConfig
from .generation import HFGenerator, Sampling, sampling_mode
from .logs import note
from .pipeline import synthetic_config
from .sandbox import SandboxPool
from .solving import COUNTS, SCORES, end_of_turn_ids, solve_task
from .sources import load_tasks


class GenerationEval:
    """``train --eval-tasks``: the same scoring on a fixed subset of tasks every N steps, with the model in training.

    Each rank scores its share of the subset with Hugging Face ``generate`` on the in-memory model (switched to
    SDPA attention and eval mode meanwhile); counts are summed over ranks.
    """

    def __init__(self, cfg, mix, encoder, rank: int, world: int):
        from .prompts import CODE

        kind = cfg.eval_prompt_kind
        if kind == "auto":
            kind = "code" if any(s.kind == CODE for s in mix.sources) else "output"
        self.cfg = EvalConfig(data=cfg.data, tasks=cfg.eval_tasks, prompt_kind=kind, samples=cfg.eval_samples,
                              max_new_tokens=cfg.eval_max_new_tokens)
        tasks, _ = load_tasks(cfg.eval_tasks, cfg.data.skip_invalid, synthetic=synthetic_config(cfg.data))
        self.tasks = [t for t in tasks if t.test][:cfg.eval_max_tasks][rank::world]
        self.encoder, self.rank = encoder, rank
        self.sampling = Sampling(cfg.eval_samples, 1.0, 0.95, cfg.eval_max_new_tokens, 8, cfg.data.seed)
        self.pool = SandboxPool(min(2, os.cpu_count() or 1), unsafe=cfg.unsafe_sandbox) if kind == "code" else None
        if self.pool is not None and (self.pool.isolation["missing"] or self.pool.isolation["unsafe"]):
            note(f"--eval-tasks programs run with sandbox layers {', '.join(self.pool.isolation['layers'])} only "
                 f"(--unsafe-sandbox): missing {', '.join(self.pool.isolation['missing'])}", rank)
        self.stop_ids = end_of_turn_ids(encoder.tokenizer, encoder)

    def __call__(self, packed, device: torch.device) -> dict:
        from .checkpoint import rng_state, set_rng_state
        from .engine import all_reduce

        rng = rng_state()  # sampling must not shift training's random streams
        try:
            with sampling_mode(packed):
                generator = HFGenerator(packed.model, self.encoder.tokenizer, self.stop_ids, device, adapters=False)
                rows = [solve_task(self.cfg, t, self.encoder, generator, self.sampling, self.pool, None)[0]
                        for t in self.tasks]
        finally:
            set_rng_state(rng)
        scored = [r for r in rows if "pass@1" in r]
        local = [len(scored), *[sum(r[k] for r in scored) for k in SCORES], *[sum(r[k] for r in rows) for k in COUNTS],
                 generator.tokens, generator.seconds]
        n, *sums = all_reduce(local, device, "the generation scores")
        scores, counts = sums[:len(SCORES)], sums[len(SCORES):len(SCORES) + len(COUNTS)]
        out = {f"eval_{k}": v / n if n else None for k, v in zip(SCORES, scores)}
        out.update({f"eval_{k}": int(v) for k, v in zip(COUNTS, counts)}, eval_tasks=int(n))
        return out

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
