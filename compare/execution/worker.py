"""Entry point executed inside a framework's environment.

Reads one job (JSON) from stdin, runs every configuration of it through
common.loop with that framework's backend, and writes JSON lines to stdout:
result records (kept by the runner) and progress lines (kind "progress", shown
and dropped). Parameter and probe snapshots go to <out>/snapshots/*.npz (with
the job's "snapshots": "final", only each run's last epoch's). A
failure of one configuration becomes an error record and the next one runs.
"""

from __future__ import annotations

import gc
import importlib
import json
import os
import platform
import signal
import sys
import time
import traceback
from dataclasses import replace
from pathlib import Path

import numpy as np

from common import records
from common.config import ModelSpec, RunConfig
from common.data import load_fashion_mnist
from common.errors import BackendUnavailable, BNCompareError, in_words
from common.flops import PEAK_MATMUL, matmul_gflops_per_s
from common.loop import run as run_loop
from common.registry import framework_info, load_backend_module
from common.roofline import norm_bytes, norm_input_shapes, numpy_add, time_alternating, triad_bytes

from ..reporting.benchmark import LOOPS

_stdout = sys.stdout


def send(obj: dict) -> None:
    _stdout.write(json.dumps(obj) + "\n")
    _stdout.flush()


def save_npz(path: Path, arrays: dict) -> None:
    """Write atomically: a crash never leaves half a snapshot."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    with open(tmp, "wb") as fh:
        np.savez(fh, **arrays)
    os.replace(tmp, path)


def error_record(framework, config: RunConfig, exc: BaseException, status: str) -> dict:
    """status: failed (before training) or crashed (during it)."""
    return records.make(
        "error",
        framework=framework,
        variant=config.model.variant,
        seed=config.seed,
        config_id=config.config_id,
        status=status,
        error_type=type(exc).__name__,
        message=str(exc) or type(exc).__name__,
        traceback=None if isinstance(exc, BNCompareError) else traceback.format_exc(),
    )


def _terminate(signum, frame):
    raise KeyboardInterrupt  # SIGTERM ends the worker the way Ctrl-C does: between two operations


def bench(job: dict) -> int:
    """compare.bench's cells, taking turns: in each of `repeats` rounds every cell in turn runs one epoch of the
    suite's loop, the bare loop (frameworks/<fw>/bare.py) and the textbook loop (textbook.py), alternating, the
    order of the three rotating each round, a garbage collection (untimed) before each loop; so the r-th figures
    of any two cells were measured side by side. One record per cell, once every round is done."""
    framework = job["framework"]
    module = load_backend_module(framework)
    loops = {"bare": load_backend_module(framework, "bare"), "textbook": load_backend_module(framework, "textbook")}
    datasets = {}
    # the machine's peak in this framework, measured once before any cell, never inside a timed epoch
    peak = matmul_gflops_per_s(PEAK_MATMUL, loops["bare"].matmul_seconds(RunConfig(device=job["device"]), PEAK_MATMUL))
    done = {}  # (norm, variant, batch size, execution name) -> the --execution that measured it
    cells = []
    for cell in job["cells"]:
        config = _bench_config(cell, job)
        label = f"{config.model.variant}{_norm_label(config)} {config.execution} batch {config.batch_size}"
        try:
            _cell_mode(module, config, done)
        except BackendUnavailable as exc:
            send({"kind": "bench_skipped", "message": f"{framework} {label} skipped: {exc}"})
            continue
        if config.dtype not in datasets:
            datasets[config.dtype] = load_fashion_mnist(
                job["data_dir"], verify=job["verify"], dtype=config.dtype, image_size=config.model.image_size
            )
        cells.append(_BenchCell(module, loops, config, datasets[config.dtype], job, f"{framework} {label}"))
    for r in range(job["repeats"]):
        for cell in cells:
            cell.repeat(r)
    for cell in cells:
        record = cell.record()
        send({"kind": "bench", "framework": framework, "peak_gflops_per_s": peak, "peak_matmul": PEAK_MATMUL, **record})
    return 0


def variant_label(spec: ModelSpec) -> str:
    """A benchmark row's variant: the spec's, with ", closed-form" where the scratch BN layer's backward is written
    out (--norm-backward), so that the two forms are never mistaken for each other in a table."""
    return spec.variant + (", closed-form" if spec.norm_backward == "closed-form" else "")


def _cell_mode(module, config: RunConfig, done: dict) -> tuple:
    """(the name of the mode a benchmark cell runs in, remembered in `done`; the name of its device), from one
    backend. BackendUnavailable skips the cell, not the rest: a mode this framework lacks (or cannot run here), or
    another name for a mode already measured (JAX's xla is its jit, MXNet's default its hybridized)."""
    backend = module.BACKEND(config)
    mode = backend.execution_name()
    key = (config.model.norm, config.model.variant, config.batch_size, mode)
    if key in done:
        raise BackendUnavailable(f"it runs {mode}, measured above as --execution {done[key]}")
    done[key] = config.execution
    return mode, backend.device_info()[1]


def _norm_label(config: RunConfig) -> str:
    return "" if config.model.norm == "batch" else f" --norm {config.model.norm}"


def _bench_config(cell: dict, job: dict) -> RunConfig:
    """One benchmark cell's run: one epoch of train_limit images, a short evaluation, no population pass."""
    norm = cell.get("norm", "batch")
    model = ModelSpec(
        variant=cell["variant"],
        norm=norm,
        image_size=job.get("image_size", 28),
        norm_backward=job.get("norm_backward", "autodiff") if norm == "batch" else "autodiff",
        **({"norm_positions": ("conv1", "conv2")} if norm == "instance" else {}),
    )
    return RunConfig(
        model=model,
        epochs=1,
        batch_size=cell["batch_size"],
        execution=cell["execution"],
        device=job["device"],
        train_limit=job["train_limit"],
        test_limit=1000,
        probe_size=64,
        population_size=0,
    )


