"""One command for ten minutes on a GPU: model and loop speed, skipping, and ConvNet-AIG 110 against
ResNet-110 trained on CIFAR-10, each section within its own time budget.

    python -m bench.device_check --prepare     # here: fill .data/ and .whl/, check the size
    python -m bench.device_check               # there: every section in one 10-minute call
    python -m bench.device_check --sections cifar10 --full-recipe --models aig110  # segment 1
    python -m bench.device_check --sections cifar10 --resume .resume   # every later segment
    python -m bench.device_check --smoke       # any CPU: every section at tiny sizes

Each section runs in a process of its own until its budget (``--budget NAME=SECONDS``) or the
call's (``--total``) runs out; one that overruns is cut, reported as cut, and the next starts.
The CIFAR-10 section stops training in time by itself (``train.py``'s loop saves a checkpoint on
SIGTERM), packs each run into one ``<run>.tar.gz`` that ``--resume`` continues, and evaluates
with ``eval.py``. One JSON and the printed table go to ``$OUT`` when set, else bench/results/.
"""

from __future__ import annotations

import argparse
import importlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared/data/cifar10"
DATA = REPO / ".data"  # what a call carries: the JPEG archives, and the commit noted here
WORK = Path(os.environ.get("AIG_DEVICE_CHECK_WORK") or REPO / ".device_check")  # never carried
DECODED, CACHE = WORK / "cifar10", WORK / "jax_cache"  # the decoded shards, compiled programs
LIMIT_MIB = 64  # what one call may carry: the files git tracks or does not ignore, and `carry`
WHEELS = ("ml-collections==1.1.0", "grain==0.2.18", "array-record==0.8.6", "portpicker==1.6.0")
#: Budget and estimate (s) of each section on an H100-class GPU with cold compiles, sized from
#: the dev-measured H100 figures of bench/README.md (the model core before its rewrite):
#: speed: AIG-50 train compiles 27 s gated + 7 s ungated, AIG-110 52 + ~25 s, inference
#:   compiles ~1/3 of those (37 s), 88 timed steps < 6 s, the reference's 48 steps at ~1,850
#:   img/s 7 s, start-up 10 s: 150 s. loop: AIG-110 train step 52 s and eval step ~8 s cold,
#:   100 steps at 55% of 7,170 img/s 6.5 s, start-up and checkpoint ~10 s: 75 s. skipping:
#:   six AIG-110 eval steps (masked, cond, Pallas; batch 1 and 256) at ~8 s: 50 s. export: AIG-110
#:   exported for three platforms (seconds), five batch-1 compiles at ~8 s (calibration, the two
#:   exported programs, the in-package cond and masked steps), 800 timed calls: 50 s.
#:   cifar10: the rest of --total (540 s, leaving a 600 s call 60 s for wheels and data).
BUDGETS = {"speed": (170, 150), "loop": (85, 75), "skipping": (70, 50), "export": (65, 50),
           "cifar10": (None, 200)}  # fmt: skip
