"""Shared core of the teacher -> assistant -> student distillation toolkit.

`src.load_model(RUN_DIR)` (or `takd.load_model` after `pip install -e .`) returns a trained stage's model with its classes and
normalisation (see src/inference.py).
"""


def load_model(run_dir, stage: str | None = None, device="cpu", checkpoint: str | None = None):
    """A trained stage of a run folder: LoadedModel(model, classes, image_size, mean, std, ...), callable
    like its model; `stage` defaults to the run's final student (the same stage `python -m src.evaluate
    RUN` reads: `student`, or in a sweep the last path's student_via_...); `checkpoint` another file of
    the stage folder than its best-validation weights."""
    from .inference import load_model as _load  # here, so that `import src` (run by every submodule's import) stays light
    return _load(run_dir, stage, device=device, **({"checkpoint": checkpoint} if checkpoint else {}))
