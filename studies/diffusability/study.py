"""Validation study of ``ssr diffusability``: do its proxies rank latent spaces the way a DiT's FID does?

Run from the project root:

    python studies/diffusability/study.py            # CIFAR-10, the full study (many CPU hours)
    python studies/diffusability/study.py --toy      # the same plumbing on a toy size, seconds
    python studies/diffusability/study.py --report   # only (re)write the report from the finished jsons

Every number comes from the committed commands, in this order, each resumable:
1. tokenizers: the CIFAR-10 study's pretrained KL-AE (``studies/cifar10/results/shared``, committed by that
   study's driver, with its recipe ``study.toml``), TAEF2 as released (../shared/data/taesd), and that study's
   seed-1 fine-tunes none / ssr / eq_vae / scale where they are on this machine (skipped otherwise).
2. proxies: ``ssr diffusability`` per latent space and seed (the KL-AE spaces, TAEF2, and controlled
   degradations of the pretrained KL-AE: additive noise of growing strength, a fixed spatial permutation,
   a random orthogonal channel mixing). Each proxy is cached, the flow probe resumes from its checkpoints.
3. ground truth: ``ssr diffusability`` with only the flow probe at the CIFAR-10 study's generation budget
   (LightningDiT-S/2, depth 6, width 192, 3000 steps of 64, FID of 1000 samples; toy: its held-out loss).
4. report: Spearman ρ between each proxy and the ground truth over the spaces, per seed, mean ± std, with a
   figure, in ``<out>/report.md`` (``report.json``, ``report.png``, ``spaces.png``).
Interrupt it at any point and run the same command again: it continues where it stopped. Two drivers, one
per core, share the spaces (``taskset -c 0 python studies/diffusability/study.py --threads 1 &`` and the same
with ``-c 1``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


@dataclass
class Space:
    name: str
    sets: list[str] = field(default_factory=list)
    """--set overrides of ``ssr diffusability`` (tokenizer, degradation)."""
    weights: str | None = None
    """--weights: the tokenizer file this space scores."""
    tokenizer: str = "kl-ae"
    """The tokenizer the space's latents come from (the report also ranks one tokenizer's spaces alone)."""
    optional: bool = False
    """Skipped (and left out of the report) when ``weights`` is not on this machine."""


CIFAR10 = ROOT / "studies" / "cifar10"
CIFAR10_RECIPE = CIFAR10 / "study.toml"


PRETRAINED = CIFAR10 / "results" / "shared" / "pretrain_tokenizer.safetensors"
"""The CIFAR-10 study's pretrained KL-AE, committed by its driver: every session has these bytes."""


def _cifar10_weights(run: str) -> str:
    return str(CIFAR10 / "runs" / run / "tokenizer.safetensors")


def full_spaces(recipe: str, seed: int = 1) -> list[Space]:
    """The pretrained KL-AE of the CIFAR-10 study (its committed copy), its degradations (additive noise of four
    strengths, a fixed spatial permutation, a random orthogonal channel mixing), TAEF2 as released, and the CIFAR-10
    study's four fine-tunes of seed ``seed`` where that study made them on this machine (``optional``: they live in
    its gitignored run folders; a fresh checkout scores the other eight spaces)."""
    base = str(PRETRAINED)
    spaces = [Space("klae-pretrained", weights=base)]
    for strength in (0.25, 0.5, 1.0, 2.0):
        spaces.append(Space(f"noise-{strength}", weights=base, sets=['diffusability.latent_transform="noise"',
                                                                     f"diffusability.transform_strength={strength}"]))
    spaces.append(Space("permute", weights=base, sets=['diffusability.latent_transform="permute"']))
    spaces.append(Space("mix", weights=base, sets=['diffusability.latent_transform="mix"']))
    spaces.append(Space("taef2", tokenizer="taef2", sets=['tokenizer.family="taesd"', 'tokenizer.size="taef2"',
                                       'tokenizer.weights="../shared/data/taesd/taef2_encoder.pth"',
                                       'regularizer.grid="8x4"']))
    for kind in ("none", "ssr", "eq_vae", "scale"):
        spaces.append(Space(f"ft-{kind}", weights=_cifar10_weights(f"{kind}-s{seed}"), optional=True))
    # run order: spaces expected to differ most first, so that the first few already span the range
    first = ["klae-pretrained", "noise-1.0", "permute", "taef2", "mix", "noise-0.25", "noise-2.0", "noise-0.5"]
    return sorted(spaces, key=lambda s: first.index(s.name) if s.name in first else len(first))