#: Fixed cost (s) of the CIFAR-10 section: start-up and data, two cold train-step compiles
#: (52 + 25 s), the final in-loop evaluations, eval.py (restore, calibration, four gate modes).
CIFAR_OVERHEAD_S = 15 + 77 + 16 + 60
#: Loop images/s of each run where this call measured none: the H100 bare step × 0.55.
CIFAR_IMG_S = {"aig110": 7170 * 0.55, "resnet110": 8900 * 0.55}
RUNS = {"aig110": "configs.cifar10_resnet110_aig", "resnet110": "configs.cifar10_resnet110"}
SIZES: dict[str, dict[str, Any]] = {  # bench.speed's setting; the CIFAR model, batch, dtype
    "full": {"speed": ["--dtype=bfloat16"], "cifar": "resnet110_cifar", "batch": 256,
             "dtype": "bfloat16", "eval": []},
    "smoke": {"speed": ["--tiny"], "cifar": "resnet8_cifar", "batch": 32, "dtype": "float32",
              "eval": ["--limit=64", "--calibration_limit=64"]},
}  # fmt: skip


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse the flags; prepare, run one section (as a child) or run them all."""
    p = argparse.ArgumentParser("python -m bench.device_check", description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny sizes, for a CPU")
    p.add_argument("--sections", nargs="+", choices=list(BUDGETS), default=list(BUDGETS))
    p.add_argument("--budget", nargs="+", default=[], metavar="NAME=S", help="section budgets")
    p.add_argument("--total", type=float, default=540.0, help="seconds for the whole call")
    p.add_argument("--epochs", type=int, help="CIFAR-10 epochs (default: what the budget allows)")
    p.add_argument("--full-recipe", action="store_true", help="349 epochs, ×0.1 after 149, 249")
    p.add_argument("--models", nargs="+", choices=list(RUNS), default=list(RUNS))
    p.add_argument("--resume", help="a folder of packed runs (*.tar.gz) to continue")
    p.add_argument("--prepare", action="store_true", help="fill .data/, .whl/; check the size")
    p.add_argument("--segment", action="store_true", help="with --prepare: no test data")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    p.add_argument("--measured", default="{}", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    out = Path(os.environ.get("OUT") or REPO / "bench/results")
    if args.prepare:
        return prepare(args.segment)
    if args.child:
        return child(args, out)
    return run_all(args, list(sys.argv[1:] if argv is None else argv), out)


def carried_mib() -> float | None:
    """MiB a call would carry: the files git tracks or does not ignore, and .whl/, .data/ and
    .resume/ (None where there is no git: there, the copy has arrived)."""
    try:
        ls = ["git", "ls-files", "-zco", "--exclude-standard"]
        files = subprocess.run(ls, cwd=REPO, capture_output=True, check=True).stdout.split(b"\0")
    except (OSError, subprocess.CalledProcessError):
        return None
    paths = [REPO / f.decode() for f in files if f]
    for name in (".whl", ".data", ".resume"):
        paths += [Path(r) / f for r, _, fs in os.walk(REPO / name) for f in fs]
    return sum(p.stat().st_size for p in paths if p.is_file()) / 2**20


def commit() -> str:
    """This checkout's commit (``+dirty`` with changes), else the one --prepare noted."""
    git = ["git", "describe", "--always", "--dirty", "--abbrev=12"]
    try:
        sha = subprocess.run(git, cwd=REPO, capture_output=True, text=True).stdout.strip()
    except OSError:
        sha = ""
    note = DATA / "COMMIT"
    return sha or (note.read_text().strip() if note.exists() else "unknown")


def prepare(segment: bool) -> dict[str, Any]:
    """Copy the CIFAR-10 JPEG archives (for a ``segment``, the training one only) to .data/,
    download the Python 3.12 wheels the GPU machine lacks to .whl/, note the commit, and say
    whether a call fits."""
    DATA.mkdir(exist_ok=True)
    for split in ("train", "test"):
        (DATA / f"cifar10_{split}_jpeg.npz").unlink(missing_ok=True)
        if split == "train" or not segment:
            shutil.copyfile(
                SHARED / f"cifar10_{split}_jpeg.npz", DATA / f"cifar10_{split}_jpeg.npz"
            )
    wheels = ["--only-binary=:all:", "--python-version=3.12", "--implementation=cp", "--no-deps"]
    wheels += [f"--platform=manylinux_2_{n}_x86_64" for n in (17, 24, 28)] + ["--platform=any"]
    pip = [sys.executable, "-m", "pip", "download", "-q", *wheels, "-d", ".whl", *WHEELS]
    subprocess.run(pip, cwd=REPO, check=True)
    (DATA / "COMMIT").write_text(commit())
    size = carried_mib() or 0.0
    verdict = "fits" if size < LIMIT_MIB else "is TOO BIG: carry less"
    print(f"a call carries {size:.1f} MiB of {LIMIT_MIB}: it {verdict}")
    return {"carried_mib": size}


