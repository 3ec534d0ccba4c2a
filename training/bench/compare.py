"""Train several configs one after another and compare them on time to the baseline's held-out loss.

Each config is an opaque `python -m training.pretrain` config: it runs in its own subprocess,
`python -m training.pretrain --config X --out DIR/runs/<name> --overwrite --set ...`, with the common
`--set`s (data dir, seed, eval cadence) applied to all. The first config is the baseline. Progress is
a tqdm bar per run that follows the run's metrics.jsonl; the child's own output goes to
DIR/logs/<name>.log. The analysis is in training.bench.report (on training.bench.curves).
"""
from __future__ import annotations

import json
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

from training.bench.blimp_points import read_points
from training.bench.curves import read_jsonl, split_records
from training.bench.report import compare_runs, summarise_run, write_report
from training.errors import UserError
from training.stages.plan import planned_steps

# Set for every run before the user's --set (which therefore win): compare reads metrics, so no HF
# export (it only adds minutes after training) and no per-run progress bar (compare draws its own).
DEFAULT_SETS = ("run.progress=false", "run.export_hf=false")


def run_names(configs: list[str], names: Optional[list[str]] = None) -> list[str]:
    """Names from file stems; a repeated stem gets its parent folder (then an index) prepended."""
    if names:
        if len(names) != len(configs):
            raise UserError(f"--names has {len(names)} entries for {len(configs)} configs")
        if len(set(names)) != len(names):
            raise UserError(f"--names must be unique, got {names}")
        return list(names)
    stems = [Path(c).stem for c in configs]
    out = []
    for i, (c, stem) in enumerate(zip(configs, stems)):
        name = stem if stems.count(stem) == 1 else f"{Path(c).parent.name}-{stem}"
        while name in out:
            name = f"{name}-{i}"
        out.append(name)
    return out


def _config_info(config: str, sets: list[str]) -> dict:
    """Total steps, eval cadence and last stage, if the config loads here (the child validates it again)."""
    info = {"total_steps": None, "eval_every": None, "error": None, "final_stage": None}
    try:
        from training.stages.plan import load_config

        cfg = load_config(config, sets)
        info.update(total_steps=planned_steps(cfg), eval_every=cfg.run.eval_every,
                    final_stage=cfg.stages[-1].name if cfg.stages else None)
    except UserError as err:
        info["error"] = str(err)
    except Exception as err:  # noqa: BLE001 - a config our parent cannot read is still the child's to judge
        info["error"] = f"{type(err).__name__}: {err}"
    return info


def _file_id(path: Path) -> Optional[tuple[int, int]]:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns


def _follow(proc: subprocess.Popen, metrics: Path, name: str, total: Optional[int], position: int,
            progress: bool = True, stop_below: Optional[float] = None, final_stage: Optional[str] = None,
            poll_s: float = 0.5, stale: Optional[tuple[int, int]] = None) -> Optional[int]:
    """Follow the run's metrics.jsonl while the child runs: a tqdm bar over its steps and, with
    `stop_below`, a SIGTERM (checkpoint and exit, as on pre-emption) once a held-out loss of its final
    stage (report.py: only that stage counts) is at or below it. Returns the step of that eval when the
    run was stopped, else None. `stale`: the (inode, mtime) of a metrics.jsonl an earlier run left there,
    which the child replaces (--overwrite) and which is never read as this run's."""
    from tqdm import tqdm

    bar = tqdm(total=total, desc=name, unit="step", position=position, leave=True, dynamic_ncols=True,
               disable=not progress)
    shown = 0
    last_eval = None
    stopped_at = None
    try:
        while True:
            done = proc.poll() is not None
            if metrics.is_file() and (stale is None or _file_id(metrics) != stale):
                train, evals = split_records(read_jsonl(metrics))
                last = evals[-1] if evals else {}
                # A crossing at the run's last step is its end, not a stop: a signal then would only reach the
                # child as it exits (and kill it there, outside the training loop's handler).
                if (stop_below is not None and stopped_at is None and not done and last.get("heldout_loss") is not None
                        and last["heldout_loss"] <= stop_below and final_stage in (None, last.get("stage"))
                        and (total is None or int(last["step"]) < total)):
                    stopped_at = int(evals[-1]["step"])
                    proc.send_signal(signal.SIGTERM)
                if train:
                    step = int(train[-1]["step"])
                    if evals:
                        last_eval = evals[-1]["heldout_loss"]
                    if step > shown:
                        bar.update(step - shown)
                        shown = step
                    post = {"stage": train[-1].get("stage"), "loss": f"{train[-1].get('loss', float('nan')):.3f}"}
                    if last_eval is not None:
                        post["eval"] = f"{last_eval:.3f}"
                    bar.set_postfix(post)
            if done:
                break
            time.sleep(poll_s)
    finally:
        bar.close()
    return stopped_at


