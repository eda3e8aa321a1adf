"""The paper's study at a CPU scale: does SSR make CIFAR-10 latents more diffusable?

Run from the project root (every number comes from the committed ``ssr`` commands, run as child processes):

    python studies/cifar10/study.py                    # run every arm not yet finished, then write the report
    python studies/cifar10/study.py --only main        # only the four main arms (none / ssr / eq_vae / scale)
    python studies/cifar10/study.py --report           # only rewrite results/report.md from results/runs/*
    python studies/cifar10/study.py --list             # what would run, what is finished
    python studies/cifar10/study.py --toy --out /tmp/x # the same plumbing on a toy size (CI; numbers mean nothing)

On the 2-core machine run two drivers, one per core, with one thread each (two 1-thread jobs finish far sooner
than one 2-thread job shared with anything else); they share the work through lock files, each taking the next
shared step or run the other does not hold:

    taskset -c 0 python studies/cifar10/study.py --threads 1 &
    taskset -c 1 python studies/cifar10/study.py --threads 1 &

Chain per run (one arm at one seed), each step skipped when its fingerprint (arguments, recipe and input weights
by SHA-256) matches a finished one, and resumed from its checkpoints when it was interrupted:
1. ``ssr pipeline``: fine-tune from the shared pretrained KL-AE (``runs/pretrain``, made once by the same
   command with ``train.steps = 0``), reconstruction metrics on 1000 CIFAR-10 test images, ``probe-channels``
   and, for the main arms, encode-latents → train-dit → sample → generation FID of 2000 samples against the
   10000 test images;
2. ``ssr evaluate`` on Kodak-24 at 256² (reconstruction on photographs);
3. ``ssr diffusability`` (the proxy suite at its CPU budget).
The jsons each step writes are copied to ``results/runs/<run>/`` (committed); the report is built from those
copies only, so ``--report`` regenerates it on any machine.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shutil
import signal
import statistics
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from ssr_cli.engine.atomic import atomic_write
from ssr_cli.engine.lock import exclusive

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
RECIPE = HERE / "study.toml"
TAEF2 = ['tokenizer.family="taesd"', 'tokenizer.size="taef2"',
         'tokenizer.weights="../shared/data/taesd/taef2_encoder.pth"', 'regularizer.grid="8x4"']
KODAK = ['eval.images="../shared/data/kodak24"', "eval.image_size=256",
         "eval.num_images=24", "eval.batch_size=4"]

# Toy size: every stage runs, on a handful of images, in seconds each.
TOY = ["train.pretrain_steps=2", "train.steps=2", "train.ckpt_every_steps=1", "train.image_every_steps=1",
       "data.max_images=64", "latents.shard_size=32", "latents.stats_count=32", "latents.batch_size=32",
       "dit.steps=2", "dit.depth=1", "dit.hidden_size=32", "dit.num_heads=2", "dit.batch_size=8",
       "dit.ckpt_every_steps=1", "sample.num_images=8", "sample.batch_size=8", "sample.steps=2",
       "eval.num_images=8", "eval.num_reference_images=8", "eval.kid_subset_size=4", "eval.kid_subsets=2",
       "probe.score_images=8", "probe.num_images=2",
       "diffusability.num_images=8", "diffusability.num_latents=48", "diffusability.holdout=16",
       "diffusability.batch_size=16", "diffusability.probe_steps=2", "diffusability.probe_hidden=32",
       "diffusability.probe_depth=1", "diffusability.probe_batch=8", "diffusability.probe_samples=4",
       "diffusability.sample_steps=2", "diffusability.probe_ckpt_every=1"]
TOY_KODAK = ["eval.image_size=64", "eval.num_images=4"]
PRETRAIN_SECTIONS = ("run", "data", "tokenizer", "loss", "train")
"""What the shared pretraining reads (train.steps = 0: not [regularizer])."""
REFERENCE_SECTIONS = ("data", "eval")
"""What the FID reference batch reads."""
GENERATION_STAGES = ["finetune", "encode-latents", "train-dit", "sample", "evaluate", "probe-channels"]
RECON_STAGES = ["finetune", "evaluate", "probe-channels"]


def run_command(args: list[str]) -> None:
    """``ssr <args>`` in a child process from the repository root; raises CalledProcessError when it fails. (The
    tests swap in an in-process call of the same command line: a child process pays ~5 s of imports first.)"""
    subprocess.run([sys.executable, "-m", "ssr_cli", *args], check=True, cwd=ROOT)


@dataclass(frozen=True)
class Arm:
    name: str
    group: str
    """main (Table 1), basis (Table 4), setting (Table 5), taef2 (the pretrained FLUX.2 tiny AE)."""
    sets: tuple[str, ...] = ()
    seeds: tuple[int, ...] = (0,)
    gfid: bool = False
    finetune: bool = True
    """False: the starting tokenizer as it is (no fine-tuning step)."""
    base: str = "pretrain"
    """Starting weights: the shared pretrained KL-AE or the released TAEF2."""
    label: str = ""


# Seeds: recon-only and SSR (the comparison the study asks about) 3, EQ-VAE and FT-SE 2; a main arm's whole chain
# takes 50–120 minutes on one core here. A seed added to a tuple is a new run; the finished ones are kept.
ARMS: tuple[Arm, ...] = (
    Arm("none", "main", ('regularizer.kind="none"',), (0, 1, 2), True, label="recon only"),
    Arm("ssr", "main", ('regularizer.kind="ssr"',), (0, 1, 2), True, label="SSR (Fourier)"),
    Arm("eq_vae", "main", ('regularizer.kind="eq_vae"',), (0, 1), True, label="EQ-VAE"),
    Arm("scale", "main", ('regularizer.kind="scale"',), (0, 1), True, label="FT-SE"),
    Arm("pretrained", "main", (), (0,), False, finetune=False, label="pretrained, not fine-tuned"),
    Arm("ssr-legendre", "basis", ('regularizer.basis="legendre"',), label="Legendre"),
    Arm("ssr-chebyshev", "basis", ('regularizer.basis="chebyshev"',), label="Chebyshev"),
    Arm("ssr-hermite", "basis", ('regularizer.basis="hermite"',), label="Hermite"),
    Arm("ssr-random", "basis", ('regularizer.basis="random"',), label="random A"),
    Arm("ssr-alpha0.5", "setting", ("regularizer.alpha=0.5",), label="α = 0.5"),
    Arm("ssr-nocentre", "setting", ("regularizer.mean_centering=false",), label="centring off"),
    Arm("ssr-carried", "setting", ('regularizer.latent_loss="carried_mean"',), label="carried-mean latent loss"),
    Arm("ssr-blurdelta", "setting", ('regularizer.delta_source="blur_gap"',), label="Δ from the blur gap"),
    Arm("taef2", "taef2", TAEF2, finetune=False, base="taef2", label="TAEF2 as released"),
    Arm("taef2-none", "taef2", (*TAEF2, 'regularizer.kind="none"'), base="taef2", label="TAEF2 + recon only"),
    Arm("taef2-ssr", "taef2", (*TAEF2, 'regularizer.kind="ssr"'), base="taef2", label="TAEF2 + SSR"),
)


def run_name(arm: Arm, seed: int) -> str:
    return f"{arm.name}-s{seed}"


@dataclass
class RunSpec:
    """One run's commands and fingerprints (:meth:`Study.spec`)."""

    name: str
    run_dir: Path
    sets: list[str]
    only: list[str]
    inputs: dict[str, str]
    pipeline_fp: str
    tokenizer: Path | None
    kodak_sets: list[str]

    @property
    def kodak_out(self) -> Path:
        return self.run_dir / "kodak_eval.json"

    @property
    def dfz_out(self) -> Path:
        return self.run_dir / "diffusability"

    @property
    def dfz_args(self) -> list[str]:
        return ["--out", str(self.dfz_out)] + (["--weights", str(self.tokenizer)] if self.tokenizer else [])