# Ground truth: the same DiT and budget as the CIFAR-10 study's generation arms (LightningDiT-S/2, depth 6, width 192,
# 3000 steps of 64), here trained by the flow probe of each space; FID of 1000 samples against the 1000-image pool
# the proxies use (one Inception pass of 32² images upsampled to 299² costs about 0.3 s on one core here, so 2000
# samples against 2000 images would add about 20 minutes per space; the pool's features are cached across runs).
FULL_GT = ['diffusability.proxies=["flow_probe"]', "diffusability.probe_depth=6", "diffusability.probe_hidden=192",
           "diffusability.probe_heads=3", "diffusability.probe_steps=3000", "diffusability.probe_batch=64",
           "diffusability.probe_lr=5e-4", "diffusability.probe_ckpt_every=250", "diffusability.num_latents=50000",
           "diffusability.holdout=1000", "diffusability.num_images=1000", "diffusability.probe_samples=1000"]

TOY_GT = ['diffusability.proxies=["flow_probe"]', "diffusability.probe_steps=12", "diffusability.probe_hidden=32"]



def toy_spaces(out: Path) -> list[Space]:
    """A random-init KL-AE (saved once, so every space shares it) and its degradations."""
    weights = out / "toy_klae.safetensors"
    if not weights.is_file():
        from ssr_cli.models.registry import build_tokenizer
        from ssr_cli.models.weights import save_weights
        from ssr_cli.stages.common import fixed_seed

        with fixed_seed(0):
            save_weights(build_tokenizer("kl-ae", "tiny").state_dict(), weights)
    w = str(weights)
    return [Space("klae-random", weights=w),
            Space("noise-0.5", weights=w, sets=['diffusability.latent_transform="noise"',
                                                "diffusability.transform_strength=0.5"]),
            Space("noise-2", weights=w, sets=['diffusability.latent_transform="noise"',
                                              "diffusability.transform_strength=2.0"]),
            Space("permute", weights=w, sets=['diffusability.latent_transform="permute"']),
            Space("mix", weights=w, sets=['diffusability.latent_transform="mix"'])]


def run_cli(args: list[str]) -> None:
    """One ``ssr`` command, in this process; a non-zero exit stops the study with the command named."""
    from ssr_cli.cli import app

    print("$ ssr " + " ".join(args), flush=True)
    code = app(args, standalone_mode=False)
    if code not in (None, 0):
        raise SystemExit(f"study: `ssr {' '.join(args)}` exited with {code}")


def diffusability_args(recipe: str, space: Space, seed: int, out: Path, extra: list[str], device: str | None):
    args = ["diffusability", recipe, "--out", str(out), "--set", f'run.name="dfz-{space.name}"',
            "--set", f"run.seed={seed}"]
    for s in space.sets + extra:
        args += ["--set", s]
    if space.weights:
        args += ["--weights", space.weights]
    if device:
        args += ["--device", device]
    return args


