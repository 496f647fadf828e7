"""`ldm grid`: AUTOMATIC1111's X/Y/Z plot over `ldm generate`'s options.

The command takes every `ldm generate` option as the base settings of its cells (its signature
is generate's, less what means nothing in a grid) plus `--x/--y/--z NAME=VALUES`. Each cell is
the request `ldm generate` builds from the same options (`generate.job_batches`), rendered by
the same `render_text_to_image`, saved as the same PNG: the cells are the images the single
commands give, bit for bit. The model is loaded once (once per value of a `clip_skip` or
`refiner_switch` axis: they are set when the model loads). The syntax lives in ldm_cli.grid;
docs/grid.md has examples.
"""

from __future__ import annotations

import inspect
import sys
import typing
from contextlib import contextmanager
from dataclasses import replace

import typer

from ldm_cli.cli import generate as generate_command
from ldm_cli.core.errors import UserError
from ldm_cli.core.limits import check_side, random_seed

# generate's options that mean nothing in a grid: a cell is one image of one prompt
NOT_IN_A_GRID = ("prompts_file", "from_png", "resume", "num_images", "batch_size")
# options the model is loaded with: an axis over one loads the model once per value
LOAD_OPTIONS = ("clip_skip", "refiner_switch")
AXIS_HELP = (
    "X axis (columns): NAME=VALUES over one generate option, in A1111's X/Y/Z plot syntax: "
    "steps=10,20,30, cfg=5-9 (+2), seed=1-100 [4], sampler=euler,dpmpp_2m, "
    "prompt=cat,dog (Prompt S/R). Names: prompt, seed, steps, cfg, sampler, scheduler, width, "
    "height, negative-prompt, eta, rescale-cfg, guidance, clip-skip, hires-scale, "
    "hires-strength, hires-steps, hires-upscaler, deep-cache, token-merging, refiner-switch "
    "(or A1111's labels). See docs/grid.md."
)


def grid(**options) -> None:
    """Render a labelled X/Y/Z grid of images, one cell per combination of the axes' values:
    each cell saved as the PNG `ldm generate` writes for its settings, then the grid (one grid
    image per Z value)."""
    ctx = options.pop("ctx")
    prompt = options.pop("prompt")
    specs = [options.pop(name) for name in ("x", "y", "z")]
    from ldm_cli.grid import AXIS_FLAGS, check_axes, check_prompt_axis, grid_cells, parse_axis

    if all(spec is None for spec in specs):
        raise UserError("give at least one axis: --x, --y or --z NAME=VALUES")
    pairs = zip(specs, AXIS_FLAGS, strict=True)
    axes = [parse_axis(s, f) if s is not None else None for s, f in pairs]
    check_axes(axes)
    check_prompt_axis(axes, prompt, options["negative_prompt"])
    seed = options["seed"]  # None: none given, or -1; drawn once for every cell, as A1111
    drawn_seed = random_seed() if seed is None else None
    base = {**options, "prompt": prompt, "seed": drawn_seed if seed is None else seed}
    pairs_with = {"refiner_switch", "hires_strength", "hires_steps", "hires_upscaler"}
    given = generate_command._given(ctx, pairs_with)
    given |= {axis.option for axis in axes if axis is not None}
    cells = grid_cells(axes)
    from ldm_cli.cli.control import control_options
    from ldm_cli.cli.model_parts import part_files
    from ldm_cli.cli.performance import Performance

    controls = control_options(
        base["control"], base["control_image"], base["preprocess"], base["control_weight"],
        base["control_start"], base["control_end"], base["control_mode"],
    )  # fmt: skip
    performance = Performance.checked(
        base["model"], compile=base["use_compile"], offload=base["offload"],
        preview=base["preview"], preview_every=base["preview_every"],
        vae_tiling=base["vae_tiling"], deep_cache=base["deep_cache"],
        token_merging=base["token_merging"], low_memory=base["low_memory"],
        cuda_graphs=base["cuda_graphs"],
        parts=part_files(base["vae"], base["clip_l"], base["clip_g"], base["t5"]),
    )  # fmt: skip
    from ldm_cli.grid import cell_options

    settings = [cell_options(cell, axes, base) for cell in cells]
    checked = [check_cell(o, given, performance) for o in settings]
    from ldm_cli.cli.batch_resume import check_output_dir

    check_output_dir(base["out"])
    from ldm_cli.grid import rebuild_command

    command = rebuild_command(sys.argv[1:], drawn_seed, axes)
    images, texts = _render_cells(base, settings, checked, controls, performance)
    _save_grids(images, texts, axes, base, command)


def check_cell(o: dict, given: set[str], performance):
    """Generate's checks of one cell's options (before anything loads); its Performance (a
    deep_cache or token_merging axis changes it) and hires fix."""
    generate = generate_command
    generate.check_options(o["sampler"], o["scheduler"], o["steps"], 1, 1, o["device"], o["dtype"])
    generate.check_model_options(o["prediction"], o["clip_skip"])
    check_side(o["width"], "--width")
    check_side(o["height"], "--height")
    generate.check_pairings(given, o["refiner"], o["refiner_switch"], o["hires_scale"], None)
    cell_performance = replace(
        performance, deep_cache=o["deep_cache"], token_merging=o["token_merging"]
    )
    if cell_performance != performance:
        cell_performance.check()
    hires = None
    if o["hires_scale"] is not None:
        hires = generate.hires_fix(
            o["hires_scale"], o["hires_strength"], o["hires_steps"], o["hires_upscaler"]
        )
    return cell_performance, hires