class _BenchCell:
    """One benchmark cell: the suite's loop, the bare and the textbook loop (and with --population-size the suite's
    two-epoch runs with the population pass), timed one repeat at a time, the loops alternating (the order
    rotating each repeat); `record` gives each loop's median examples/s and every repeat's figure, the suite's
    first steps and the population runs."""

    def __init__(self, module, loops: dict, config: RunConfig, dataset, job: dict, label: str):
        self.config, self.loops, self.label = config, loops, label
        self.population_size = job.get("population_size", 0)  # > 0: a fourth loop, the suite with the pass
        self.described = {}
        self.epochs = {"suite": [], "population": []}  # each suite run's epoch records
        # the population pass as a run has it: two epochs (the second's figures are without the first's
        # compilation), the whole test set and the run's probe
        defaults = RunConfig()
        with_population = config.replace(
            population_size=self.population_size,
            epochs=2,
            test_limit=defaults.test_limit,
            probe_size=defaults.probe_size,
        )

        def suite(config=config, kept=self.epochs["suite"]):
            got = []
            run_loop(
                module.BACKEND,
                config,
                dataset,
                lambda record, arrays=None: (
                    got.append(record)
                    if record["kind"] == "epoch"
                    else self.described.update(record.get("backend", {}))
                ),
            )
            kept.append(got)
            return got[-1]["train_examples_per_s"]

        self.measure = {
            "suite": suite,
            "bare": lambda: loops["bare"].epoch(config, dataset)[0],
            "textbook": lambda: loops["textbook"].examples_per_second(config, dataset),
            "population": lambda: suite(with_population, self.epochs["population"]),
        }
        self.figures = {name: [] for name in self.measure}
        # a model without running statistics has no population pass (common.population)
        with_pass = self.population_size and config.model.has_population
        self.names = LOOPS + (("population",) if with_pass else ())

    def repeat(self, r: int) -> None:
        names = self.names[r % len(self.names) :] + self.names[: r % len(self.names)]
        for name in names:
            gc.collect()  # each loop starts on a clean heap: none pays for the garbage of the one before it
            self.figures[name].append(self.measure[name]())
        figures = ", ".join(f"{n} {self.figures[n][-1]:,.0f}" for n in self.names)
        send({"kind": "bench_repeat", "message": f"{self.label} repeat {r + 1}: {figures} ex/s"})

    def record(self) -> dict:
        config, epochs, figures = self.config, self.epochs, self.figures
        return {
            "norm": config.model.norm,
            "variant": variant_label(config.model),
            "execution": config.execution,
            "execution_name": self.described.get("execution"),
            "batch_size": config.batch_size,
            "image_size": config.model.image_size,
            "device_name": self.described.get("device_name"),
            **{f"{name}_examples_per_s": float(np.median(figures[name])) for name in LOOPS},
            **{f"{name}_all": figures[name] for name in LOOPS},
            "suite_first_step_seconds": [run[0]["first_step_seconds"] for run in epochs["suite"]],
            # with --population-size: each two-epoch run's population pass (its own time, per epoch) and its
            # epochs' time without it (training, warm-up included, and the test evaluation)
            "population_size": self.population_size,
            "population_seconds": [[e["population_seconds"] for e in run] for run in epochs["population"]],
            "population_epoch_seconds": [
                [e["train_seconds"] + e["eval_seconds"] for e in run] for run in epochs["population"]
            ],
            "population_all": figures.get("population", []),  # the second epochs' training examples/s
            "bare": self.loops["bare"].DESCRIPTION,
            "textbook": self.loops["textbook"].DESCRIPTION,
            # the cells took turns within each repeat: the r-th figures of two cells were measured side by side
            "interleaved": True,
        }