# ------------------------------------------------------------------------------------------ running

def sha256(path: Path) -> str:
    from ssr_cli.inputs import file_sha256  # the toolkit's own (memoised) content hash

    return file_sha256(path)


@dataclass
class Study:
    out: Path
    results: Path
    toy: bool = False
    threads: str = "0"
    device: str | None = None
    log: list[str] = field(default_factory=list)
    reference_fp: str = ""
    """The FID reference step's fingerprint (set by ``reference()``)."""

    def common(self) -> list[str]:
        threads = '"auto"' if self.threads == "auto" else str(int(self.threads))
        return [f'run.out_dir="{self.out}"', f"run.threads={threads}"] + (TOY if self.toy else [])

    def ssr(self, command: str, sets: list[str], extra: list[str] = ()) -> float:
        cmd = [sys.executable, "-m", "ssr_cli", command, str(RECIPE), *extra]
        for s in self.common() + sets:
            cmd += ["--set", s]
        if self.device:
            cmd += ["--device", self.device]
        print("$ ssr " + " ".join(cmd[3:]), flush=True)
        t0 = time.perf_counter()
        run_command(cmd[3:])
        return time.perf_counter() - t0

    def fingerprint(self, args: list, inputs: dict[str, str], sections: tuple[str, ...] | None = None) -> str:
        """SHA-256 of what a step's output depends on: its arguments, the study-wide overrides, the recipe (the
        whole file, or only ``sections`` of it for the shared steps, so that changing e.g. the DiT budget does not
        redo the pretraining or the FID reference) and its inputs (name → SHA-256 of the file, or the fingerprint
        of the step that makes it)."""
        common = [s for s in self.common() if not s.startswith("run.threads=")]  # threads do not shape results
        if sections is None:
            recipe = sha256(RECIPE)
        else:
            with open(RECIPE, "rb") as f:
                table = tomllib.load(f)
            recipe = {name: table.get(name) for name in sections}
        payload = {"args": args, "common": common, "recipe": recipe, "inputs": inputs}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()

    def step(self, run_dir: Path, name: str, fp: str, action, outputs: list[Path]) -> bool:
        """Run one step unless its record says it finished with this fingerprint; returns True when it ran."""
        record_path = run_dir / "study_steps.json"
        record = json.loads(record_path.read_text()) if record_path.is_file() else {}
        done = record.get(name, {})
        if done.get("fingerprint") == fp and all(p.is_file() for p in outputs):
            return False
        t0 = time.perf_counter()
        try:
            seconds = action()
        except BaseException:  # interrupted or failed: its time counts towards the step's total when it resumes
            self._record(record_path, name, {**done, "fingerprint": None, "earlier_attempts_s": round(
                done.get("earlier_attempts_s", 0.0) + time.perf_counter() - t0, 1)})
            raise
        earlier = done.get("earlier_attempts_s", 0.0) if done.get("fingerprint") in (None, fp) else 0.0
        self._record(record_path, name, {"fingerprint": fp, "seconds": round(seconds + earlier, 1),
                                         "finished": time.strftime("%Y-%m-%d %H:%M")})
        return True

    @staticmethod
    def _record(record_path: Path, name: str, entry) -> None:
        record = json.loads(record_path.read_text()) if record_path.is_file() else {}
        record[name] = entry
        record_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = record_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(record, indent=2))
        tmp.replace(record_path)

    # -- shared inputs -----------------------------------------------------------------------------------
    def shared(self, need_reference: bool = True) -> tuple[Path, Path]:
        """The pretrained tokenizer and the FID reference. Two drivers started together (one per core) split
        them: each first takes the step nobody holds (a lock file per step), then waits for the other's. Without
        ``need_reference`` (no planned run measures gFID) the reference is not made; only its fingerprint, which
        every run's fingerprint includes, is computed."""
        makers = {"pretrain": self.pretrained, "reference": self.reference}
        self.reference_fp = self.fingerprint(["make-ref"], {}, sections=REFERENCE_SECTIONS)
        if not need_reference:
            makers = {"pretrain": self.pretrained}
        made: dict[str, Path] = {}
        for blocking in (False, True):
            for name in [n for n in makers if n not in made]:
                with exclusive(self.out / f".{name}.lock", blocking=blocking) as held:
                    if held:
                        made[name] = makers[name]()
        return made["pretrain"], made.get("reference", self.out / "ref_test.npz")

    def pretrained(self) -> Path:
        """``runs/pretrain/tokenizer.safetensors``. The driver commits a copy (``results/shared/``, 4 MB) with the
        step's record, so a later session on a fresh checkout starts every arm from the same bytes instead of
        pretraining again; the copy is used only when its recorded fingerprint is today's."""
        run_dir = self.out / "pretrain"
        weights = run_dir / "tokenizer.safetensors"
        sets = ['run.name="pretrain"', 'regularizer.kind="none"', "train.steps=0"]
        fp = self.fingerprint(sets, {}, sections=PRETRAIN_SECTIONS)
        kept = self.results / "shared" / "pretrain_tokenizer.safetensors"
        kept_record = _load(self.results / "runs" / "pretrain" / "steps.json") or {}
        if not weights.is_file() and kept.is_file() and kept_record.get("pretrain", {}).get("fingerprint") == fp:
            weights.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(kept, weights)
            self._record(run_dir / "study_steps.json", "pretrain", kept_record["pretrain"])
            print(f"study: pretrain: the committed copy {kept} (same fingerprint)", flush=True)
        self.step(run_dir, "pretrain", fp, lambda: self.ssr("finetune", sets), [weights])
        if not kept.is_file() or sha256(kept) != sha256(weights):
            kept.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(weights, kept)
        self.collect(run_dir, "pretrain")
        return weights

    def reference(self) -> Path:
        ref = self.out / "ref_test.npz"
        self.reference_fp = self.fingerprint(["make-ref"], {}, sections=REFERENCE_SECTIONS)
        self.step(self.out, "reference", self.reference_fp,
                  lambda: self.ssr("evaluate", ['run.name="reference"'], ["--make-ref", str(ref)]), [ref])
        return ref

    # -- one run -------------------------------------------------------------------------------------------
    def spec(self, arm: Arm, seed: int, pretrained: Path, reference: Path) -> RunSpec:
        """What one arm at one seed runs, and the fingerprints of its three steps (the pipeline, Kodak, the
        diffusability suite). Needs ``reference_fp`` (set by :meth:`shared`), not the reference file."""
        name = run_name(arm, seed)
        sets = [f'run.name="{name}"', f"run.seed={seed}", *arm.sets]
        inputs = {"reference": self.reference_fp}
        if arm.base == "pretrain":
            sets += [f'tokenizer.weights="{pretrained}"']
            inputs["pretrained"] = sha256(pretrained)
        sets += ["train.pretrain_steps=0", f'eval.reference="{reference}"']
        if not arm.gfid:
            sets += ["eval.generation=false"]
        stages = GENERATION_STAGES if arm.gfid else RECON_STAGES
        if not arm.finetune:
            stages = [s for s in stages if s != "finetune"]
        only = sum((["--only", s] for s in stages), [])
        run_dir = self.out / name
        return RunSpec(name=name, run_dir=run_dir, sets=sets, only=only, inputs=inputs,
                       pipeline_fp=self.fingerprint(sets + only, inputs),
                       tokenizer=run_dir / "tokenizer.safetensors" if arm.finetune else None,
                       kodak_sets=sets + KODAK + (TOY_KODAK if self.toy else []))

    def later_fps(self, spec: RunSpec, tokenizer_sha: str | None) -> dict[str, str]:
        """The Kodak and diffusability steps' fingerprints: they read the fine-tuned tokenizer (its SHA-256)."""
        weights = ({"tokenizer": tokenizer_sha} if spec.tokenizer
                   else {k: v for k, v in spec.inputs.items() if k != "reference"})
        return {"kodak": self.fingerprint(spec.kodak_sets, weights),
                "diffusability": self.fingerprint(spec.sets + spec.dfz_args, weights)}

    def finished_earlier(self, spec: RunSpec) -> bool:
        """The committed record (``results/runs/<run>/steps.json``) has this run's fingerprints and this
        checkout has no run folder of it: an earlier session finished it."""
        committed = _load(self.results / "runs" / spec.name / "steps.json") or {}
        if committed.get("pipeline", {}).get("fingerprint") != spec.pipeline_fp or spec.run_dir.is_dir():
            return False
        expect = {"pipeline": spec.pipeline_fp, **self.later_fps(spec, committed.get("tokenizer_sha256"))}
        return all(committed.get(k, {}).get("fingerprint") == v for k, v in expect.items())

    def finished(self, spec: RunSpec) -> bool:
        """Finished in an earlier session, or here: the run folder records all three steps with these
        fingerprints and their outputs exist."""
        if self.finished_earlier(spec):
            return True
        record = _load(spec.run_dir / "study_steps.json") or {}
        if record.get("pipeline", {}).get("fingerprint") != spec.pipeline_fp:
            return False
        fps = self.later_fps(spec, record.get("tokenizer_sha256"))
        outputs = [spec.run_dir / "eval.json", spec.kodak_out, spec.dfz_out / "diffusability.json"]
        return (all(record.get(k, {}).get("fingerprint") == v for k, v in fps.items())
                and all(p.is_file() for p in outputs))

    def run(self, arm: Arm, seed: int, pretrained: Path, reference: Path) -> bool:
        """One arm at one seed. Skipped when its committed record (``results/runs/<run>/steps.json``) has this
        run's fingerprints, so a fresh checkout does not redo what an earlier session finished. The reference
        enters the fingerprints as the fingerprint of the step that makes it (a remade reference can differ in
        the last bits; its SHA-256 is in each eval.json's protocol record)."""
        spec = self.spec(arm, seed, pretrained, reference)
        name, run_dir, sets, tokenizer = spec.name, spec.run_dir, spec.sets, spec.tokenizer
        if self.finished_earlier(spec):
            print(f"study: {name}: finished in an earlier session (results/runs/{name}, same fingerprints)",
                  flush=True)
            return False
        ran = self.step(run_dir, "pipeline", spec.pipeline_fp, lambda: self.ssr("pipeline", sets, spec.only),
                        [run_dir / "eval.json"])
        tokenizer_sha = sha256(tokenizer) if tokenizer else None
        if tokenizer_sha:
            self._record(run_dir / "study_steps.json", "tokenizer_sha256", tokenizer_sha)
        fps = self.later_fps(spec, tokenizer_sha)
        ran |= self.step(run_dir, "kodak", fps["kodak"],
                         lambda: self.ssr("evaluate", spec.kodak_sets, ["--no-gfid", "--out", str(spec.kodak_out)]),
                         [spec.kodak_out])
        ran |= self.step(run_dir, "diffusability", fps["diffusability"],
                         lambda: self.ssr("diffusability", sets, spec.dfz_args), [spec.dfz_out / "diffusability.json"])
        self.collect(run_dir, name)
        return ran

    def collect(self, run_dir: Path, name: str) -> None:
        """Copy the run's small jsons (and its steps record with timings) to results/runs/<name>/."""
        dest = self.results / "runs" / name
        dest.mkdir(parents=True, exist_ok=True)
        for src, dst in (("eval.json", "eval.json"), ("kodak_eval.json", "kodak_eval.json"),
                         ("probe/probe.json", "probe.json"), ("diffusability/diffusability.json", "diffusability.json"),
                         ("summary.json", "summary.json"), ("study_steps.json", "steps.json")):
            if (run_dir / src).is_file():
                shutil.copyfile(run_dir / src, dest / dst)


