"""`ldm eval`: how well a shapes model follows held-out prompts."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer

from ldm_cli.cli.networks import EMBEDDINGS, LORA, LORA_DIR
from ldm_cli.core.errors import UserError
from ldm_cli.core.limits import check_seed

CHECKS = ("background", "colour", "shape", "place", "size", "scene")


def eval_command(
    model: Path | None = typer.Option(None, "--model", "-m", help="Checkpoint; default: embedded."),
    num: int | None = typer.Option(
        None, "--num", help="Number of evaluation prompts (default 200; with --concept 20)."
    ),
    mix: str = typer.Option(
        "grammar",
        "--mix",
        help="grammar: prompts drawn as the dataset's, with the colour-shape pairs held out of "
        "training at the grammar's own rate (1 object in 8); half: half the prompts have one.",
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of the prompt set and of the images."),
    train_seed: int = typer.Option(
        0, "--train-seed", help="--seed of the shapes dataset the model was trained on."
    ),
    train_num: int = typer.Option(
        20000,
        "--train-num",
        help="--num of that dataset (default: the embedded model's). Its scenes are left out of "
        "the prompts, so every prompt is new to the model; 0 leaves nothing out.",
    ),
    steps: int = typer.Option(30, "--steps", help="Sampling steps."),
    cfg: float | None = typer.Option(
        None, "--cfg", help="Guidance scale (default: the checkpoint's own, else 7.5)."
    ),
    sampler: str = typer.Option("euler_a", "--sampler", help="Sampler name (see generate)."),
    batch_size: int = typer.Option(16, "--batch-size", "-b", help="Prompts rendered together."),
    json_out: Path | None = typer.Option(None, "--json", help="Write the full report here."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or mps."),
    clip_tower: Path | None = typer.Option(
        None,
        "--clip-tower",
        help="Image tower for the CLIP score; default: the one beside the model, if any.",
    ),
    control: Path | None = typer.Option(
        None,
        "--control",
        help="Measure a ControlNet instead (weights/ldm-shapes-canny.safetensors): held-out "
        "scenes rendered exactly, their control maps (--preprocess) given with the caption; "
        "per object the IoU of its pixels with the scene's, with and without the ControlNet.",
    ),
    preprocess: str = typer.Option("canny", "--preprocess", help="The ControlNet's maps."),
    concept: str | None = typer.Option(
        None,
        "--concept",
        help="Measure a new concept instead (`ldm dataset concept`: a cross named by WORD), "
        "learned by --lora or an embedding in --embeddings: held-out one-object prompts with "
        "WORD; a case passes when a region of the prompt's colour at its place matches the "
        "cross's template best of the five shapes, with IoU >= 0.75.",
        metavar="WORD",
    ),
    lora: list[str] = LORA,
    lora_dir: Path = LORA_DIR,
    embeddings: Path | None = EMBEDDINGS,
) -> None:
    """Render held-out and in-distribution shapes prompts and score them by pixel analysis
    (background colour, each object's colour, shape, place and size), plus the in-domain CLIP
    score from the image tower trained with the model's text encoder."""
    from ldm_cli.cli.generate import SAMPLER_HELP

    if sampler not in SAMPLER_HELP:
        raise UserError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLER_HELP)}")
    from ldm_cli.data.shapes import EVAL_MIXES

    if mix not in EVAL_MIXES:
        raise UserError(f"unknown --mix {mix!r}; choose one of {', '.join(EVAL_MIXES)}")
    if num is None:
        num = 20 if concept is not None else 200
    if concept is not None:
        from ldm_cli.data.concept import check_word

        if control is not None:
            raise UserError("--concept and --control measure different things; give one")
        try:
            check_word(concept)
        except ValueError as e:
            raise UserError(f"--concept: {e}") from None
    if num < 1 or steps < 1 or batch_size < 1:
        raise UserError("--num, --steps and --batch-size must be at least 1")
    if train_num < 0:
        raise UserError("--train-num must be 0 or more")
    check_seed(seed)
    from ldm_cli.cli.batch_resume import check_new_file, write_new_file

    if json_out:
        check_new_file(json_out, "--json")
    from rich.console import Console
    from rich.progress import Progress
    from rich.table import Table

    from ldm_cli.data.shapes import training_scenes
    from ldm_cli.evaluation.run_eval import evaluate
    from ldm_cli.pipeline.load import load

    if control is not None:
        from ldm_cli.control.preprocessors import check_preprocessor

        check_preprocessor(preprocess)
        if not control.exists():
            raise UserError(f"ControlNet not found: {control}")
    pipe = load(model, device=device)
    from ldm_cli.cli.networks import configure

    configure(pipe, lora, lora_dir, embeddings)  # LoRA and textual inversion (networks.lora)
    if concept is not None:
        adapters = {"lora": list(lora), "embeddings": str(embeddings) if embeddings else None}
        return _concept_eval(
            pipe, concept, num, seed, steps, cfg, sampler, batch_size, json_out, adapters
        )
    if control is not None:
        exclude = training_scenes(train_seed, train_num)
        return _control_eval(pipe, control, num, seed, steps, cfg, preprocess, exclude, json_out)
    cfg = pipe.guidance_scale(cfg)  # for the table's title
    scorer = _clip_scorer(clip_tower, pipe)
    with Progress(transient=True, disable=not sys.stderr.isatty()) as bar:
        task = bar.add_task("prompts", total=num)
        report = evaluate(
            pipe,
            num,
            seed,
            steps,
            cfg,
            sampler,
            batch_size,
            progress=lambda done, _: bar.update(task, completed=done),
            clip=scorer,
            mix=mix,
            exclude=training_scenes(train_seed, train_num),
        )
    title = f"ldm eval: {pipe.name}, {num} prompts ({mix} mix), {steps} steps, cfg {cfg}"
    table = Table(title=title)
    table.add_column("prompts")
    for check in CHECKS:
        table.add_column(check, justify="right")
    if scorer is not None:
        table.add_column("CLIP", justify="right")
        table.add_column("CLIP truth", justify="right")
    for group in ("all", "in_distribution", "heldout"):
        row = report[group]
        if not row["images"]:
            continue
        cells = [f"{100 * row[c]:.1f}%" for c in CHECKS]
        if scorer is not None:
            cells += [f"{row['clip_score']:.3f}", f"{row['clip_score_real']:.3f}"]
        table.add_row(f"{group} ({row['images']})", *cells)
    # wide enough for the whole table when redirected to a log
    Console(width=None if sys.stdout.isatty() else 120).print(table)
    if scorer is None:
        print("no CLIP score: no image tower beside the model (pass --clip-tower)")
    if json_out:
        write_new_file(json_out, json.dumps(report, indent=1))
        print(f"wrote {json_out}")


