"""``ssr pipeline``: finetune → encode-latents → train-dit → sample → evaluate → probe-channels.

All stages share one run folder. A stage whose output is already there, complete and made from the
inputs it would read now (content hashes of the tokenizer, latents and DiT files and the settings that
shape it, recorded in ``.pipeline_<stage>.json``) is skipped; any other is redone (training stages also
resume from their newest checkpoint), so re-running after an interruption picks up where the run
stopped, and a changed tokenizer redoes everything after it. The run ends with a summary table (also in ``summary.json``).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from ssr_cli.engine.atomic import write_json_atomic
from ssr_cli.engine.progress import console, print_result_table
from ssr_cli.engine.runtime import Runtime
from ssr_cli.metrics.lpips import build_lpips
from ssr_cli.recipe import Recipe
from ssr_cli.regularizers import build
from ssr_cli.stages import encode_latents, evaluate, finetune, probe_channels, sample, train_dit
from ssr_cli.stages.common import (
    build_dit_from,
    build_tokenizer,
    dit_kwargs,
    is_vae_family,
    record_path,
    unreadable_count,
)
from ssr_cli.stages.denoise import build_arms
from ssr_cli.stages.diffusability import TransformedTokenizer, build_probe_dit
from ssr_cli.stages.evaluate import HEADLINE_METRICS
from ssr_cli.stages.probe_channels import probe_dynamics, probe_grid

PIPELINE = (finetune, encode_latents, train_dit, sample, evaluate, probe_channels)
"""The chain, in order; each stage module exposes NAME, inputs(cfg), is_complete(cfg) and run(cfg, rt)."""
STAGES = tuple(stage.NAME for stage in PIPELINE)
BY_NAME = {stage.NAME: stage for stage in PIPELINE}


def check_builds(cfg: Recipe, stages: tuple[str, ...] = STAGES) -> list[str]:
    """What ``--dry-run`` checks: build the models these stages would build (no data, no weights files), so a
    mismatch between tokenizer, regularizer, DiT and the networks of evaluate / probe-channels / diffusability /
    denoise fails here as it would in the run. Returns what was built."""
    built: list[str] = []
    if "denoise" in stages:  # no tokenizer: a denoiser and its SSR dynamics
        built += build_arms(cfg)
        if not set(stages) - {"denoise"}:
            return built
    tok = build_tokenizer(cfg, weights=None).eval()
    built.append(f"tokenizer {cfg.tokenizer.family}/{cfg.tokenizer.size}")

    @torch.no_grad()
    def latent_of(size: int, batch: int = 1) -> torch.Tensor:
        return tok.encode_latent(torch.zeros(batch, 3, size, size))

    if "finetune" in stages and not is_vae_family(cfg):
        build(cfg.regularizer, cfg.loss, latent_channels=tok.latent_channels, image_size=cfg.data.image_size,
              seed=cfg.run.seed)
        built.append(f"regularizer {cfg.regularizer.kind} on {tok.latent_channels} channels")
    if {"train-dit", "sample"} & set(stages):
        z = latent_of(cfg.data.image_size)
        kwargs = dit_kwargs(cfg, {"latent_shape": list(z.shape[1:]), "num_classes": cfg.dit.num_classes or 1})
        build_dit_from(kwargs)
        built.append(f"DiT {cfg.dit.model} on latents {tuple(z.shape[1:])}")
    if "evaluate" in stages and (cfg.eval.reconstruction or is_vae_family(cfg)):
        vae = is_vae_family(cfg)  # the VAEs are evaluated at data.image_size, without LPIPS
        size = cfg.data.image_size if vae else cfg.eval.image_size or cfg.data.image_size
        with torch.no_grad():
            tok.decode(latent_of(size))
        built.append(f"reconstruction at {size}x{size}")
        if cfg.eval.lpips_weights and not vae:
            build_lpips(cfg.eval.lpips_net)
            built.append(f"LPIPS {cfg.eval.lpips_net}")
    if "probe-channels" in stages:
        size = cfg.probe.image_size or cfg.data.image_size
        grid_w, grid_h = probe_grid(cfg, latent_of(size).shape[1])
        probe_dynamics(cfg, grid_w, grid_h)
        built.append(f"probe dynamics {cfg.regularizer.basis} {grid_w}x{grid_h} at {size}x{size}")
    if "diffusability" in stages:
        d = cfg.diffusability
        transformed = TransformedTokenizer(tok, d.latent_transform, d.transform_strength, d.transform_seed)
        shape = tuple(transformed.forward_map(latent_of(cfg.data.image_size, batch=2)).shape[1:])
        built.append(f"latent transform {d.latent_transform} on latents {shape}")
        if "flow_probe" in d.proxies:
            build_probe_dit(shape, model=d.probe_model, depth=d.probe_depth, hidden=d.probe_hidden,
                            heads=d.probe_heads)
            built.append(f"flow-probe DiT {d.probe_model}")
    return built


def run_pipeline(cfg: Recipe, rt: Runtime, stages: tuple[str, ...] = STAGES) -> dict:
    timings: dict[str, str] = {}
    for name in stages:
        stage = BY_NAME[name]
        if stage.is_complete(cfg):
            if rt.is_main:
                console.rule(f"[dim]{name}: complete, skipped")
            timings[name] = "skipped (complete)"
            continue
        if rt.is_main:
            console.rule(f"[bold]{name}")
        t0 = time.perf_counter()
        stage.run(cfg, rt)
        rt.barrier()
        if rt.is_main and stage.PIPELINE_RECORD:
            write_json_atomic(record_path(cfg, name), stage.inputs(cfg))
        timings[name] = f"{time.perf_counter() - t0:.1f} s"
    summary = summarize(cfg, timings)
    if rt.is_main:
        write_json_atomic(cfg.run_dir() / "summary.json", summary, indent=2)
        print_summary(summary)
    return summary


def summarize(cfg: Recipe, timings: dict[str, str]) -> dict:
    run = cfg.run_dir()
    out: dict = {"run": str(run), "stages": timings, "unreadable_images": unreadable_count(run / "unreadable_images.txt")}
    for name, path in (("eval", run / "eval.json"), ("probe", run / "probe" / "probe.json")):
        if Path(path).is_file():
            out[name] = json.loads(Path(path).read_text())
    return out


def summary_rows(summary: dict) -> list[tuple[str, str]]:
    """(name, value) rows: stage timings, headline metrics, probe numbers; unavailable ones named."""
    rows = [(f"stage {k}", v) for k, v in summary["stages"].items()]
    if summary.get("unreadable_images"):
        rows.append(("unreadable images (skipped)", f"{summary['unreadable_images']} (see unreadable_images.txt)"))
    unavailable: list[str] = []
    for part, keys in HEADLINE_METRICS.items():
        metrics = summary.get("eval", {}).get(part)
        if metrics is None:
            continue
        missing = metrics.get("unavailable", {})
        for key in keys:
            value = metrics.get(key)
            if isinstance(value, (int, float)):
                rows.append((f"{part} {key}", f"{value:.4g}"))
            elif key in missing or "all" in missing:
                unavailable.append(f"{part} {key}")
    probe = summary.get("probe")
    if probe:
        k = probe["psnr_vs_k"]
        rows.append(("probe PSNR, 1 channel kept", f"{k[0]:.2f} dB"))
        rows.append((f"probe PSNR, {len(k) // 2} channels kept", f"{probe['psnr_half']:.2f} dB"))
        rows.append((f"probe PSNR, all {len(k)} channels", f"{probe['psnr_full']:.2f} dB"))
        rows.append(("probe frequency-order Spearman ρ", f"{probe['frequency_order_spearman']:.3f}"))
        rows.append(("probe blur-decay order Spearman ρ", f"{probe['blur_decay_spearman']:.3f}"))
        scored = probe.get("dynamics", {}).get("source", "recipe")
        rows.append((f"probe Ā prediction error (no-change), {scored} Ā",
                     f"{probe['dynamics_error']:.3f} ({probe['dynamics_error_no_change']:.3f})"))
    if unavailable:
        rows.append(("unavailable (see eval.json for why)", ", ".join(unavailable)))
    return rows


def print_summary(summary: dict) -> None:
    print_result_table(f"ssr pipeline: {summary['run']}", ["stage / metric"], ["value"], summary_rows(summary))
    console.print(f"details: {summary['run']}/summary.json, eval.json, probe/")


NAME = "pipeline"


def is_complete(cfg: Recipe, stages: tuple[str, ...] = STAGES) -> bool:
    return all(BY_NAME[name].is_complete(cfg) for name in stages)


def run(cfg: Recipe, rt: Runtime, stages: tuple[str, ...] = STAGES) -> dict:
    return run_pipeline(cfg, rt, stages)