def _launch(config: str, name: str, out_dir: Path, sets: list[str], launcher: Optional[str], info: dict,
            position: int, progress: bool, stop_below: Optional[float], resume: bool) -> tuple[list, int, Optional[int]]:
    """One pretrain subprocess, followed: (its command, exit code, step of the eval that stopped it or None)."""
    run_dir = out_dir / "runs" / name
    prefix = shlex.split(launcher) if launcher else [sys.executable]
    cmd = [*prefix, "-m", "training.pretrain", "--config", str(config), "--out", str(run_dir),
           "--resume" if resume else "--overwrite"]
    for s in sets:
        cmd += ["--set", s]
    with open(out_dir / "logs" / f"{name}.log", "a" if resume else "w") as log:
        log.write("$ " + shlex.join(cmd) + "\n")
        log.flush()
        stale = None if resume else _file_id(run_dir / "metrics.jsonl")  # an earlier run's, until replaced
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        try:
            stopped_at = _follow(proc, run_dir / "metrics.jsonl", name, info["total_steps"], position,
                                 progress=progress, stop_below=stop_below, final_stage=info["final_stage"],
                                 stale=stale)
            return cmd, proc.wait(), stopped_at
        except KeyboardInterrupt:
            proc.terminate()
            proc.wait()
            raise


def train_one(config: str, name: str, out_dir: Path, sets: list[str], launcher: Optional[str],
              position: int = 0, progress: bool = True, stop_below: Optional[float] = None,
              pause: bool = False) -> tuple[int, float, Optional[int]]:
    """Run one config to completion, or (with `stop_below`) until its held-out loss gets there; with `pause`, the
    run stopped there (a checkpoint at the target) is resumed to the end of its budget. Returns (exit code,
    seconds of the subprocess(es), step of the stopping eval or None)."""
    (out_dir / "logs").mkdir(parents=True, exist_ok=True)
    info = _config_info(config, sets)
    start = time.perf_counter()
    cmd, rc, stopped_at = _launch(config, name, out_dir, sets, launcher, info, position, progress, stop_below, False)
    record = {"command": cmd, "exit_code": rc, "stopped_at_step": stopped_at}
    if pause and stopped_at is not None and rc in (0, 75):
        # The checkpoint the signal wrote: the crossing's eval step, or the few steps the run took before the
        # signal arrived (compare polls metrics.jsonl twice a second).
        checkpoint_step = _latest_step(out_dir / "runs" / name)
        cmd, rc, _ = _launch(config, name, out_dir, sets, launcher, info, position, progress, None, True)
        record.update(resumed_command=cmd, exit_code=rc, paused_at_step=stopped_at, stopped_at_step=None,
                      target_checkpoint_step=checkpoint_step)
    seconds = time.perf_counter() - start
    (out_dir / "logs" / f"{name}.json").write_text(json.dumps({**record, "process_s": seconds}))
    return rc, seconds, record["stopped_at_step"]


STOPPED = "stopped at target"


def _status(name: str, rc: int, stopped_at: Optional[int], paused_at: Optional[int] = None) -> str:
    """ok; stopped at target (we sent SIGTERM: the run checkpoints and exits 75, as on pre-emption; a launcher
    such as torchrun may turn that into another code, which is noted); paused at target and resumed; failed."""
    if stopped_at is not None:
        return f"{STOPPED} (step {stopped_at})" + ("" if rc in (0, 75) else f", exit {rc} after the signal")
    if rc == 0 and paused_at is not None:
        return f"ok (paused at target, step {paused_at})"
    return "ok" if rc == 0 else f"failed (exit {rc}, see logs/{name}.log)"