def plan(only: list[str] | None, toy: bool, seeds: list[int] | None = None) -> list[tuple[Arm, int]]:
    """The runs in order. ``only`` holds groups, arm names or run names (``eq_vae-s0``: that arm at that seed);
    a name that is none of these is an error, so a typo does not silently plan nothing."""
    runs = {run_name(a, s) for a in ARMS for s in a.seeds}
    known = {a.group for a in ARMS} | {a.name for a in ARMS} | runs
    unknown = [n for n in only or [] if n not in known]
    if unknown:
        raise SystemExit(f"study: --only {' '.join(unknown)}: not a group, arm or run; groups: "
                         f"{' '.join(dict.fromkeys(a.group for a in ARMS))}; arms: {' '.join(a.name for a in ARMS)}; "
                         "runs are <arm>-s<seed> (see --list)")
    picked = set(only or [])
    arms = [a for a in ARMS if not only or a.group in picked or a.name in picked
            or any(run_name(a, s) in picked for s in a.seeds)]
    if toy:
        arms = [a for a in arms if a.group == "main"]
    order = []
    # every arm's first seed first, so a complete first comparison exists before the second seeds run
    for rank in range(max(len(a.seeds) for a in arms) if arms else 0):
        for group in ("main", "basis", "setting", "taef2"):
            order += [(a, a.seeds[rank]) for a in arms if a.group == group and rank < len(a.seeds)]
    if toy:
        order = [(a, s) for a, s in order if s == 0]
    if seeds is not None:
        order = [(a, s) for a, s in order if s in seeds]
    if only:  # an arm named by run name runs only at that seed
        order = [(a, s) for a, s in order if a.group in picked or a.name in picked or run_name(a, s) in picked]
    return order


