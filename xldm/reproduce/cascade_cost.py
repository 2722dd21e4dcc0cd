"""The cascade's cost argument (Ho et al. 2021, Sec. 1; Imagen, Saharia et al. 2022, Sec. 2.4) next to SDXL's
latent model: a pixel cascade base -> SR -> SR against its base network sampling the final size directly, and the
latent model (base + refiner + VAE decode) at the same final size.  FLOPs are measured by the FLOP counter
(`xldm.reproduce.cost`, torch's FlopCounterMode on the meta device); wall time is measured by running each
pipeline on this machine, the same prompt and seeds.

smoke: the tiny cascade and tiny latent model with random weights, a few steps; small / full: the bundled cascade
(`xldm/data/cascade`) and the bundled default model at their default settings (the direct network is the cascade's
base UNet at the final size, with random weights: only its time counts)."""

from __future__ import annotations

import time
from pathlib import Path

from xldm.reproduce import common, cost
from xldm.reproduce.common import Scale

PROMPT = "a red circle"


def _timed(calls: int, fn) -> float:
    """Mean seconds of `fn(i)` over `calls` calls, after one untimed warm-up call."""
    fn(-1)
    t0 = time.perf_counter()
    for i in range(calls):
        fn(i)
    return (time.perf_counter() - t0) / calls


def _models(scale: Scale, seed: int):
    from xldm.cascade import load_cascade, random_stage
    from xldm.config import CASCADES, DEFAULT_CASCADE_DIR, DEFAULT_MODEL_PATH

    if scale.name == "smoke":
        from xldm.train.config import TrainConfig
        from xldm.train.diffusion import build_model

        stages = [random_stage(c, seed) for c in CASCADES["tiny-cascade"]]
        base, refiner = (build_model(TrainConfig(model=m, seed=seed)) for m in ("tiny-sdxl-base", "tiny-sdxl-refiner"))
        return stages, base, refiner, {"cascade_steps": [4, 4, 4], "latent_steps": 5}
    from xldm.weights.load import load_model

    stages = load_cascade(str(DEFAULT_CASCADE_DIR))
    base = load_model(DEFAULT_MODEL_PATH)
    refiner = load_model(DEFAULT_MODEL_PATH.with_name("refiner.safetensors"))
    return stages, base, refiner, {"cascade_steps": None, "latent_steps": 30}