def decode_cifar(out_dir: Path) -> None:
    """Decode .data/cifar10_{train,test}_jpeg.npz (JPEG bytes at ``offsets``, ``label``) into
    uint8 shards of the ``npz`` source in ``out_dir``, once."""
    import numpy as np
    from PIL import Image

    out_dir.mkdir(parents=True, exist_ok=True)
    for archive in sorted(DATA.glob("cifar10_*_jpeg.npz")):
        if (target := out_dir / archive.name.replace("_jpeg", "")).exists():
            continue
        z = np.load(archive)
        jpeg, offs = z["jpeg"], z["offsets"]

        def one(i: int, jpeg: Any = jpeg, offs: Any = offs) -> Any:
            return np.asarray(Image.open(io.BytesIO(jpeg[offs[i] : offs[i + 1]].tobytes())))

        with ThreadPoolExecutor() as pool:
            images = np.stack(list(pool.map(one, range(len(offs) - 1))))
        np.savez(target, image=images, label=z["label"])


def run_all(args: argparse.Namespace, argv: list[str], out: Path) -> dict[str, Any]:
    """Every asked section in turn, each in a child process within its budget, after checking
    the size of the call; the JSON after each section, the table at the end."""
    start, size = time.time(), carried_mib()
    if size is not None and size >= LIMIT_MIB:
        sys.exit(f"error: a call would carry {size:.1f} MiB, over {LIMIT_MIB} MiB: carry less")
    import jax  # its version only: the backend starts in the children, one at a time

    results: dict[str, Any] = {"commit": commit(), "jax_version": jax.__version__,
                               "carried_mib": size, "sections": {}}  # fmt: skip
    if not args.smoke and "cifar10" in args.sections:
        decode_cifar(DECODED)
    budgets = {k: float(v) for k, v in (b.split("=") for b in args.budget)}
    out.mkdir(parents=True, exist_ok=True)
    for name in args.sections:
        left = start + args.total - time.time()
        budget = min(budgets.get(name) or BUDGETS[name][0] or left, left)
        section = run_section(name, budget, argv, results)
        results["sections"][name] = {**section, "estimate_s": BUDGETS[name][1]}
        results["device"] = results.get("device") or section.get("device")
        (out / "device_check.json").write_text(json.dumps(results, indent=1))
    (out / "device_check.txt").write_text((text := report(results)) + "\n")
    print(text)
    return results


def run_section(name: str, budget: float, argv: list[str], results: dict) -> dict[str, Any]:
    """Section ``name`` in a child process (``bench.speed`` for speed, loop and skipping):
    its results, its ``status`` (ok, cut, skipped or the child's error), budget and seconds. A
    child running at the budget gets SIGTERM, and SIGKILL 20 s later."""
    WORK.mkdir(exist_ok=True)
    (path := WORK / f"{name}.json").unlink(missing_ok=True)
    size = SIZES["smoke" if "--smoke" in argv else "full"]
    env = dict(os.environ, PYTHONUNBUFFERED="1", XLA_PYTHON_CLIENT_MEM_FRACTION="0.45")
    if "--smoke" in argv:  # a CPU compiles the same programs faster, less optimised
        env["XLA_FLAGS"] = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes"
    cmd = [sys.executable, "-m", "bench.speed", *size["speed"], "--out", str(path)]
    if name == "speed":  # cold compiles
        cmd += ["--sections", "models", "--reference"]
    elif name in ("loop", "skipping"):
        cmd += ["--sections", name, "--models", size["cifar"], "--cache-dir", str(CACHE)]
    elif name == "export":  # the exported artefact's programs on this device
        cmd = [sys.executable, "-m", "bench.export_bench", "--models", size["cifar"]]
        cmd += [*size["speed"], "--out", str(path)]
    else:
        deadline, measured = str(time.time() + budget), json.dumps(speeds(results))
        cmd = [sys.executable, "-m", "bench.device_check", *argv, "--child", name,
               "--deadline", deadline, "--measured", measured]  # fmt: skip
        env["JAX_COMPILATION_CACHE_DIR"] = str(CACHE)
    print(f"== {name}: budget {budget:.0f} s", file=sys.stderr, flush=True)
    start, status, proc = time.time(), "ok", subprocess.Popen(cmd, cwd=REPO, env=env)
    try:
        proc.wait(timeout=budget)
    except subprocess.TimeoutExpired:
        status = "cut"
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    section = json.loads(path.read_text()) if path.exists() else {}
    if status == "ok":
        failed = f"failed: exit status {proc.returncode}" if proc.returncode else "ok"
        status = section.get("status", failed)
    seconds = round(time.time() - start, 1)
    return {**section, "status": status, "budget_s": round(budget), "seconds": seconds}