def run_study(study: Study, only: list[str] | None, keep_going: bool, seeds: list[int] | None = None,
              shared_only: bool = False) -> list[str]:
    study.out.mkdir(parents=True, exist_ok=True)
    order = plan(only, study.toy, seeds)
    # The FID reference (about 47 minutes on one core) only when a run still to do measures gFID: re-running
    # the finished study on a fresh checkout does nothing.
    pretrained, reference = study.shared(need_reference=False)
    if shared_only or any(arm.gfid and not study.finished(study.spec(arm, seed, pretrained, reference))
                          for arm, seed in order):
        pretrained, reference = study.shared(need_reference=True)
    if (study.out / "study_steps.json").is_file():
        shutil.copyfile(study.out / "study_steps.json", study.results / "runs" / "shared_steps.json")
    if shared_only:
        return []
    failed, ran_any = [], False
    for arm, seed in order:
        name = run_name(arm, seed)
        try:
            with exclusive(study.out / f".{name}.lock", blocking=False) as held:
                if not held:  # a second driver (the other core) has it: take the next run
                    print(f"study: {name}: another driver is running it; next", flush=True)
                    continue
                ran = study.run(arm, seed, pretrained, reference)
        except subprocess.CalledProcessError as err:
            failed.append(f"{name}: `{' '.join(err.cmd[3:6])} …` exited {err.returncode}")
            print(f"study: {failed[-1]}", flush=True)
            if not keep_going:
                raise SystemExit(f"study: stopped at {name} (rerun to retry; --keep-going runs the other arms)")
            continue
        ran_any |= ran
        print(f"study: {name}: {'done' if ran else 'finished, skipped'}", flush=True)
    if not order:
        print("study: no run matches --only/--seeds; nothing to do (see --list)", flush=True)
    elif not ran_any and not failed:
        print("study: every run is already finished; nothing to do", flush=True)
    return failed