def layer(job: dict) -> int:
    """compare.bench --layer: each cell's normalisation layer alone, training-mode forward and backward, on the
    inputs of BN-LeNet's bn1 and bn2 at the job's image size and the cell's batch size (frameworks/<fw>/bare.py
    norm_step), and a STREAM triad (triad_step) and numpy's add as large as each input; every layer of every
    cell and the memory kernels timed in alternation, `repeats` rounds (common.roofline.time_alternating). One
    record per cell and layer, with its minimal traffic and the memory kernels'."""
    framework = job["framework"]
    module, bare = load_backend_module(framework), load_backend_module(framework, "bare")
    steps, kept, done = {}, [], {}
    for cell in job["cells"]:
        config = _bench_config(cell, job)
        label = f"{config.model.variant}{_norm_label(config)} {config.execution} batch {config.batch_size}"
        try:
            mode, device = _cell_mode(module, config, done)
            for name, shape in norm_input_shapes(config.model, config.batch_size).items():
                steps[(label, name)], _ = bare.norm_step(config, shape)
                steps.setdefault(("triad", name), bare.triad_step(config, int(np.prod(shape))))
                steps.setdefault(("add", name), numpy_add(int(np.prod(shape)), config.dtype))
                kept.append((label, name, shape, config, mode, device))
        except BackendUnavailable as exc:
            send({"kind": "bench_skipped", "message": f"{framework} {label} skipped: {exc}"})
    send({"kind": "bench_repeat", "message": f"{framework}: {len(steps)} steps x {job['repeats']} rounds"})
    seconds = time_alternating(steps, job["repeats"])
    for label, name, shape, config, mode, device in kept:
        send(
            {
                "kind": "layer",
                "framework": framework,
                "norm": config.model.norm,
                "variant": variant_label(config.model),
                "execution": config.execution,
                "execution_name": mode,
                "batch_size": config.batch_size,
                "image_size": config.model.image_size,
                "dtype": config.dtype,
                "device_name": device,
                "layer": name,
                "shape": list(shape),
                "layer_bytes": norm_bytes(shape, config.dtype),
                "triad_bytes": triad_bytes(int(np.prod(shape)), config.dtype),
                "seconds_all": seconds[(label, name)],
                "triad_seconds_all": seconds[("triad", name)],
                "add_seconds_all": seconds[("add", name)],
            }
        )
    return 0