def run_study(out: Path, *, toy: bool, seeds: list[int], device: str | None, threads: str | None = None,
              only: list[str] | None = None) -> None:
    """Every space: its first seed's proxies, its ground truth, then the other seeds. Two drivers started
    together (one per core, ``--threads 1``) share the spaces: each takes the next space nobody holds (a lock
    file per space, dropped by the kernel when its holder exits), so a space is never run twice at once."""
    from ssr_cli.engine.lock import exclusive

    recipe = str(HERE / "toy.toml" if toy else CIFAR10_RECIPE)
    spaces = all_spaces = toy_spaces(out) if toy else full_spaces(recipe)
    if only:
        spaces = select_spaces(spaces, only)
    if not toy and not PRETRAINED.is_file():
        raise SystemExit(f"study: {PRETRAINED} is missing: run `python studies/cifar10/study.py --shared-only` "
                         "(it pretrains the KL-AE and commits that copy)")
    missing = [s.name for s in spaces if s.optional and not Path(s.weights).is_file()]
    if missing:
        print(f"study: skipping {', '.join(missing)}: their tokenizers are not on this machine (the CIFAR-10 "
              "study's fine-tunes; run its main arms here to add them)", flush=True)
    spaces = [s for s in spaces if s.name not in missing]
    extra = [] if threads is None else ['run.threads="auto"' if threads == "auto" else f"run.threads={int(threads)}"]
    held_elsewhere = []
    # breadth first: every space's first seed and ground truth, then the other seeds, so that a first ranking over
    # all the spaces exists as early as possible (a session may end before the last seeds)
    passes = [lambda sp: [(sp, seeds[0], out / sp.name / f"seed{seeds[0]}", extra),
                          (sp, 0, out / sp.name / "gt", (TOY_GT if toy else FULL_GT) + extra)],
              lambda sp: [(sp, s, out / sp.name / f"seed{s}", extra) for s in seeds[1:]]]
    for jobs_of in passes:
        for space in spaces:
            jobs = jobs_of(space)
            if all((job_out / "diffusability.json").is_file() for _, _, job_out, _ in jobs):
                continue
            with exclusive(out / ".locks" / f"{space.name}.lock", blocking=False) as held:
                if not held:
                    print(f"study: {space.name}: another driver is running it; next", flush=True)
                    held_elsewhere.append(space.name)
                    continue
                for sp, seed, job_out, sets in jobs:
                    run_cli(diffusability_args(recipe, sp, seed, job_out, sets, device))
    done = finished_spaces(out, all_spaces)
    if held_elsewhere:
        print(f"study: {', '.join(held_elsewhere)} still running in another driver; the report covers the "
              f"{len(done)} spaces with a ground truth (rerun with --report when that driver ends)", flush=True)
    if done or not toy:
        write_report(out, done, seeds, toy=toy, tokenizer_of={s.name: s.tokenizer for s in all_spaces})


def select_spaces(spaces: list[Space], only: list[str]) -> list[Space]:
    """The spaces named in ``only``, in that order (an unknown name stops the study and lists the known ones)."""
    by_name = {s.name: s for s in spaces}
    unknown = [n for n in only if n not in by_name]
    if unknown:
        raise SystemExit(f"study: unknown space(s) {', '.join(unknown)}; known: {', '.join(by_name)}")
    return [by_name[n] for n in only]


def finished_spaces(out: Path, spaces: list[Space]) -> list[str]:
    """The spaces with a ground truth in ``out`` (what ``--report`` can rank)."""
    return [s.name for s in spaces if (out / s.name / "gt" / "diffusability.json").is_file()]


# --------------------------------------------------------------------------------------------- report

def _load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def spearman_agreement(proxy: list[float], truth: list[float], lower_is_better: bool) -> float:
    """Spearman ρ between proxy and ground truth, signed so that +1 means the proxy ranks the spaces as the
    ground truth does (NaN with fewer than 3 spaces or a constant column)."""
    import numpy as np
    from scipy.stats import spearmanr

    if len(proxy) < 3 or np.ptp(proxy) == 0 or np.ptp(truth) == 0:
        return float("nan")
    rho = float(spearmanr(proxy, truth).statistic)
    return rho if lower_is_better else -rho


PROXY_OF = {"flow_loss_mean": "flow_probe", "flow_fid": "flow_probe", "ifid": "ifid", "viv_mean": "viv",
            "latent_hf_fraction": "spectrum", "equivariance_mean": "equivariance",
            "blur_dynamics_error": "equivariance", "effective_rank": "stats"}
"""The ``ssr diffusability`` proxy (its ``seconds`` entry) that computes each ranked number."""


def proxy_cost(results: list[dict], key: str) -> float:
    """Median wall seconds of the proxy behind ``key`` over the runs that recorded it (NaN when none did)."""
    import numpy as np

    secs = [r.get("seconds", {}).get(PROXY_OF[key]) for r in results]
    secs = [x for x in secs if x is not None]
    return float(np.median(secs)) if secs else float("nan")


