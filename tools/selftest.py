"""Check the GPU paths on a fresh machine before serving: `PYTHONPATH=. python -m tools.selftest --out DIR`.

Runs from the source tree without installing the project or any test dependency (flashinfer, flash-attn and orjson
are optional). Steps run in order of risk, each in a subprocess of its own (`python -m tools.selftest --step NAME`)
with its own timeout, so a hang, a segfault or a sticky CUDA error fails that step by name and the next one runs:

  environment     versions, the GPU, which optional packages import
  kernels         every Triton kernel against its torch reference, float32, many shapes
  paged_bf16      bf16 KV store (prefill and decode) and paged decode against the float32 reference
  kv_int8         int8-KV store and decode against the dequantized reference
  int4_gemm       the int4 dequant-GEMM against x @ the dequantized weight, decode and prefill rows
  fp8_linear      Fp8Linear against the float32 math (skipped where FP8 GEMMs are not supported)
  int8            Int8Linear at m = 16 and 17 in bf16 and fp16
  graphs          CUDA-graph replay against eager for every bucket
  graph_lifetime  two graph sets; one closed and the cache emptied, the other still replays equal to eager (CUDA)
  flashinfer      the startup probe, and flashinfer's decode against the Triton kernel (when it imports)
  decode_graphs   the bundled VLM's greedy tokens, decode graphs against eager, 8 prompts, vision replaying beside
  cascade         the bundled cascade on the device against the float32 CPU answers (checked against samples.json)
  cascade_split   the cascade with its later stages on a second GPU against one GPU (when two are present)
  vision          classifier img/s per batch bucket (DINOv3 ViT-S/16 and ViT-B/16 shapes, random weights)
  vlm             VLM prefill and decode tok/s (Qwen3-VL-2B head shapes, fewer layers, random weights)
  tensorrt        a tiny classifier's fp16 TensorRT engine against its fp32 modules, then read from the engine cache

DIR/report.json holds every step (status pass/fail/skip, or "running" while it runs; seconds, details, error) and is
rewritten before and after each step, as is DIR/summary.txt; DIR/logs/NAME.log is each step's output. Exit status 1
if a step failed. --cpu runs every step's logic on the CPU with small shapes (Triton under its interpreter, the CPU
fallbacks for the GPU libraries, CUDA-only steps skipped with the reason): what CI runs. --budget-s bounds the whole
run: a step gets at most the time left, and steps past it are skipped."""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from tools import selftest_kernels as kernels
from tools import selftest_steps as steps
from tools.selftest_context import ROOT, Context, Skip

log = logging.getLogger("selftest")

StepFn = Callable[[Context, dict], None]


@dataclass(frozen=True)
class Step:
    name: str
    run: StepFn
    timeout_s: float  # on one H100; a step that takes longer is killed


STEPS: list[Step] = [
    Step("environment", steps.step_environment, 60), Step("kernels", kernels.step_kernels, 150),
    Step("paged_bf16", kernels.step_paged_bf16, 60), Step("kv_int8", kernels.step_kv_int8, 60),
    Step("int4_gemm", kernels.step_int4_gemm, 60), Step("fp8_linear", kernels.step_fp8_linear, 60),
    Step("int8", kernels.step_int8, 60), Step("graphs", steps.step_graphs, 60),
    Step("graph_lifetime", steps.step_graph_lifetime, 60), Step("flashinfer", steps.step_flashinfer, 120),
    Step("decode_graphs", steps.step_decode_graphs, 120), Step("cascade", steps.step_cascade, 180),
    Step("cascade_split", steps.step_cascade_split, 180), Step("vision", steps.step_vision, 120),
    Step("vlm", steps.step_vlm, 120), Step("tensorrt", steps.step_tensorrt, 240),
]
FAULTS = ("raise", "hang", "abort")
FAULT_STEP = "fault"  # only with --fault, right after environment
LOG_TAIL_LINES = 20


@dataclass
class StepResult:
    name: str
    status: str  # "pass", "fail", "skip"; "running" in the report while it runs
    seconds: float
    details: dict = field(default_factory=dict)
    error: str | None = None


