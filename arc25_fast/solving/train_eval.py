"""``train --eval-tasks``: tasks solved by generation during training, scored as ``evaluate`` scores them."""

import torch

from ..data.prompts import CODE
from ..data.sources import load_tasks
from ..runtime.distributed import all_reduce
from ..runtime.global_rng import rng_state, set_rng_state
from ..runtime.logs import note
from ..sandbox.pool import pool_from
from .generation import HFGenerator, sampling_mode
from .options import EvalTasks, Sampling, SolveOptions
from .solver import COUNTS, SCORES, end_of_turn_ids, solve_task


class GenerationEval:
    """``train --eval-tasks``: the same scoring on a fixed subset of tasks every N steps, with the model in training.

    Each rank scores its share of the subset with Hugging Face ``generate`` on the in-memory model (switched to
    SDPA attention and eval mode meanwhile); counts are summed over ranks.
    """

    def __init__(self, cfg, mix, encoder, rank: int, world: int):
        """``cfg``: the train command's config (its ``eval_tasks``, ``sandbox``, ``data`` and ``synthetic``)."""
        opts: EvalTasks = cfg.eval_tasks
        kind = opts.prompt_kind
        if kind == "auto":
            kind = "code" if any(s.kind == CODE for s in mix.sources) else "output"
        self.solve = SolveOptions(prompt_kind=kind, seed=cfg.data.seed, views=cfg.augmentation)
        tasks, _ = load_tasks(opts.tasks, cfg.data.skip_invalid, synthetic=cfg.synthetic)
        self.tasks = [t for t in tasks if t.test][:opts.max_tasks][rank::world]
        self.encoder, self.rank = encoder, rank
        self.sampling = Sampling(n=opts.samples, temperature=1.0, top_p=0.95, max_new_tokens=opts.max_new_tokens,
                                 batch_size=8, seed=cfg.data.seed)
        self.pool = pool_from(cfg.sandbox) if kind == "code" else None
        if self.pool is not None and (self.pool.isolation["missing"] or self.pool.isolation["unsafe"]):
            note(f"--eval-tasks programs run with sandbox layers {', '.join(self.pool.isolation['layers'])} only "
                 f"(--unsafe-sandbox): missing {', '.join(self.pool.isolation['missing'])}", rank)
        self.stop_ids = end_of_turn_ids(encoder.tokenizer, encoder)

    def __call__(self, packed, device: torch.device) -> dict:
        rng = rng_state()  # sampling must not shift training's random streams
        try:
            with sampling_mode(packed):
                generator = HFGenerator(packed.model, self.encoder.tokenizer, self.stop_ids, device, adapters=False)
                rows = [solve_task(self.solve, t, self.encoder, generator, self.sampling, self.pool, None)[0]
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