def port(job: dict) -> int:
    """compare.port's evaluations, in this framework: for each task, canonical parameters (an npz of param/*
    arrays) loaded into the model its configuration describes, and the test set's logits in eval mode; a task may
    ask for the layers' own default epsilon ("epsilon": "default"), train mode ("mode": "train"), or one epoch of
    fine-tuning from those parameters first ("finetune": true; common.port), or the model exported to ONNX ("onnx":
    true). One "port" record per task (its test accuracy, and its logits written to out/logits/FRAMEWORK_NAME.npz;
    then a "port_onnx" record where asked), then, for the tasks marked "time",
    `repeats` rounds of a timed eval-mode pass over the test set each, alternating (the order rotating each round,
    a garbage collection, untimed, before each): one "port_time" record per task with its examples/s per round. A
    task that fails is recorded with its error; the others go on."""
    framework, out = job["framework"], Path(job["out"])
    module = load_backend_module(framework)
    datasets, timed = {}, []
    for task in job["tasks"]:
        config = RunConfig.from_dict(task["config"])
        try:
            key = (config.dtype, config.model.input_size, config.model.image_size)
            if key not in datasets:
                datasets[key] = load_fashion_mnist(
                    job.get("data_dir"),
                    verify=job.get("verify", True),
                    dtype=config.dtype,
                    input_size=config.model.input_size,
                    image_size=config.model.image_size,
                )
            backend, logits, labels = _port_task(module, task, config, datasets[key])
            path = Path("logits") / f"{framework}_{task['name']}.npz"
            save_npz(out / path, {"logits": logits})
            send(
                {
                    "kind": "port",
                    "framework": framework,
                    "name": task["name"],
                    "test_acc": float(np.mean(logits.argmax(axis=1) == labels)),
                    "logits": str(path),
                    "execution": backend.execution_name(),
                    "epsilon": backend.describe().get("bn_epsilon"),
                }
            )
            if task.get("onnx"):
                send(_export_onnx(framework, backend, task["name"], out, task.get("opset")))
            if task.get("time"):
                test = backend.put(datasets[key].test_images[: len(labels)], labels)
                backend.evaluate(test, config.eval_batch_size)  # a compiled mode compiles here, untimed
                timed.append((task["name"], backend, test, len(labels), config.eval_batch_size))
        except Exception as exc:  # this task's evaluation only; a model this framework cannot build is refused
            refused = isinstance(exc, (BNCompareError, BackendUnavailable))
            send(
                {
                    "kind": "port",
                    "framework": framework,
                    "name": task["name"],
                    "error": f"{type(exc).__name__}: {exc}",
                    "refused": refused,
                }
            )
    rounds = {name: [] for name, *_ in timed}
    for r in range(job.get("repeats", 0) if timed else 0):
        for name, backend, test, count, size in timed[r % len(timed) :] + timed[: r % len(timed)]:
            gc.collect()
            backend.synchronize()
            start = time.perf_counter()
            backend.evaluate(test, size)
            backend.synchronize()
            rounds[name].append(count / (time.perf_counter() - start))
    for name, figures in rounds.items():
        send({"kind": "port_time", "framework": framework, "name": name, "examples_per_s": figures})
    return 0


def onnx_import(job: dict) -> int:
    """compare.port --onnx-import: each exported model (job["files"]: name, path under out, layout, input_size,
    image_size, count) converted into PyTorch (frameworks/torch/onnx_import.py) and run on the first `count` test
    images: an "onnx_import" record per file with its logits written to out/logits/NAME_onnx2torch.npz, or the
    error where it does not convert or run."""
    importer = importlib.import_module("frameworks.torch.onnx_import")
    out, datasets = Path(job["out"]), {}
    for item in job["files"]:
        record = {"kind": "onnx_import", "name": item["name"]}
        try:
            key = (item["input_size"], item["image_size"])
            if key not in datasets:
                datasets[key] = load_fashion_mnist(
                    job.get("data_dir"), verify=job.get("verify", True), input_size=key[0], image_size=key[1]
                )
            images = datasets[key].test_images[: item["count"]]
            logits = importer.logits(str(out / item["path"]), images, item["layout"])
            path = Path("logits") / f"{item['name']}_onnx2torch.npz"
            save_npz(out / path, {"logits": logits})
            send({**record, "logits": str(path), "importer": importer.importer()})
        except Exception as exc:  # onnx2torch's own words: this model does not come back into PyTorch
            send({**record, "error": in_words(exc)})
    return 0


def _export_onnx(framework: str, backend, name: str, out: Path, opset: int | None) -> dict:
    """The task's model exported to out/onnx/ (Backend.export_onnx): a "port_onnx" record with the file, the
    exporter and the input's layout, or the exporter's error where it cannot export the model (its reason)."""
    path = Path("onnx") / f"{name}.onnx"  # the task's name begins with its framework's
    (out / path).parent.mkdir(parents=True, exist_ok=True)
    record = {"kind": "port_onnx", "framework": framework, "name": name}
    try:
        return {**record, "path": str(path), **backend.export_onnx(str(out / path), opset)}
    except Exception as exc:  # the exporter's own words are the measured reason
        (out / path).unlink(missing_ok=True)
        return {**record, "error": in_words(exc)}