def fault(kind: str) -> StepFn:
    """A step that fails the way real ones can, to test the harness (--fault)."""
    def run(ctx: Context, details: dict) -> None:
        if kind == "raise":
            raise RuntimeError("boom (--fault raise)")
        if kind == "abort":
            os.abort()
        while True:  # hang: only the step's timeout ends it
            time.sleep(1)

    return run


def steps_for(fault_kind: str | None) -> list[Step]:
    if fault_kind is None:
        return STEPS
    return [STEPS[0], Step(FAULT_STEP, fault(fault_kind), 60), *STEPS[1:]]


# ----------------------------------------------------------------------------------------------------------------
# One step, inside its subprocess
# ----------------------------------------------------------------------------------------------------------------


def run_here(step: Step, ctx: Context) -> StepResult:
    import torch

    details: dict = {}
    start = time.perf_counter()
    try:
        if ctx.on_cuda and not torch.cuda.is_available() and step.name != "environment":
            raise Skip("CUDA is not available (use --cpu)")
        step.run(ctx, details)
        status, error = "pass", None
    except Skip as e:
        status, error = "skip", str(e)
    except Exception as e:  # every failure is the step's result
        status, error = "fail", f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=8)}"
    finally:
        if ctx.on_cuda and torch.cuda.is_available():
            try:
                torch.cuda.synchronize(ctx.device)
                torch.cuda.empty_cache()
            except Exception as e:  # a sticky CUDA error: this process ends here, the next step starts afresh
                details["cuda_after_step"] = repr(e)
    return StepResult(step.name, status, round(time.perf_counter() - start, 2), details, error)


def step_main(args: argparse.Namespace) -> int:
    import torch

    step = next(s for s in steps_for(args.fault) if s.name == args.step)
    device = torch.device("cpu" if args.cpu else args.device)
    result = run_here(step, Context(device, args.cpu, args.tmp))
    args.result.write_text(json.dumps(asdict(result), indent=2))
    return 0


# ----------------------------------------------------------------------------------------------------------------
# The driver
# ----------------------------------------------------------------------------------------------------------------


def log_tail(path: Path) -> str:
    lines = path.read_text(errors="replace").splitlines() if path.exists() else []
    return "\n".join(lines[-LOG_TAIL_LINES:])


def run_subprocess(step: Step, args: argparse.Namespace, tmp: Path, timeout: float) -> StepResult:
    """The step in `python -m tools.selftest --step NAME`, killed (its whole process group) after `timeout`."""
    logs = args.out / "logs"
    logs.mkdir(exist_ok=True)
    result_path, log_path = tmp / f"{step.name}.json", logs / f"{step.name}.log"
    command = [sys.executable, "-m", "tools.selftest", "--step", step.name, "--out", str(args.out),
               "--device", args.device, "--tmp", str(tmp), "--result", str(result_path)]
    command += ["--cpu"] if args.cpu else []
    command += ["--fault", args.fault] if args.fault else []
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    if args.cpu:
        env.setdefault("TRITON_INTERPRET", "1")  # before any kernel module is imported
    start = time.perf_counter()
    with log_path.open("w") as out:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)  # its own group: kill reaches what it started
        try:
            code = process.wait(timeout)
        except BaseException as e:  # the timeout, or Ctrl-C in the driver: the step must not outlive it
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            if not isinstance(e, subprocess.TimeoutExpired):
                raise
            code = None
    seconds = round(time.perf_counter() - start, 2)
    details = {"log": str(log_path)}
    if code is None:
        return StepResult(step.name, "fail", seconds, details, f"timeout after {timeout:.0f} s (killed)\n"
                                                              f"{log_tail(log_path)}")
    if result_path.exists():
        result = StepResult(**json.loads(result_path.read_text()))
        result.details.update(details)
        if code != 0:  # it reported, then died on the way out (CUDA teardown)
            result.details["exit"] = exit_description(code)
        return result
    return StepResult(step.name, "fail", seconds, details, f"{exit_description(code)} before reporting\n"
                                                           f"{log_tail(log_path)}")