def run(out: Path, scale: Scale, *, seed: int = 0, data: str | None = None, progress: bool = False) -> dict:
    import torch

    from xldm.cascade import DEFAULT_CFG, DEFAULT_STEPS, CascadePipeline, is_sr, random_stage
    from xldm.pipeline import Pipeline

    t_start = time.perf_counter()
    stages, base, refiner, steps = _models(scale, seed)
    configs = [s.config for s in stages]
    kinds = ["sr" if is_sr(c) else "base" for c in configs]
    cascade_steps = steps["cascade_steps"] or [DEFAULT_STEPS[k] for k in kinds]
    cascade_cfg = [DEFAULT_CFG[k] for k in kinds]
    flops = cost.cascade_cost(configs, cascade_steps, cascade_cfg)
    final = flops.stages[-1].size
    latent_steps, latent_cfg = steps["latent_steps"], 5.0
    latent = cost.latent_model_cost(base.config, refiner.config, final, steps=latent_steps, cfg=latent_cfg)
    repeats = 1 if scale.name == "smoke" else 3

    cascade = CascadePipeline(stages, dtype=torch.float32)
    stage_marks: dict[int, float] = {}

    def mark(stage: int, step: int, total: int) -> None:
        stage_marks[stage] = time.perf_counter()

    stage_seconds = [0.0] * len(stages)

    def run_cascade(i: int) -> None:
        t0 = time.perf_counter()
        cascade(PROMPT, steps=cascade_steps, cfg=cascade_cfg, seed=seed + max(i, 0), callback=mark)
        if i >= 0:
            previous = t0
            for k in range(len(stages)):
                stage_seconds[k] += (stage_marks[k] - previous) / repeats
                previous = stage_marks[k]

    cascade_seconds = _timed(repeats, run_cascade)
    direct_config = cost.rescaled(configs[:1], [final])[0]
    direct = CascadePipeline([random_stage(direct_config, seed)], dtype=torch.float32)
    direct_seconds = _timed(repeats, lambda i: direct(PROMPT, steps=cascade_steps[0], cfg=cascade_cfg[0],
                                                      seed=seed + max(i, 0)))
    pipe = Pipeline(base, refiner, dtype=torch.float32, device="cpu")
    latent_seconds = _timed(repeats, lambda i: pipe(PROMPT, steps=latent_steps, cfg=latent_cfg, width=final[0],
                                                    height=final[1], seed=seed + max(i, 0)))

    def entry(part: cost.StageCost, seconds: float | None) -> dict:
        return {"name": part.name, "size": list(part.size), "steps": part.steps, "evals": part.evals,
                "flops_per_eval": part.flops_per_eval, "flops": part.total_flops, "seconds": seconds}

    results = {"claim": "Imagen Sec. 2.4: a cascade costs less than sampling the final size directly",
               "scale": scale.name, "seed": seed, "final_size": list(final), "repeats": repeats,
               "threads": torch.get_num_threads(),
               "cascade": {"stages": [entry(s, t) for s, t in zip(flops.stages, stage_seconds)],
                           "flops": flops.total_flops, "seconds": cascade_seconds},
               "direct": {**entry(flops.direct, direct_seconds)},
               "latent": {"parts": [entry(p, None) for p in latent],
                          "flops": sum(p.total_flops for p in latent), "seconds": latent_seconds},
               "flops_ratio_cascade_to_direct": flops.ratio,
               "seconds_ratio_cascade_to_direct": cascade_seconds / direct_seconds,
               "flops_ratio_latent_to_cascade": sum(p.total_flops for p in latent) / flops.total_flops}
    results["paper_ordering_holds"] = bool(flops.ratio < 1 and cascade_seconds < direct_seconds)
    results["seconds"] = time.perf_counter() - t_start

    def row(name, size, steps_, evals, flops_, seconds, ratio) -> list:
        return [name, f"{size[0]}x{size[1]}" if size else "", steps_, evals, cost._flops(flops_),
                common.fmt(seconds, 3) if seconds is not None else "", ratio]

    direct_flops = flops.direct.total_flops
    rows = [row(s.name, s.size, s.steps, s.evals, s.total_flops, t, "") for s, t in zip(flops.stages, stage_seconds)]
    rows.append(row("**pixel cascade total**", None, "", sum(s.evals for s in flops.stages), flops.total_flops,
                    cascade_seconds, f"{flops.ratio:.3f}"))
    rows.append(row(f"**{flops.direct.name}**", flops.direct.size, flops.direct.steps, flops.direct.evals,
                    direct_flops, direct_seconds, "1"))
    rows += [row(p.name, p.size, p.steps, p.evals, p.total_flops, None, "") for p in latent]
    rows.append(row("**latent model total**", None, "", sum(p.evals for p in latent), results["latent"]["flops"],
                    latent_seconds, f"{results['latent']['flops'] / direct_flops:.3f}"))
    table = common.markdown_table(["part", "size", "steps", "network evaluations", "FLOPs (measured)",
                                   "seconds / image", "FLOPs / direct"], rows)
    intro = (f"Scale `{scale.name}`, seed {seed}: one {final[0]}x{final[1]} image of \"{PROMPT}\", wall time the mean "
             f"of {repeats} runs after a warm-up on {torch.get_num_threads()} thread(s) of this machine's CPU; FLOPs "
             f"of one UNet evaluation x evaluations (2 per step with guidance), text encoders left out.")
    verdict = (f"The cascade {'is' if results['paper_ordering_holds'] else 'is not'} cheaper than direct sampling at "
               f"the final size: {flops.ratio:.3f} of its FLOPs, "
               f"{results['seconds_ratio_cascade_to_direct']:.3f} of its time; the latent model costs "
               f"{results['flops_ratio_latent_to_cascade']:.3f} of the cascade's FLOPs.")
    totals = (("pixel cascade", flops.total_flops, cascade_seconds), ("direct at the final size", direct_flops,
                                                                        direct_seconds),
              ("latent model", results["latent"]["flops"], latent_seconds))
    figure = common.stack_vertically([
        common.bar_chart("GFLOPs per image (measured)", [(n, f / 1e9) for n, f, _ in totals]),
        common.bar_chart("seconds per image (this CPU)", [(n, t) for n, _, t in totals], unit=" s")])
    common.write_report(out, "Cascade cost (Imagen Sec. 2.4) against the latent model", intro,
                        [("Cost per image", table), ("Result", verdict)], {"cost.png": figure}, results)
    return results