def _control_eval(pipe, control, num, seed, steps, cfg, preprocess, exclude, json_out) -> None:
    from rich.console import Console
    from rich.progress import Progress
    from rich.table import Table

    from ldm_cli.cli.batch_resume import write_new_file
    from ldm_cli.evaluation.control_eval import IOU_PASS, evaluate_control

    with Progress(transient=True, disable=not sys.stderr.isatty()) as bar:
        task = bar.add_task("sketches", total=num)
        report = evaluate_control(
            pipe, control, num, seed, steps, cfg, preprocess, exclude,
            progress=lambda done, _: bar.update(task, completed=done),
        )  # fmt: skip
    table = Table(
        title=f"ldm eval --control {control.name}: {num} held-out sketches, {steps} steps"
    )
    for column in ("with / without (objects)", f"IoU >= {IOU_PASS}, colour", "mean IoU", "colour"):
        table.add_column(column, justify="right")
    for name, row in report["summary"].items():
        table.add_row(
            f"{name} ({row['objects']})", f"{100 * row['pass_rate']:.1f}%",
            f"{row['mean_iou']:.3f}", f"{100 * row['colour_ok']:.1f}%",
        )  # fmt: skip
    Console(width=None if sys.stdout.isatty() else 120).print(table)
    if json_out:
        write_new_file(json_out, json.dumps(report, indent=1))
        print(f"wrote {json_out}")


def _concept_eval(
    pipe, word, num, seed, steps, cfg, sampler, batch_size, json_out, adapters
) -> None:
    from rich.progress import Progress

    from ldm_cli.cli.batch_resume import write_new_file
    from ldm_cli.evaluation.concept_eval import IOU_PASS, evaluate_concept

    with Progress(transient=True, disable=not sys.stderr.isatty()) as bar:
        task = bar.add_task("prompts", total=num)
        report = evaluate_concept(
            pipe, word, num, seed, steps, cfg,
            progress=lambda done, _: bar.update(task, completed=done),
            sampler=sampler, batch_size=batch_size,
        )  # fmt: skip
    settings = report["settings"]
    settings.update(adapters)
    used = [*adapters["lora"], *([adapters["embeddings"]] if adapters["embeddings"] else [])]
    print(
        f"ldm eval --concept {word}: {report['passed']}/{num} = "
        f"{100 * report['pass_rate']:.1f}% drew a {word} (cross) of the prompt's colour at its "
        f"place (template IoU >= {IOU_PASS}); {pipe.name}"
        f"{' + ' + ', '.join(used) if used else ', no adapter'}, {steps} steps, "
        f"cfg {settings['cfg']}"
    )
    if json_out:
        write_new_file(json_out, json.dumps(report, indent=1))
        print(f"wrote {json_out}")


def _clip_scorer(tower: Path | None, pipe):
    from ldm_cli.evaluation.clip_score import ClipScorer, find_clip_tower

    if tower is None:
        tower = find_clip_tower(pipe.path)
        if tower is None:
            return None
    elif not tower.is_file():
        raise UserError(f"--clip-tower {tower} does not exist")
    return ClipScorer(tower, pipe.text_encoder)