def exit_description(code: int) -> str:
    if code >= 0:
        return f"exit status {code}"
    try:
        return f"exit signal {signal.Signals(-code).name}"
    except ValueError:
        return f"exit signal {-code}"


def summary(results: list[StepResult], mode: str) -> str:
    lines = [f"selftest ({mode}): " + ", ".join(f"{sum(r.status == s for r in results)} {s}"
                                                for s in ("pass", "fail", "skip", "running"))]
    for r in results:
        line = f"{r.status.upper():7} {r.name:14} {r.seconds:7.1f} s"
        if r.error:
            line += "  " + r.error.splitlines()[0]
        elif r.name in ("vision", "vlm", "flashinfer", "int8", "fp8_linear", "decode_graphs", "tensorrt"):
            line += "  " + json.dumps({k: v for k, v in r.details.items() if k != "log"})[:300]
        lines.append(line)
    return "\n".join(lines) + "\n"


def write_report(out: Path, mode: str, start: float, budget_s: float, results: list[StepResult]) -> None:
    report = {"mode": mode, "seconds": round(time.perf_counter() - start, 1), "budget_s": budget_s,
              "steps": [asdict(r) for r in results]}
    # Each file replaced whole: a reader (or a crash) never sees half of one.
    for name, text in (("report.json", json.dumps(report, indent=2)), ("summary.txt", summary(results, mode))):
        part = out / f".{name}.part"
        part.write_text(text)
        os.replace(part, out / name)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tools.selftest", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="directory for report.json, summary.txt and logs/")
    parser.add_argument("--cpu", action="store_true", help="every step's logic on the CPU, small shapes (CI)")
    parser.add_argument("--device", default="cuda:0", help="the GPU to check (default cuda:0)")
    parser.add_argument("--only", nargs="*", help="run only these steps")
    parser.add_argument("--budget-s", type=float, default=480.0,
                        help="bound on the whole run: a step gets at most what is left, later ones are skipped")
    parser.add_argument("--step-timeout-s", type=float, help="cap every step's own timeout at this")
    parser.add_argument("--fault", choices=FAULTS,
                        help="for testing the harness: add a step 'fault' after environment that raises, hangs or "
                             "aborts its process")
    parser.add_argument("--step", help=argparse.SUPPRESS)  # inside a step's subprocess: run that step
    parser.add_argument("--tmp", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    names = [s.name for s in steps_for(args.fault)]
    unknown = sorted(set(args.only or ()) - set(names))
    if unknown:
        parser.error(f"--only: no step named {', '.join(unknown)} (steps: {', '.join(names)})")
    if args.step is not None and (args.step not in names or args.tmp is None or args.result is None):
        parser.error(f"--step takes one of {', '.join(names)} with --tmp and --result")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.step is not None:
        return step_main(args)
    args.out.mkdir(parents=True, exist_ok=True)
    mode = "cpu" if args.cpu else args.device
    results: list[StepResult] = []
    running: StepResult | None = None
    start = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for step in steps_for(args.fault):
                if args.only and step.name not in args.only:
                    continue
                left = args.budget_s - (time.perf_counter() - start)
                if left < 1:
                    results.append(StepResult(step.name, "skip", 0.0, error=f"over the {args.budget_s:.0f} s budget"))
                    continue
                timeout = min(step.timeout_s, left, args.step_timeout_s or float("inf"))
                log.info("step %s (timeout %.0f s)", step.name, timeout)
                # Written before the step starts: a driver killed meanwhile still says which step was running.
                running = StepResult(step.name, "running", 0.0, {"timeout_s": round(timeout, 1)})
                write_report(args.out, mode, start, args.budget_s, [*results, running])
                results.append(run_subprocess(step, args, Path(tmp), timeout))
                running = None
                write_report(args.out, mode, start, args.budget_s, results)
    finally:
        if running is not None:  # the driver itself was stopped (Ctrl-C) while the step ran
            running.status, running.error = "fail", "the self-test was interrupted while this step ran"
            results.append(running)
        write_report(args.out, mode, start, args.budget_s, results)
    text = summary(results, mode)
    sys.stdout.write(text)
    return 1 if any(r.status == "fail" for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