def _request(pipe, o: dict, performance, controls: dict):
    """The cell's request, as `ldm generate` builds it from the same options."""
    options = generate_command.request_options(
        performance, controls, negative_prompt=o["negative_prompt"], steps=o["steps"],
        cfg=o["cfg"], seed=o["seed"], sampler=o["sampler"], scheduler=o["scheduler"],
        width=o["width"], height=o["height"], rescale_cfg=o["rescale_cfg"],
        guidance=o["guidance"], eta=o["eta"], num_images=1, batch_size=1,
    )  # fmt: skip
    ((req,),) = generate_command.job_batches(pipe, o["prompt"], options)
    return req


def _load(base: dict, performance, key: tuple):
    clip_skip, refiner_switch = key
    return generate_command.load_pipeline(
        performance, base["model"], base["device"], base["dtype"],
        prediction=base["prediction"], clip_skip=clip_skip, refiner=base["refiner"],
        refiner_switch=refiner_switch, lora=base["lora"], lora_dir=base["lora_dir"],
        embeddings=base["embeddings"],
    )  # fmt: skip


def _render_cells(base: dict, settings: list[dict], checked: list, controls: dict, performance):
    """Render and save every cell, the model loaded once per value of LOAD_OPTIONS; every
    cell's request is built and checked against the model before the first renders.
    Returns each cell's image and parameters text, by cell index."""
    groups: dict = {}
    for index, o in enumerate(settings):
        groups.setdefault(tuple(o[name] for name in LOAD_OPTIONS), []).append(index)
    first = next(iter(groups))
    pipe = _load(base, performance, first)
    requests = [_request(pipe, o, c[0], controls) for o, c in zip(settings, checked, strict=True)]
    if controls:
        from ldm_cli.cli.control import check_control_files

        check_control_files(pipe, requests[0])
    for hires in {hires for _, hires in checked if hires is not None}:
        hires.network(pipe.device)  # a bad --hires-upscaler file fails before any sampling
    images, texts = {}, {}
    with _progress(len(settings)) as (on_step, advance):
        for key, indices in groups.items():
            if key != first:
                pipe = None  # the previous model goes before the next one loads
                pipe = _load(base, performance, key)
                for i in indices:
                    requests[i] = _request(pipe, settings[i], checked[i][0], controls)
            for i in indices:
                last = i == indices[-1]
                pairs = pipe.render_text_to_image([requests[i]], on_step, checked[i][1], last)
                ((req, image),) = list(pairs)
                texts[i] = image.info["parameters"]
                _save(image, base["out"], req.seed, req.prompt, texts[i])
                images[i] = image
                advance()
    return images, texts


def _save(image, out, seed: int | None, prompt: str, text: str) -> None:
    from ldm_cli.cli.outputs import print_written, save_png_atomic
    from ldm_cli.core.interrupts import interrupt_after

    with interrupt_after():  # Ctrl-C: what is on disk is what was printed
        print_written(save_png_atomic(image, out, seed, prompt, text))


@contextmanager
def _progress(total: int):
    """A bar of cells and one of the current cell's steps (on a terminal), as generate's."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn())
    with Progress(
        *columns, TimeElapsedColumn(), transient=True, disable=not sys.stderr.isatty()
    ) as bar:
        cells = bar.add_task("cells", total=total)
        steps = bar.add_task("steps", total=None)

        def on_step(i: int, count: int) -> None:
            bar.update(steps, completed=i, total=count)

        yield on_step, lambda: bar.advance(cells)


def _save_grids(images: dict, texts: dict, axes: list, base: dict, command: str) -> None:
    """One labelled grid image per Z value, after its cells."""
    from ldm_cli.grid import draw_grid, grid_parameters

    nx, ny, nz = (len(axis.values) if axis is not None else 1 for axis in axes)
    x_axis, y_axis, z_axis = axes
    x_labels = [x_axis.label(i) for i in range(nx)] if x_axis is not None else []
    y_labels = [y_axis.label(i) for i in range(ny)] if y_axis is not None else []
    for z in range(nz):
        first = nx * ny * z  # cells run X fastest, then Y, then Z
        rows = [[images[first + nx * y + x] for x in range(nx)] for y in range(ny)]
        title = z_axis.label(z) if z_axis is not None else None
        image, _ = draw_grid(rows, x_labels, y_labels, title)
        z_index = z if z_axis is not None else None
        text = grid_parameters(texts[first], axes, command, z_index)
        _save(image, base["out"], None, f"grid {base['prompt']}", text)


def _signature() -> tuple[inspect.Signature, dict]:
    """generate's parameters less NOT_IN_A_GRID, a required PROMPT and the three axes."""
    command = generate_command.generate
    hints = typing.get_type_hints(command)
    keyword = inspect.Parameter.KEYWORD_ONLY
    prompt = inspect.Parameter(
        "prompt",
        keyword,
        default=typer.Argument(..., help="The prompt of every cell (a prompt axis edits it)."),
        annotation=str,
    )
    axes = [
        inspect.Parameter(
            name,
            keyword,
            default=typer.Option(None, f"--{name}", help=help_text),
            annotation=str | None,
        )
        for name, help_text in (
            ("x", AXIS_HELP),
            ("y", "Y axis (rows): NAME=VALUES, as --x."),
            ("z", "Z axis, one grid image per value: NAME=VALUES, as --x."),
        )
    ]
    kept = [
        p.replace(kind=keyword, annotation=hints[p.name])
        for p in inspect.signature(command).parameters.values()
        if p.name not in (*NOT_IN_A_GRID, "prompt")
    ]
    parameters = [kept[0], prompt, *axes, *kept[1:]]  # kept[0]: the typer.Context
    annotations = {p.name: p.annotation for p in parameters}
    return inspect.Signature(parameters, return_annotation=None), annotations


grid.__signature__, grid.__annotations__ = _signature()