def speeds(results: dict[str, Any]) -> dict[str, float]:
    """Loop images/s of the CIFAR-10 runs measured in this call so far: AIG-110's loop, and
    ResNet-110's bare step at AIG-110's loop/bare ratio."""
    loop = results["sections"].get("loop", {}).get("loop", [{}])[0]
    models = results["sections"].get("speed", {}).get("models", [])
    ungated = next(
        (m.get("ungated", {}) for m in models if m.get("model") == "resnet110_cifar"), {}
    )
    if "images_per_s" not in loop:
        return {}
    out = {"aig110": loop["images_per_s"]}
    if "train_images_per_s" in ungated:
        out["resnet110"] = ungated["train_images_per_s"] * loop["over_bare_step"]
    return out


def child(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """Run the CIFAR-10 section, writing its JSON after every run (a cut keeps them)."""
    import jax

    from bench.model_bench import error_text

    path, result = WORK / f"{args.child}.json", {}

    def save(**fields: Any) -> None:
        result.update(fields)
        path.write_text(json.dumps(result, indent=1))

    save(device=jax.devices()[0].device_kind, backend=jax.default_backend())
    try:
        cifar10(args, SIZES["smoke" if args.smoke else "full"], save, out)
    except Exception as err:
        save(status=f"failed: {error_text(err)}")
        raise
    return result


def new_run(name: str, args: argparse.Namespace, size: dict, budget: float) -> dict[str, Any]:
    """A CIFAR-10 run of ``RUNS[name]``: the reference recipe in ``--epochs``, 349 (the full
    recipe) or as many epochs as ``budget`` allows at the loop speeds measured in this call
    (else :data:`CIFAR_IMG_S`), ×0.1 at 50% and 75% of them (the full recipe: after 149 and
    249); evaluated at the end, one checkpoint kept."""
    img_s = {**CIFAR_IMG_S, **json.loads(args.measured)}
    fit = (budget - CIFAR_OVERHEAD_S) // sum(50_000 / img_s[m] for m in args.models)
    epochs = args.epochs or (349 if args.full_recipe else max(1, int(fit)))
    o: dict[str, Any] = {
        "dtype": size["dtype"], "batch_size": size["batch"], "eval_batch_size": size["batch"],
        "num_epochs": float(epochs), "eval_every_epochs": float(epochs), "dataset.source": "npz",
        "evals.sample.during_training": False, "checkpoint_every_steps": 10**9,
        "keep_checkpoints": 1, "tensorboard": False, "progress": False,
        "data_threads": os.cpu_count() or 1,
    }  # fmt: skip
    if not args.full_recipe:
        o["lr_boundaries_epochs"] = [epochs / 2, 3 * epochs / 4]
    if args.smoke:
        o.update(model=size["cifar"], num_train_steps=3, log_every_steps=1)
    return {"name": name, "module": RUNS[name], "overrides": o}


def cifar_config(run: dict[str, Any], data: Path) -> Any:
    """``train.py``'s config of ``run`` (its config module and overrides) on the shards in
    ``data``; where they hold no test split, evaluated on 1,000 training images."""
    config = importlib.import_module(run["module"]).get_config()
    o = {k: tuple(v) if isinstance(v, list) else v for k, v in run["overrides"].items()}
    config.update_from_flattened_dict({**o, "dataset.data_dir": str(data)})
    if not any(data.glob("*_test*.npz")):
        config.dataset.eval_split, config.eval_limit = "train", 1000
    return config


def cifar10(args: argparse.Namespace, size: dict, save: Any, out: Path) -> None:
    """Train ConvNet-AIG 110 (t = 0.7, λ = 2) and ResNet-110 on CIFAR-10 (new runs, or those
    packed in ``--resume``) until done or, sharing the time left, the deadline; pack each into
    ``<out>/<run>.tar.gz``; evaluate with ``eval.py`` where the test split is here."""
    from aig_jax.train.loop import train_and_evaluate
    from aig_jax.train.metrics import read_metrics

    signal.signal(signal.SIGTERM, lambda *_: None)  # outside training, the deadline rules
    data = SHARED / "mini" if args.smoke else DECODED
    test = any(data.glob("*_test*.npz"))
    reserve = 90 if test and not args.smoke else 30  # eval.py and packing
    budget = args.deadline - time.time()
    runs = [new_run(n, args, size, budget) for n in args.models]
    runs = unpack(Path(args.resume)) if args.resume else runs
    records: dict[str, Any] = {}
    for i, run in enumerate(runs):
        workdir, config = WORK / "runs" / run["name"], cifar_config(run, data)
        if not args.resume:  # a new run starts afresh
            shutil.rmtree(workdir, ignore_errors=True)
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "run.json").write_text(json.dumps(run))
        weights = [1 / CIFAR_IMG_S[r["name"]] for r in runs[i:]]
        share = (args.deadline - reserve - time.time()) * weights[0] / sum(weights)
        timer = threading.Timer(max(share, 1.0), os.kill, (os.getpid(), signal.SIGTERM))
        start = time.time()
        timer.start()
        try:
            train_and_evaluate(config, str(workdir))
        finally:
            timer.cancel()
        last = read_metrics(str(workdir), "train")[-1]
        total = config.num_train_steps
        total = total if total > 0 else round(config.num_epochs * last["step"] / last["epoch"])
        records[run["name"]] = {
            "epochs": config.num_epochs, "step": last["step"], "total_steps": total,
            "cut": last["step"] < total, "train_s": round(time.time() - start, 1),
            "loss": last["loss"], "loop_images_per_s": last["images_per_sec"],
            "packed_mib": pack(workdir, out / f"{run['name']}.tar.gz"),
        }  # fmt: skip
        save(runs=records)
    if test:
        try:
            save(evaluation=evaluate(runs, data, size, args.deadline))
        except subprocess.TimeoutExpired:
            save(status="cut (in eval.py)")