# ------------------------------------------------------------------------------------------ report

def _load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _get(d: dict | None, *keys):
    for k in keys:
        if not isinstance(d, dict):
            return None
        d = d.get(k)
    return d if isinstance(d, (int, float)) and not isinstance(d, bool) else None


MEASURES = (  # key, label, lower is better, where
    ("psnr", "PSNR (dB)", False, ("eval", "reconstruction", "psnr")),
    ("ssim", "SSIM", False, ("eval", "reconstruction", "ssim")),
    ("lpips", "LPIPS", True, ("eval", "reconstruction", "lpips")),
    ("rfid", "rFID-1K", True, ("eval", "reconstruction", "rfid")),
    ("kodak_psnr", "Kodak PSNR (dB)", False, ("kodak", "reconstruction", "psnr")),
    ("gfid", "gFID-2K", True, ("eval", "generation", "fid")),
    ("psnr_half", "PSNR, ½ of the channels (dB)", False, ("probe", "psnr_half")),
    ("freq_rho", "freq.-order ρ", False, ("probe", "frequency_order_spearman")),
    ("dyn_err", "Ā error", True, ("probe", "dynamics_error")),
    ("dyn_ratio", "Ā error ÷ no change", True, ("probe", "dynamics_error_ratio")),
    ("flow_loss", "flow-probe loss", True, ("dfz", "flow_loss_mean")),
    ("flow_fid", "flow-probe FID", True, ("dfz", "flow_fid")),
    ("ifid", "iFID", True, ("dfz", "ifid")),
    ("hf", "latent HF energy", True, ("dfz", "latent_hf_fraction")),
)
PAPER = {"none": {"psnr": 31.70, "ssim": 0.9105, "lpips": 0.0354, "rfid": 0.87, "gfid": 16.08},
         "eq_vae": {"psnr": 31.53, "ssim": 0.9082, "lpips": 0.0373, "rfid": 0.94, "gfid": 13.95},
         "scale": {"psnr": 31.62, "ssim": 0.9096, "lpips": 0.0363, "rfid": 0.90, "gfid": 13.87},
         "ssr": {"psnr": 31.55, "ssim": 0.9085, "lpips": 0.0374, "rfid": 0.91, "gfid": 13.33}}
PAPER_BASIS = {"ssr": 13.33, "ssr-legendre": 14.75, "ssr-chebyshev": 15.37, "ssr-hermite": 15.20,
               "ssr-random": "does not converge", "ssr-nocentre": 17.23}


def measures(results: Path, name: str) -> dict:
    base = results / "runs" / name
    files = {"eval": _load(base / "eval.json"), "kodak": _load(base / "kodak_eval.json"),
             "probe": _load(base / "probe.json"), "dfz": _load(base / "diffusability.json")}
    if files["dfz"] is not None:
        flat: dict = {}
        for value in files["dfz"].get("proxies", {}).values():
            if isinstance(value, dict):
                flat.update(value)
        files["dfz"] = flat
    probe = files["probe"]
    if probe is not None:  # the learned Ā against predicting "the blurred latent is the latent" (below 1: better)
        err, still = _get(probe, "dynamics_error"), _get(probe, "dynamics_error_no_change")
        probe["dynamics_error_ratio"] = err / still if err is not None and still else None
    out = {key: _get(files[where[0]], *where[1:]) for key, _, _, where in MEASURES}
    out["psnr_vs_k"] = (files["probe"] or {}).get("psnr_vs_k")
    steps = _load(base / "steps.json") or {}
    out["seconds"] = {k: v.get("seconds") for k, v in steps.items() if isinstance(v, dict)}
    stages = (_load(base / "summary.json") or {}).get("stages") or {}
    out["stage_seconds"] = {k: sec for k, v in stages.items() if (sec := _stage_seconds(v)) is not None}
    return out