def _tail(path: Path, n: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def run(args) -> dict:
    configs = [str(c) for c in args.configs]
    for c in configs:
        if not Path(c).is_file():
            raise UserError(f"config file not found: {c}")
    names = run_names(configs, args.names)
    only = list(args.only or [])
    if set(only) - set(names):
        raise UserError(f"--only {sorted(set(only) - set(names))}: not among the run names {names}")
    out = Path(args.out)
    sets = list(DEFAULT_SETS) + list(args.set)
    if args.eval_every:
        sets.append(f"run.eval_every={args.eval_every}")
    if args.blimp_every:
        sets.append(f"run.save_every={args.blimp_every}")
    if args.blimp or args.pause_at_target:  # the checkpoints to score (at the target, every K steps) stay
        sets.append(f"run.keep_last={KEEP_ALL}")
    scorer = None
    if args.blimp:
        from training.bench.blimp_points import Scorer

        scorer = Scorer(args.blimp, args.blimp_per_paradigm, progress=not args.no_progress)
    out.mkdir(parents=True, exist_ok=True)  # after every check of the arguments: a refused command leaves nothing
    stop_at_target = args.stop_at_target or args.pause_at_target
    notes = []

    infos = {n: _config_info(c, sets) for n, c in zip(names, configs)}
    cadences = {n: i["eval_every"] for n, i in infos.items() if i["eval_every"] is not None}
    if len(set(cadences.values())) > 1:
        notes.append(f"run.eval_every differs between configs ({cadences}); pass --eval-every N for a "
                     "consistent time resolution")
    for n, i in infos.items():
        if i["error"]:
            notes.append(f"{n}: config not readable by this process ({i['error']}); the run decides")

    statuses: dict[str, str] = {}
    process_s: dict[str, float] = {}
    to_train = set() if args.report_only else (set(only) if only else set(names))
    target = None
    for i, (name, config) in enumerate(zip(names, configs)):
        if name not in to_train:  # --report-only / --only: what train_one recorded when the run was made
            try:
                rec = json.loads((out / "logs" / f"{name}.json").read_text())
                process_s[name] = rec.get("process_s")
                statuses[name] = _status(name, rec.get("exit_code", 0), rec.get("stopped_at_step"),
                                         rec.get("paused_at_step"))
            except (OSError, ValueError):
                pass
        else:
            print(f"[{i + 1}/{len(configs)}] {name}: {config}", flush=True)
            stop_below = target if (stop_at_target and i > 0) else None
            rc, seconds, stopped_at = train_one(config, name, out, sets, args.launcher,
                                                progress=not args.no_progress, stop_below=stop_below,
                                                pause=args.pause_at_target)
            process_s[name] = seconds
            statuses[name] = _status(name, rc, stopped_at, _paused_at(out, name))
            if not statuses[name].startswith(("ok", STOPPED)):
                print(f"  {name} failed (exit {rc}); last lines of {out / 'logs' / (name + '.log')}:\n"
                      + _tail(out / "logs" / f"{name}.log"), file=sys.stderr, flush=True)
            elif scorer is not None:
                _score_blimp(scorer, out, name)
        if i == 0 and stop_at_target and to_train - {name}:
            target = summarise_run(name, config, out / "runs" / name, statuses.get(name, "ok")).final_loss
            if target is None:
                notes.append("--stop-at-target: the baseline has no final held-out loss; every run went to its end")
    runs = [summarise_run(n, c, out / "runs" / n, statuses.get(n, "ok")) for n, c in zip(names, configs)]
    for r in runs:
        if scorer is not None and args.report_only and (out / "runs" / r.name / "checkpoints").is_dir():
            _score_blimp(scorer, out, r.name)  # what an earlier compare trained but did not score (cached)
        r.blimp = read_points(out, r.name)
    if args.control is not None and args.control not in names:
        raise UserError(f"--control {args.control}: not among the run names {names}")
    report = compare_runs(runs, 0, names.index(args.control) if args.control else None)
    for r in report["runs"]:
        r["process_s"] = process_s.get(r["name"])
    report["common_sets"] = sets
    report["command"] = "python -m training.bench " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    if args.report_only or only:  # keep the command that trained the (other) runs
        try:
            previous = json.loads((out / "report.json").read_text())
        except (OSError, ValueError):
            previous = {}
        if args.report_only:
            report["report_command"], report["command"] = report["command"], previous.get("command", report["command"])
        elif previous.get("command"):
            report["earlier_command"] = previous["command"]
    if args.stop_at_target:
        notes.append("--stop-at-target: a method stopped at target reports its final loss/accuracy at the "
                     "stopping eval, not at the end of its budget")
    if args.pause_at_target:
        notes.append("--pause-at-target: each method was checkpointed at its first final-stage eval at or below "
                     "the target and resumed to the end of its budget; its final loss is at the end")
    report["notes"] = notes + list(args.note or [])
    from training.bench.machine import machine_info
    import torch

    report["machine"] = machine_info(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    earlier = f"Earlier runs of this report: `{report['earlier_command']}`\n\n" if report.get("earlier_command") else ""
    preamble = f"Command: `{report['command']}`\n\n{earlier}Machine: {report['machine'].get('cpu', '?')}, " \
               f"{report['machine'].get('cpu_count')} CPUs" + (f", {report['machine']['gpu']}"
                                                               if "gpu" in report["machine"] else "")
    paths = write_report(report, out, preamble)
    print((out / "report.md").read_text())
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return report


KEEP_ALL = 10**6  # run.keep_last when compare scores checkpoints: none is pruned


def _latest_step(run_dir: Path) -> Optional[int]:
    """The step of the run's newest checkpoint (checkpoints/latest), or None."""
    try:
        tag = (run_dir / "checkpoints" / "latest").read_text().strip()
        return int(tag[4:]) if tag.startswith("step") else None
    except (OSError, ValueError):
        return None


def _paused_at(out: Path, name: str) -> Optional[int]:
    try:
        return json.loads((out / "logs" / f"{name}.json").read_text()).get("paused_at_step")
    except (OSError, ValueError):
        return None


def _score_blimp(scorer, out: Path, name: str) -> None:
    """BLiMP at the run's checkpoints (training/bench/blimp_points.py): the target's is labelled."""
    from training.bench.blimp_points import score_run

    try:
        rec = json.loads((out / "logs" / f"{name}.json").read_text())
    except (OSError, ValueError):
        rec = {}
    target_step = (rec.get("target_checkpoint_step") if rec.get("paused_at_step") is not None
                   else _latest_step(out / "runs" / name) if rec.get("stopped_at_step") is not None else None)
    print(f"  {name}: BLiMP at its checkpoints", flush=True)
    score_run(scorer, out, name, out / "runs" / name, {target_step: "target"} if target_step else {})


def load_report(path: str | Path) -> dict:
    return json.loads(Path(path).read_text())