def pack(workdir: Path, path: Path) -> float:
    """``workdir``'s checkpoint, metrics and run record as one ``.tar.gz`` at ``path``; MiB."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        for item in ("checkpoints", "metrics.jsonl", "run.json"):
            if (workdir / item).exists():
                tar.add(workdir / item, arcname=item)
    return round(path.stat().st_size / 2**20, 2)


def unpack(folder: Path) -> list[dict[str, Any]]:
    """The run records of the runs packed in ``folder`` (``*.tar.gz``), unpacked into
    ``.device_check/runs/<run>``."""
    runs = []
    for path in sorted(folder.glob("*.tar.gz")):
        workdir = WORK / "runs" / path.name.removesuffix(".tar.gz")
        shutil.rmtree(workdir, ignore_errors=True)
        with tarfile.open(path) as tar:
            tar.extractall(workdir, filter="data")
        runs.append(json.loads((workdir / "run.json").read_text()))
    if not runs:
        sys.exit(f"error: --resume {folder} holds no packed run (*.tar.gz)")
    return runs


def evaluate(runs: list[dict], data: Path, size: dict, deadline: float) -> dict[str, Any]:
    """``eval.py`` on the test split: ConvNet-AIG in argmax, sample and calibrated gates with
    ResNet-110 as its baseline (or whichever run is here alone): top-1 error and realised
    GMACs per gate mode."""
    named = {r["name"]: r for r in runs}
    run = named.get("aig110") or runs[0]
    o, report_dir = run["overrides"], WORK / "report"
    cmd = [sys.executable, "eval.py", f"--workdir={WORK / 'runs' / run['name']}",
           "--config=" + run["module"].replace(".", "/") + ".py", "--config.dataset.source=npz",
           f"--config.dataset.data_dir={data}", f"--config.dtype={o['dtype']}",
           f"--config.eval_batch_size={o['eval_batch_size']}", "--modes=argmax,sample,calibrated",
           "--samples=1", f"--output={report_dir}", f"--compilation_cache={CACHE}"]  # fmt: skip
    cmd += size["eval"]
    cmd += [f"--config.model={o['model']}"] if "model" in o else []
    if run["name"] == "aig110" and "resnet110" in named:
        cmd.append(f"--baseline={WORK / 'runs/resnet110'}")
    subprocess.run(cmd, cwd=REPO, check=True, timeout=max(deadline - time.time() - 5, 1))
    report = json.loads((report_dir / "report.json").read_text())
    keys = ("top1_error", "realised_gmacs", "macs_saving")
    result = {run["name"]: {m: {k: s[k] for k in keys} for m, s in report["modes"].items()}}
    if "baseline" in report:
        result["resnet110"] = {"open": {k: report["baseline"][k] for k in keys}}
    return result


def report(results: dict[str, Any]) -> str:
    """The printed table: device, versions, each section's status and time, the speed table,
    the CIFAR-10 runs, and the command of the next segment where a run was cut."""
    from bench.table import fmt, table

    device = results.get("device") or "device unnamed (no section started its backend)"
    lines = [f"{device}, jax {results['jax_version']}, commit "
             f"{results['commit']}, carried {fmt(results['carried_mib'])} MiB"]  # fmt: skip
    merged: dict[str, Any] = {}
    for name, s in results["sections"].items():
        lines.append(f"{name:9} {s['status'][:300]:<6} {s['seconds']:>6} s of {s['budget_s']} s "
                     f"(estimate {s['estimate_s']} s)")  # fmt: skip
        merged.update({k: v for k, v in s.items() if k in ("models", "skipping", "loop")})
    lines += [table(merged)] if merged else []
    cifar = results["sections"].get("cifar10", {})
    for name, r in cifar.get("runs", {}).items():
        lines.append(f"cifar10 {name}: step {r['step']} of {r['total_steps']} ({r['epochs']:g} "
                     f"epochs{', cut' if r['cut'] else ''}) in {r['train_s']} s, loss "
                     f"{fmt(r['loss'])}, {fmt(r['loop_images_per_s'])} img/s in the loop, "
                     f"packed {r['packed_mib']} MiB")  # fmt: skip
    for name, modes in cifar.get("evaluation", {}).items():
        lines += [f"  {name} {m}: top-1 error {fmt(e['top1_error'])}%, "
                  f"{fmt(e['realised_gmacs'])} GMACs" for m, e in modes.items()]  # fmt: skip
    if cut := [n for n, r in cifar.get("runs", {}).items() if r["cut"]]:
        lines.append(f"next segment: put {cut[0]}.tar.gz from this call's files alone into "
                     ".resume/, run `python -m bench.device_check --prepare --segment`, then on "
                     "the GPU `python -m bench.device_check --sections cifar10 --resume "
                     ".resume`")  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    main()