def _stage_seconds(text) -> float | None:
    """Seconds of a stage as ``ssr pipeline``'s summary records it ("638.6 s"); None for "skipped (complete)"."""
    if not isinstance(text, str) or not text.endswith(" s"):
        return None
    try:
        return float(text.removesuffix(" s"))
    except ValueError:
        return None


def _mean_std(values: list[float]) -> tuple[float, float, int]:
    vals = [v for v in values if v is not None]
    if not vals:
        return math.nan, math.nan, 0
    return statistics.mean(vals), (statistics.stdev(vals) if len(vals) > 1 else math.nan), len(vals)


def _fmt(mean: float, std: float, n: int, digits: int = 3) -> str:
    if n == 0 or math.isnan(mean):
        return "—"
    text = f"{mean:.{digits}f}"
    return text + (f" ± {std:.{digits}f}" if n > 1 else "") + (f" ({n})" if n > 1 else "")


def _paired(rows: dict, arm: Arm, key: str) -> list[float]:
    """``arm`` − recon-only in ``key``, one value per seed where both runs have it (same seed, same start)."""
    pairs = [(rows.get((arm.name, s), {}).get(key), rows.get(("none", s), {}).get(key)) for s in arm.seeds]
    return [a - b for a, b in pairs if a is not None and b is not None]


def _t_interval(values: list[float], level: float = 0.95) -> tuple[float, float]:
    """Two-sided Student-t interval for the mean of ``values`` (n − 1 degrees of freedom); NaNs below 2 values."""
    from scipy import stats

    m, sd, n = _mean_std(values)
    if n < 2:
        return math.nan, math.nan
    half = float(stats.t.ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n)
    return m - half, m + half


def _verdict(what: str, diffs: list[float], lower: bool) -> str:
    """One paired comparison in words: the mean difference, each seed's, and a two-sided 95 % Student-t interval
    over the seeds (n − 1 degrees of freedom: with 2 seeds the interval is ±12.7 standard errors, with 3 ±4.3), so
    that a difference is called only when that interval excludes zero."""
    m, _, n = _mean_std(diffs)
    each = ", ".join(f"{d:+.3g}" for d in diffs)
    if n < 2:
        return f"{what}: {m:+.3g} (one seed: no interval; not a result on its own)."
    lo, hi = _t_interval(diffs)
    agree = sum((d > 0) == (m > 0) for d in diffs)
    text = (f"{what}: {m:+.3g} (seeds: {each}; same sign in {agree} of {n}), 95 % t-interval "
            f"[{lo:+.3g}, {hi:+.3g}] over {n} seeds")
    if lo > 0 or hi < 0:
        return text + f": {'better' if (m < 0) == lower else 'worse'}, the interval excludes 0."
    return text + ": the interval includes 0, not distinguishable from no difference at this number of seeds."


def _digits(key: str) -> int:
    return 2 if key in ("psnr", "kodak_psnr", "psnr_half", "gfid", "rfid", "flow_fid", "ifid") else 3