MIN_SPACES = 5
"""Fewest spaces for a verdict: over 3 spaces ρ takes only the values ±1, ±0.5 and even ρ = 1 has p = 1/3."""


def spearman_p(x: list[float], y: list[float]) -> float:
    """Two-sided p-value of Spearman's ρ: exact (every permutation of y) up to 8 values, where scipy's
    t-approximation is too small (it gives p = 0 at |ρ| = 1); scipy's beyond."""
    import itertools

    import numpy as np
    from scipy.stats import rankdata, spearmanr

    if len(x) > 8:
        return float(spearmanr(x, y).pvalue)
    rx, ry = rankdata(x), rankdata(y)
    observed = abs(np.corrcoef(rx, ry)[0, 1])
    hits = total = 0
    for perm in itertools.permutations(ry):
        total += 1
        hits += abs(np.corrcoef(rx, perm)[0, 1]) >= observed - 1e-12
    return hits / total


def finetune_agreement(runs: Path = CIFAR10 / "results" / "runs") -> dict | None:
    """Each proxy against the gFID-2K of the CIFAR-10 study's generation arms: the proxies its driver ran
    (``diffusability.json``, one run per arm and seed) and the FID of its DiT (``eval.json``), from the jsons that
    study commits. Spearman ρ signed as in the main table, with its two-sided p-value (the runs are not
    independent draws: the arms share one pretrained start, so the p-value is a guide only). None when fewer than
    three runs have both."""

    from ssr_cli.stages.diffusability import RANKED

    pairs = {}
    for d in sorted(runs.glob("*/diffusability.json")):
        gen = (_load(d.with_name("eval.json")) or {}).get("generation") or {}
        if gen.get("fid") is not None:
            pairs[d.parent.name] = (_load(d)["summary"], float(gen["fid"]))
    if len(pairs) < 3:
        return None
    rows = {}
    for key, label, lower in RANKED:
        have = [(s[key], fid) for s, fid in pairs.values() if s.get(key) is not None]
        rho = spearman_agreement([p for p, _ in have], [f for _, f in have], lower)
        p = spearman_p([p for p, _ in have], [f for _, f in have]) if not math.isnan(rho) else float("nan")
        rows[key] = {"label": label, "rho": rho, "p": p, "runs": len(have)}
    return {"runs": {n: {"gfid": fid, **{k: s.get(k) for k, _, _ in RANKED}} for n, (s, fid) in pairs.items()},
            "proxies": rows}


def _seed_counts(runs: dict) -> str:
    """"the 4 arms have 3 seeds each" (or per arm when they differ), from run names ``<arm>-s<seed>``."""
    arms: dict[str, int] = {}
    for name in runs:
        arm = name.rsplit("-s", 1)[0]
        arms[arm] = arms.get(arm, 0) + 1
    counts = set(arms.values())
    if len(counts) == 1:
        n = counts.pop()
        return f"the {len(arms)} arms have {n} seed{'s' if n > 1 else ''} each"
    return "seeds per arm: " + ", ".join(f"{a} {n}" for a, n in sorted(arms.items()))


def agreement(per_seed: dict[int, dict[str, dict | None]], truth: dict[str, float], key: str, lower: bool) -> dict:
    """One proxy against the ground truth: per seed the signed Spearman ρ over the spaces that have the proxy
    and its exact permutation p; their mean ± std over seeds; the number of spaces per seed; a verdict."""
    import numpy as np

    rhos, ps, counts = [], [], []
    for runs_of in per_seed.values():
        have = [(r["summary"].get(key), truth[n]) for n, r in runs_of.items()
                if r is not None and r["summary"].get(key) is not None]
        proxy, gt = [p for p, _ in have], [t for _, t in have]
        rhos.append(spearman_agreement(proxy, gt, lower))
        ps.append(float("nan") if math.isnan(rhos[-1]) else spearman_p(proxy, gt))
        counts.append(sum(r is not None for r in runs_of.values()))
    finite = [r for r in rhos if not math.isnan(r)]
    mean = float(np.mean(finite)) if finite else float("nan")
    std = float(np.std(finite)) if len(finite) > 1 else float("nan")
    most = max(counts, default=0)
    verdict = ("not computed" if not finite else
               f"none yet: {most} spaces (ρ over fewer than {MIN_SPACES} is too coarse)" if most < MIN_SPACES else
               "predicts" if mean >= 0.7 else "weak" if mean >= 0.4 else "fails to predict")
    return {"rho_per_seed": rhos, "p_per_seed": ps, "mean": mean, "std": std, "verdict": verdict, "spaces": counts}