def _port_task(module, task: dict, config: RunConfig, data) -> tuple:
    """(the backend holding the task's parameters, its test logits, the test labels)."""
    with np.load(task["params"]) as arrays:
        params = {k[len("param/") :]: arrays[k] for k in arrays.files if k.startswith("param/")}
    if task.get("epsilon") == "default":  # the epsilon of the target's layer as its constructor makes it
        defaults = config.replace(model=replace(config.model, variant="builtin-defaults"))
        _, epsilon = module.BACKEND(defaults).default_norm_constants()
        config = config.replace(model=replace(config.model, epsilon=epsilon))
    if task.get("finetune"):  # one epoch in this framework from the ported parameters; its final ones evaluated
        trained = {}

        def keep(record, arrays=None):
            if arrays:
                trained.update({k[len("param/") :]: v for k, v in arrays.items() if k.startswith("param/")})

        run_loop(module.BACKEND, config.replace(epochs=1, population_size=0), data, keep, initial=params)
        params = trained
    images = data.test_images[: config.test_limit or None]
    labels = data.test_labels[: config.test_limit or None]
    backend = module.BACKEND(config)
    backend.set_params(params)
    size = config.eval_batch_size
    if task.get("mode") == "train":  # every test batch normalised with its own statistics
        forward = [backend.train_mode_forward(images[i : i + size], False)[0] for i in range(0, len(labels), size)]
    else:
        forward = [backend.predict(images[i : i + size]) for i in range(0, len(labels), size)]
    return backend, np.concatenate(forward), labels


def main() -> int:
    # Everything a framework prints goes to stderr, so stdout carries records only.
    sys.stdout = sys.stderr
    signal.signal(signal.SIGTERM, _terminate)
    job = json.loads(sys.stdin.read())
    try:
        return run_job(job)
    except KeyboardInterrupt:  # the runner forwards SIGINT/SIGTERM and records what was unfinished
        print("worker: interrupted", file=sys.stderr)
        return 130


def run_job(job: dict) -> int:
    if job.get("mode") == "bench":
        return bench(job)
    if job.get("mode") == "onnx_import":
        return onnx_import(job)
    if job.get("mode") == "port":
        return port(job)
    if job.get("mode") == "layer":
        return layer(job)
    framework, out = job["framework"], Path(job["out"])
    configs = [RunConfig.from_dict(c) for c in job["configs"]]
    try:
        module = load_backend_module(framework)
        if hasattr(module, "prepare"):  # process-wide settings that must precede the framework's start (JAX)
            module.prepare(configs, job)  # the job's options: where the replicas go (compare.execution.choose)
        info = framework_info(framework)
        send(
            records.make(
                "worker",
                framework=framework,
                pid=os.getpid(),
                python=sys.version.split()[0],
                executable=sys.executable,
                numpy=np.__version__,
                platform=platform.platform(),
                framework_version=getattr(sys.modules[info.import_name], "__version__", None),
            )
        )
    except Exception as exc:  # the whole framework is unavailable: every config fails
        for config in configs:
            send(error_record(framework, config, exc, "failed"))
        return 1
    status = 0
    datasets = {}  # (dtype, input_size, image_size) -> Dataset, read once per worker
    final_only = job.get("snapshots", "all") == "final"  # a study keeps the last epoch's snapshot only
    for config in configs:

        def emit(record, arrays=None, config=config):
            if arrays is not None:
                if final_only and record["epoch"] != config.epochs:
                    record = {**record, "snapshot": None}
                else:
                    save_npz(out / record["snapshot"], arrays)
            send(record)

        started = False  # set once the first training step is queued: later errors are crashes

        def progress(epoch, step, steps, config=config):
            nonlocal started
            started = True
            if step == steps or step % 10 == 0:
                send(
                    {
                        "kind": "progress",
                        "framework": framework,
                        "variant": config.model.variant,
                        "seed": config.seed,
                        "config_id": config.config_id,
                        "epoch": epoch,
                        "epochs": config.epochs,
                        "step": step,
                        "steps": steps,
                        "time": time.time(),
                    }
                )

        print(
            f"worker {framework} (pid {os.getpid()}): {config.model.variant} seed {config.seed} "
            f"({config.config_id}) starting",
            file=sys.stderr,
            flush=True,
        )
        try:
            key = (config.dtype, config.model.input_size, config.model.image_size)
            if key not in datasets:
                datasets[key] = load_fashion_mnist(
                    job.get("data_dir"),
                    verify=job.get("verify", True),
                    dtype=config.dtype,
                    input_size=config.model.input_size,
                    image_size=config.model.image_size,
                )
            run_loop(module.BACKEND, config, datasets[key], emit, progress)
        except Exception as exc:
            send(error_record(framework, config, exc, "crashed" if started else "failed"))
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
