"""python -m compare.reporting.images: every image of the guides (docs/images), drawn again from the committed
records in docs/measured by the current plotting code (compare.reporting.figures), and docs/images/manifest.json:
for each image, the folder it comes from and a hash of its inputs and of the code that draws it.
tests/test_docs.py checks that every image a guide shows is in the manifest, and that both hashes are today's.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MEASURED = ROOT / "docs" / "measured"
IMAGES = ROOT / "docs" / "images"
# the code an image depends on: the drawing, and the tables and words it draws from
CODE = (
    "compare/reporting/figures.py",
    "compare/reporting/images.py",
    "compare/studies/analysis.py",
    "compare/studies/summary.py",
    "compare/studies/spec.py",
    "compare/reporting/stats.py",
    "compare/reporting/tables.py",
)
# the inputs of a measured folder: its records and, for a study, its file
INPUTS = ("records.jsonl", "study.toml", "study.json", "environment.json", "port.json", "bench.json")

# image -> (measured folder, what to draw): each answer of docs/answers.md, then the guides' others
SOURCES = {
    f"answer-{name}.png": (name, "answer")
    for name in (
        "bias-before-bn",
        "lr-sweep",
        "bn-positions",
        "dropout-vs-bn",
        "frozen-gamma-beta",
        "research-norms",
        "bn-placement",
        "batch-size",
        "decay",
        "noisy-bn",
        "why-bn",
    )
}
SOURCES["divergence.png"] = ("population", "divergence")
SOURCES.update(
    {
        f"why-bn-{kind}-{act}.png": ("why-bn", f"trace {kind} {act}")
        for kind in ("landscape", "ics", "activations")
        for act in ("relu", "sigmoid")
    }
)


def digest(paths) -> str:
    """sha256 over the files' names and contents, in order (a missing file counts as its name only)."""
    h = hashlib.sha256()
    for path in paths:
        path = Path(path)
        h.update(path.name.encode())
        if path.is_file():
            h.update(path.read_bytes())
    return h.hexdigest()[:16]


def code_digest() -> str:
    return digest(ROOT / p for p in CODE)


def inputs_digest(folder: Path) -> str:
    return digest(Path(folder) / name for name in INPUTS)


def draw(image: str):
    """The matplotlib figure of one image of SOURCES, from its folder's records."""
    from ..studies import answers, spec
    from . import figures
    from .tables import load

    name, what = SOURCES[image]
    folder = MEASURED / name
    if what == "answer" or what.startswith("trace "):
        study = spec.load(folder / "study.toml", name=json.loads((folder / "study.json").read_text())["study"])
        t, _, _, _ = load(folder)
        if what.startswith("trace "):
            _, kind, activation = what.split()
            return figures.trace_figure(t, study, kind, activation)
        _, frames = answers.analyse(t["runs"], study)
        return figures.answer_figure(frames["study"], study)
    if what == "divergence":
        t, _, _, _ = load(folder)
        return figures.divergence_figure(t["epochs"])
    raise ValueError(f"{image}: nothing draws {what!r}")


def available() -> list:
    """The images of SOURCES whose measured folder exists."""
    return [image for image, (name, _) in SOURCES.items() if (MEASURED / name).is_dir()]


def main(argv=None) -> int:
    import matplotlib.pyplot as plt

    from . import figures
    from .files import atomic, write_json

    wanted = (sys.argv[1:] if argv is None else argv) or available()
    manifest_path = IMAGES / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    code = code_digest()
    for image in wanted:
        if image not in SOURCES:
            print(f"error: {image} is not an image this command draws; it draws: {', '.join(SOURCES)}", file=sys.stderr)
            return 2
        fig = draw(image)
        atomic(IMAGES / image, lambda p, fig=fig: fig.savefig(p, dpi=figures.DPI, format="png"))
        plt.close(fig)  # (the manifest's panel count below reads the closed figure's axes)
        name, _ = SOURCES[image]
        manifest[image] = {
            "source": f"docs/measured/{name}",
            "inputs": inputs_digest(MEASURED / name),
            "code": code,
            "panels": len(fig.get_axes()),
            "command": f"python -m compare.reporting.images {image}",
        }
        print(f"docs/images/{image}")
    write_json(manifest_path, dict(sorted(manifest.items())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