def write_report(results: Path, toy: bool = False) -> Path:
    rows = {(a.name, s): measures(results, run_name(a, s)) for a in ARMS for s in a.seeds
            if (results / "runs" / run_name(a, s)).is_dir()}
    pending = [run_name(a, s) for a in ARMS for s in a.seeds
               if not (results / "runs" / run_name(a, s) / "diffusability.json").is_file()]
    keys = [m for m in MEASURES]
    lines = [f"# CIFAR-10 study: does SSR make latents more diffusable?{' (TOY: plumbing only)' if toy else ''}", "",
             "Generated by `python studies/cifar10/study.py --report` from the jsons in `results/runs/` (each copied "
             "there by the driver from a run of the committed commands). Recipe: `studies/cifar10/study.toml`. "
             "Cells: mean ± sample std over seeds (number of seeds); one value = one seed.", ""]
    if pending:
        lines += [f"**Status: {len(pending)} of {sum(len(a.seeds) for a in ARMS)} runs not finished yet** "
                  f"({', '.join(pending)}); rerun the driver to continue. Tables show what has finished.", ""]
    # Table 1
    lines += ["## Main arms (Table 1 at CIFAR-10 scale)", "",
              "| arm | " + " | ".join(label for _, label, _, _ in keys) + " |",
              "|---|" + "---|" * len(keys)]
    for arm in (a for a in ARMS if a.group == "main"):
        cells = []
        for key, _, _, _ in keys:
            cells.append(_fmt(*_mean_std([rows.get((arm.name, s), {}).get(key) for s in arm.seeds]), _digits(key)))
        lines.append(f"| {arm.label} | " + " | ".join(cells) + " |")
    lines += ["", "The paper's Flux numbers (ImageNet 256², DiT-B/2 80K steps, 50K samples; a different scale, for "
              "reference only): " + "; ".join(f"{k}: PSNR {v['psnr']}, LPIPS {v['lpips']}, rFID {v['rfid']}, "
                                              f"gFID {v['gfid']}" for k, v in PAPER.items()) + ".", ""]
    # paired differences
    lines += ["## Paired differences against recon-only (same seed, same pretrained start)", "",
              "| arm − none | " + " | ".join(label for _, label, _, _ in keys) + " |", "|---|" + "---|" * len(keys)]
    verdicts = []
    for arm in (a for a in ARMS if a.group == "main" and a.name not in ("none", "pretrained")):
        cells = []
        for key, label, lower, _ in keys:
            diffs = _paired(rows, arm, key)
            m, sd, n = _mean_std(diffs)
            cells.append(_fmt(m, sd, n, _digits(key)))
            if key in ("gfid", "flow_loss", "dyn_err", "dyn_ratio", "psnr") and n:
                verdicts.append(_verdict(f"{arm.label} vs recon only, {label}", diffs, lower))
        lines.append(f"| {arm.label} | " + " | ".join(cells) + " |")
    # ablations
    for group, title in (("basis", "Basis (Table 4 at CIFAR-10 scale; seed 0, Fourier = the ssr arm)"),
                         ("setting", "Settings (Table 5-like; seed 0)"), ("taef2", "TAEF2 (4×4×32 latents at 32²: ½ of the channels is 16 of 32; the KL-AE's 8 of 16)")):
        members = ([next(a for a in ARMS if a.name == "ssr")] if group != "taef2" else []) + \
                  [a for a in ARMS if a.group == group]
        cols = [m for m in keys if m[0] != "gfid"]
        lines += ["", f"## {title}", "", "| arm | " + " | ".join(label for _, label, _, _ in cols) +
                  (" | paper gFID |" if group != "taef2" else " |"), "|---|" + "---|" * (len(cols) + (group != "taef2"))]
        for arm in members:
            r = rows.get((arm.name, 0), {})
            cells = [_fmt(r.get(k) if r.get(k) is not None else math.nan, math.nan, 1 if r.get(k) is not None else 0,
                          _digits(k)) for k, _, _, _ in cols]
            paper = PAPER_BASIS.get(arm.name, "—") if group != "taef2" else None
            lines.append(f"| {arm.label} | " + " | ".join(cells) + (f" | {paper} |" if paper is not None else " |"))
    # timing
    lines += ["", "## Time per step on this machine (seconds, mean over the runs that did it; interrupted attempts "
              "included, on a 2-core CPU shared with other work at times)", "",
              "| step | runs | mean s |", "|---|---|---|"]
    per_step: dict[str, list[float]] = {}
    for r in rows.values():
        for k, v in r["seconds"].items():
            if v is not None:
                per_step.setdefault(k, []).append(v)
    for k, v in per_step.items():
        lines.append(f"| {k} | {len(v)} | {statistics.mean(v):.0f} |")
    shared = {**(_load(results / "runs" / "pretrain" / "steps.json") or {}),
              **(_load(results / "runs" / "shared_steps.json") or {})}
    for k, v in shared.items():
        lines.append(f"| {k} (shared, once) | 1 | {v.get('seconds') or 0:.0f} |")
    # the pipeline's stages, per tokenizer (each run's summary.json; a stage finished in an earlier attempt is
    # "skipped" there and left out, a resumed one counts only its remainder: the median is the typical whole stage)
    per_stage: dict[tuple[str, str], list[float]] = {}
    gfid_arms = {a.name for a in ARMS if a.gfid}
    for (arm_name, _), r in rows.items():
        family = ("TAEF2" if arm_name.startswith("taef2") else
                  "KL-AE, main arms (evaluate includes gFID)" if arm_name in gfid_arms else "KL-AE, no DiT")
        for stage, sec in (r.get("stage_seconds") or {}).items():
            per_stage.setdefault((family, stage), []).append(sec)
    if per_stage:
        lines += ["", "Within the pipeline step, per stage (seconds; median and range over the runs whose "
                  "`summary.json` records the stage as run; one core each, two runs side by side at times):", "",
                  "| tokenizer | stage | runs | median s | range s |", "|---|---|---|---|---|"]
        order = {stage: i for i, stage in enumerate(GENERATION_STAGES)}
        for (family, stage), v in sorted(per_stage.items(), key=lambda kv: (kv[0][0], order.get(kv[0][1], 99))):
            lines.append(f"| {family} | {stage} | {len(v)} | {statistics.median(v):.0f} | "
                         f"{min(v):.0f}–{max(v):.0f} |")
    figure = plot_psnr_vs_k(rows, results / "psnr_vs_k.png")
    if figure:
        lines += ["", "![PSNR vs number of channels kept (unmasking curve), seed 0](psnr_vs_k.png)"]
    if plot_gfid(rows, results / "gfid.png"):
        lines += ["", "![gFID-2K of the main arms, each seed, and the paired difference against recon-only with its "
                  "95 % t-interval](gfid.png)"]
    lines += ["", "## What the data show", ""]
    lines += [f"- {v}" for v in verdicts] or ["- Nothing yet: no main-arm pair has finished."]
    if not any(rows.get((a, s), {}).get("gfid") is not None for a in ("none", "ssr") for s in (0, 1)):
        lines.append("- No generation FID has finished yet, so nothing here says whether SSR improves generation.")
    lines += ["- Scale caveats: a 1M-parameter KL-AE pretrained for 2000 steps, fine-tuned 600 steps, DiTs of "
              "3000 steps and FID of 2000 samples (biased upward against 50K-sample FIDs; comparable between arms "
              "of this table only)."]
    (results / "report.json").write_text(json.dumps(
        {"rows": {f"{a}-s{s}": v for (a, s), v in rows.items()}, "pending": pending, "verdicts": verdicts},
        indent=2, default=lambda x: None))
    path = results / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def plot_gfid(rows: dict, path: Path) -> Path | None:
    """Left: gFID-2K of each main arm, one dot per seed and a bar at the mean. Right: the paired difference
    against recon-only (same seed), one dot per seed, the mean and its 95 % t-interval."""
    arms = [a for a in ARMS if a.group == "main" and a.gfid]
    per_arm = {a.name: {s: rows.get((a.name, s), {}).get("gfid") for s in a.seeds} for a in arms}
    if not any(v is not None for seeds in per_arm.values() for v in seeds.values()):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.6))
    for i, arm in enumerate(arms):
        vals = [v for v in per_arm[arm.name].values() if v is not None]
        if vals:
            left.bar(i, statistics.mean(vals), color="C%d" % i, alpha=0.35, width=0.6)
            left.plot([i] * len(vals), vals, "o", color="C%d" % i, ms=4)
    left.set_xticks(range(len(arms)), [a.label for a in arms], rotation=15, fontsize=8)
    left.set_ylabel("gFID-2K (lower is better)")
    low = min(v for s in per_arm.values() for v in s.values() if v is not None)
    left.set_ylim(bottom=max(0.0, low - 10))
    left.grid(axis="y", alpha=0.3)
    others = [a for a in arms if a.name != "none"]
    for i, arm in enumerate(others, start=1):
        diffs = _paired(rows, arm, "gfid")
        if not diffs:
            continue
        right.plot([i] * len(diffs), diffs, "o", color="C%d" % i, ms=4, alpha=0.6)
        m = statistics.mean(diffs)
        lo, hi = _t_interval(diffs)
        if not math.isnan(lo):
            right.errorbar(i + 0.15, m, yerr=[[m - lo], [hi - m]], fmt="s", color="C%d" % i, capsize=4, ms=5)
        else:
            right.plot(i + 0.15, m, "s", color="C%d" % i, ms=5)
    right.axhline(0.0, color="k", lw=0.8)
    right.set_xticks(range(1, len(others) + 1), [a.label for a in others], rotation=15, fontsize=8)
    right.set_ylabel("Δ gFID-2K vs recon only (same seed)")
    right.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)
    return path