def write_report(out: Path, names: list[str], seeds: list[int], *, toy: bool,
                 tokenizer_of: dict[str, str] | None = None) -> Path:
    from ssr_cli.engine.atomic import write_text_atomic
    from ssr_cli.stages.diffusability import RANKED, plot_diffusability

    finetunes = None if toy else finetune_agreement()
    if not names and finetunes is None:
        raise SystemExit("study: no space has its ground truth yet; run the study first")
    gts = {n: _load(out / n / "gt" / "diffusability.json") for n in names}
    missing = [n for n, g in gts.items() if g is None]
    if missing:
        raise SystemExit(f"study: no ground truth yet for {', '.join(missing)}; run the study first")
    fids = [g["summary"].get("flow_fid") for g in gts.values()]
    truth_key = "flow_fid" if all(f is not None for f in fids) else "flow_loss_mean"
    truth = {n: g["summary"][truth_key] for n, g in gts.items()}
    per_seed = {s: {n: _load(out / n / f"seed{s}" / "diffusability.json") for n in names} for s in seeds}
    runs = [r for s in seeds for r in per_seed[s].values() if r is not None]
    rows = {key: {"label": label, "lower_is_better": lower, **agreement(per_seed, truth, key, lower),
                  "seconds": proxy_cost(runs, key)} for key, label, lower in RANKED}
    # One tokenizer's spaces alone (its degradations, its fine-tunes): what a user comparing fine-tunes of one
    # tokenizer asks. Across tokenizers the latents' dimensions and statistics differ, which moves some proxies
    # (the flow loss is per normalised latent value) independently of the samples' quality.
    tokenizer_of = tokenizer_of or {}
    groups: dict[str, list[str]] = {}
    for n in names:
        groups.setdefault(tokenizer_of.get(n, "?"), []).append(n)
    within = None
    if len(groups) > 1:
        tok, members = max(groups.items(), key=lambda kv: len(kv[1]))
        if len(members) >= 3:
            sub = {s: {n: r for n, r in runs_of.items() if n in members} for s, runs_of in per_seed.items()}
            within = {"tokenizer": tok, "spaces": members,
                      "proxies": {key: {"label": label, **agreement(sub, truth, key, lower)}
                                  for key, label, lower in RANKED}}
    first = {n: r for n, r in per_seed[seeds[0]].items() if r is not None} if names else {}
    figures = []
    if first:
        figures.append(str(plot_diffusability(first, out / "spaces.png")))
    if names:
        figures.append(str(_plot_rhos(rows, out / "report.png", within)))
    result = {"toy": toy, "ground_truth": truth_key, "truth": truth, "seeds": seeds, "proxies": rows,
              "within_one_tokenizer": within, "cifar10_finetunes": finetunes, "figures": figures}
    write_text_atomic(out / "report.json", json.dumps(_no_nan(result), indent=2))
    lines = [f"# `ssr diffusability` validation{' (TOY: plumbing only, the numbers mean nothing)' if toy else ''}",
             "", f"Generated by `python studies/diffusability/study.py{' --toy' if toy else ''} --report` from the "
             "jsons in this folder" + ("" if toy else " and the CIFAR-10 study's committed run jsons") + ".", ""]
    lines += [f"## Controlled latent spaces ({len(names)} with a ground truth so far)", ""]
    if names:
        lines += [f"Ground truth per space: `{truth_key}` of the large-budget flow-probe run (`gt/`). Agreement ρ = "
                  "Spearman rank correlation between proxy and ground truth over the spaces, signed so that +1 "
                  f"means the proxy orders the spaces as the ground truth does; mean ± std over seeds {seeds} "
                  "(a seed counts once its run exists for at least three spaces); p = the exact two-sided "
                  "permutation p-value of a seed's ρ (the ground truth is one DiT per space, so its own noise is in "
                  f"every p). Verdict, given from {MIN_SPACES} spaces on: ≥ 0.7 predicts, ≥ 0.4 weak, else fails to "
                  "predict. Cost: median wall seconds of the proxy per run on this machine's settings (`run.threads` "
                  "of the driver; the first proxy to need them also pays for encoding the latents and for the data's Inception features when they are not cached).", "",
                  "| proxy | agreement ρ (mean ± std) | per seed | p per seed | spaces per seed | verdict | cost (s) |",
                  "|---|---|---|---|---|---|---|"]
        for row in rows.values():
            cost = "—" if math.isnan(row["seconds"]) else f"{row['seconds']:.0f}"
            lines.append(f"{_agreement_cells(row)} {cost} |")
        lines += ["", f"| space | ground truth ({truth_key}) | " + " | ".join(r["label"] for r in rows.values())
                  + " |", "|---|---|" + "---|" * len(rows)]
        for n in names:
            cells = []
            for key in rows:
                v = (first.get(n) or {}).get("summary", {}).get(key)
                cells.append("—" if v is None else f"{v:.4g}")
            lines.append(f"| {n} | {truth[n]:.4g} | " + " | ".join(cells) + " |")
        if within is not None:
            lines += ["", f"### Within one tokenizer: the {len(within['spaces'])} {within['tokenizer']} spaces "
                      f"({', '.join(within['spaces'])})", "",
                      "The same agreement over one tokenizer's spaces only, the comparison a user makes between "
                      "fine-tunes of one tokenizer. Across tokenizers the latents differ in size and statistics, "
                      "which moves some proxies (the flow loss and the velocity variance are per normalised latent "
                      "value) regardless of sample quality.", "",
                      "| proxy | agreement ρ (mean ± std) | per seed | p per seed | spaces per seed | verdict |",
                      "|---|---|---|---|---|---|"]
            lines += [_agreement_cells(row) for row in within["proxies"].values()]
        if first:
            lines += ["", f"![spectra and per-t losses of the spaces (seed {seeds[0]})](spaces.png)"]
        lines += ["", "![agreement of each proxy with the ground truth](report.png)", ""]
    else:
        lines += ["None yet: run the study (`python studies/diffusability/study.py`).", ""]
    if finetunes is not None:
        runs = finetunes["runs"]
        lines += ["## The CIFAR-10 study's fine-tunes: proxies against their gFID-2K", "",
                  f"{len(runs)} runs of `studies/cifar10` (arm and seed: {', '.join(runs)}) that have both the "
                  "proxies (`ssr diffusability`, 1000-step flow probe) and the FID of 2000 samples of a DiT trained "
                  "3000 steps on their latents (against the 10000 test images). These spaces differ little "
                  "(gFID-2K from "
                  f"{min(r['gfid'] for r in runs.values()):.1f} to {max(r['gfid'] for r in runs.values()):.1f}), "
                  "so this asks whether a proxy resolves small differences. ρ signed as above; p is the "
                  f"{'exact two-sided permutation' if len(runs) <= 8 else 'two-sided (scipy, t-approximation)'} "
                  "p-value of ρ, a guide only (the runs share one pretrained start, and "
                  f"{_seed_counts(runs)}).", "",
                  "| proxy | ρ with gFID-2K | p | runs |", "|---|---|---|---|"]
        for row in finetunes["proxies"].values():
            lines.append(f"| {row['label']} | {_num(row['rho'])} | {_pval(row['p'])} | {row['runs']} |")
        lines += ["", "| run | gFID-2K | " + " | ".join(r["label"] for r in finetunes["proxies"].values()) + " |",
                  "|---|---|" + "---|" * len(finetunes["proxies"])]
        for n, r in runs.items():
            lines.append(f"| {n} | {r['gfid']:.2f} | " + " | ".join(
                "—" if r.get(k) is None else f"{r[k]:.4g}" for k in finetunes["proxies"]) + " |")
        lines.append("")
    path = out / "report.md"
    write_text_atomic(path, "\n".join(lines))
    print(f"study: report in {path}")
    return path