def plot_psnr_vs_k(rows: dict, path: Path) -> Path | None:
    curves = {a: r["psnr_vs_k"] for (a, s), r in rows.items() if s == 0 and r.get("psnr_vs_k")}
    if not curves:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name, curve in curves.items():
        style = "-" if name in ("none", "ssr", "eq_vae", "scale") else ":"
        ax.plot(range(1, len(curve) + 1), curve, style, marker=".", label=name)
    ax.set_xlabel("channels kept, lowest frequency first (k)")
    ax.set_ylabel("PSNR (dB)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=None, help="run folders (default studies/cifar10/runs)")
    p.add_argument("--results", type=Path, default=None, help="jsons + report (default studies/cifar10/results; "
                   "with --toy: <out>/results)")
    p.add_argument("--only", nargs="+", default=None, help="groups (main basis setting taef2), arm names (eq_vae) "
                   "or run names (eq_vae-s0)")
    p.add_argument("--seeds", nargs="+", type=int, default=None, help="only these seeds (default: every arm's)")
    p.add_argument("--shared-only", action="store_true", help="only the shared steps (pretrain, FID reference)")
    p.add_argument("--threads", default="0", help="run.threads for every command (0, auto or N)")
    p.add_argument("--device", default=None, help="cpu, cuda or auto")
    p.add_argument("--toy", action="store_true", help="toy size: main arms, seed 0, seconds per stage")
    p.add_argument("--keep-going", action="store_true", help="a failing run is recorded and the next one runs")
    p.add_argument("--report", action="store_true", help="only rewrite the report from results/runs/")
    p.add_argument("--list", action="store_true", help="print the runs in order and which are finished")
    args = p.parse_args(argv)
    out = (args.out or HERE / "runs").resolve()
    results = (args.results or (out / "results" if args.toy else HERE / "results")).resolve()
    results.mkdir(parents=True, exist_ok=True)
    if args.list:
        for arm, seed in plan(args.only, args.toy, args.seeds):
            name = run_name(arm, seed)
            state = "finished" if (results / "runs" / name / "diffusability.json").is_file() else "to run"
            print(f"{name:20s} {arm.group:8s} {'gFID' if arm.gfid else '    '} {state}")
        return 0
    failed = []
    if not args.report:
        study = Study(out=out, results=results, toy=args.toy, threads=args.threads, device=args.device)
        failed = run_study(study, args.only, args.keep_going, args.seeds, args.shared_only)
    path = write_report(results, toy=args.toy)
    print(f"study: report in {path}")
    if failed:
        print("study: failed runs: " + "; ".join(failed))
        return 1
    return 0


if __name__ == "__main__":
    # SIGTERM (a scheduler, the end of a session) unwinds like Ctrl-C, so the step's time so far is recorded.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    raise SystemExit(main())