def _no_nan(obj):
    """NaN (no correlation computable) as JSON null."""
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: _no_nan(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_no_nan(v) for v in obj]
    return obj


def _num(value: float) -> str:
    return "—" if math.isnan(value) else f"{value:.2f}"


def _agreement_cells(row: dict) -> str:
    """A table row of one proxy's ``agreement``: ρ mean ± std, ρ and p per seed, spaces per seed, verdict."""
    per = ", ".join(_num(r) for r in row["rho_per_seed"]) or "—"
    p_per = ", ".join(_pval(r) for r in row["p_per_seed"]) or "—"
    return (f"| {row['label']} | {_num(row['mean'])} ± {_num(row['std'])} | {per} | {p_per} | "
            f"{', '.join(str(k) for k in row['spaces'])} | {row['verdict']} |")


def _pval(value: float) -> str:
    """A p-value to two significant digits (an exact p over 7 spaces can be 2/7! ≈ 0.0004)."""
    return "—" if math.isnan(value) else f"{value:.2g}"


def _plot_rhos(rows: dict, path: Path, within: dict | None = None) -> Path:
    """Horizontal bars of each proxy's agreement ρ (mean ± std over seeds): all spaces, and beside them, where
    the report has it, one tokenizer's spaces alone."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    def bars(table: dict) -> tuple[list[float], list[float]]:
        return ([0.0 if math.isnan(r["mean"]) else r["mean"] for r in table.values()],
                [0.0 if math.isnan(r["std"]) else r["std"] for r in table.values()])

    labels, y = [r["label"] for r in rows.values()], np.arange(len(rows))
    sets = [(f"all {max(next(iter(rows.values()))['spaces'], default=0)} spaces", rows)]
    if within is not None:
        sets.append((f"{within['tokenizer']} spaces only ({len(within['spaces'])})", within["proxies"]))
    height = 0.8 / len(sets)
    fig, ax = plt.subplots(figsize=(7, 3.6))
    for i, (name, table) in enumerate(sets):
        means, stds = bars(table)
        ax.barh(y - 0.4 + height * (i + 0.5), means, height, xerr=stds, color=f"C{i}", alpha=0.8, label=name)
    ax.set_yticks(y, labels, fontsize=8)
    ax.invert_yaxis()
    ax.axvline(0, color="k", lw=0.8)
    for x, style in ((0.7, "--"), (0.4, ":")):  # the verdict's thresholds: predicts, weak
        ax.axvline(x, color="0.5", lw=0.8, ls=style)
    ax.set_xlim(-1, 1)
    ax.set_xlabel("agreement ρ with the ground truth (mean ± std over seeds; dashed 0.7, dotted 0.4)")
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--toy", action="store_true", help="toy size (seconds): plumbing only")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default studies/diffusability/"
                        "results, toy: runs/dfz-toy-study)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="proxy seeds (default 0 1 2; toy 0 1)")
    parser.add_argument("--device", default=None, help="cpu, cuda or auto")
    parser.add_argument("--threads", default=None, help="run.threads for every command (auto or N; default: the "
                        "recipe's). Two drivers, one per core: `taskset -c 0 ... --threads 1` and `-c 1`")
    parser.add_argument("--spaces", nargs="+", default=None, metavar="NAME", help="run only these spaces, in this "
                        "order (default: all, the ones expected to differ most first); the report still covers every "
                        "finished space")
    parser.add_argument("--report", action="store_true", help="only write the report from finished runs")
    args = parser.parse_args(argv)
    out = args.out or (Path("runs/dfz-toy-study") if args.toy else HERE / "results")
    out.mkdir(parents=True, exist_ok=True)
    seeds = args.seeds or ([0, 1] if args.toy else [0, 1, 2])
    if args.report:
        spaces = toy_spaces(out) if args.toy else full_spaces(str(CIFAR10_RECIPE))
        write_report(out, finished_spaces(out, spaces), seeds, toy=args.toy,
                     tokenizer_of={s.name: s.tokenizer for s in spaces})
    else:
        run_study(out, toy=args.toy, seeds=seeds, device=args.device, threads=args.threads, only=args.spaces)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    raise SystemExit(main())
