"""The ``qtrainer`` command line (typer).

Exit codes: 0 success; 2 bad input (a one-paragraph message naming the key and where the bad
value came from: a command-line argument, a run file, a recipe file; no traceback unless
``--debug``); 1 failure (training error, interruption: the message says how to resume).

Only what a command needs is imported, when it runs: ``qtrainer --help`` and ``--version``
import neither torch nor Lightning.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional

import typer

from .cli_errors import EXIT_FAILURE, STATE, BadInput, fail, handle_errors
from .cli_checkpoints import INIT_ARG_HELP, MODEL_CLASS_HELP
from .cli_errors import overrides as _overrides
from .recipes import RecipeError

app = typer.Typer(
    name="qtrainer", add_completion=False, no_args_is_help=True, rich_markup_mode=None,
    pretty_exceptions_enable=False, context_settings={"help_option_names": ["-h", "--help"]},
    help="""Quantization-aware training (LSQ, NIPQ, noise tempering) with PyTorch Lightning.

\b
Examples:
  qtrainer run quickstart                         # offline demo, about a minute on a CPU
  qtrainer run my_run.yaml trainer.max_epochs=1 recipe.bits.weight=2
  qtrainer run my_run.yaml --resume               # continue an interrupted run
  qtrainer recipes                                # the available recipes
  qtrainer show lsq-4bit                          # a recipe, fully resolved
  qtrainer validate my_run.yaml
  qtrainer report runs/quickstart
""")
recipes_app = typer.Typer(
    add_completion=False, rich_markup_mode=None, pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]})
app.add_typer(recipes_app, name="recipes")

def _version(value: bool) -> None:
    if value:
        from . import __version__
        from .versions import package_versions

        v = package_versions()
        typer.echo(f"qtrainer {__version__} (torch {v['torch']}, lightning {v['lightning']}, "
                   f"python {v['python']})")
        raise typer.Exit()


@app.callback()
def main(debug: bool = typer.Option(False, "--debug", help="Show tracebacks on errors."),
         version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                      help="Print the versions of qtrainer, torch, Lightning "
                                           "and Python, and exit.")):
    """qtrainer: quantization-aware training with recipes."""
    STATE.update(debug=debug, arguments={})


def _lightning_logs() -> None:
    if not STATE["debug"]:
        from .lightning_setup import quiet_lightning

        quiet_lightning()


def _read(path: str) -> dict:
    from .run import read_run_file

    if not Path(path).exists():
        raise BadInput(f"file {path!r} does not exist")
    return read_run_file(path)


# ----------------------------------------------------------------------------- run


@app.command()
@handle_errors
def run(
    file: str = typer.Argument(..., metavar="FILE|NAME",
                               help="A run file (YAML), or the name of a shipped one "
                                    "(quickstart, cifar10_resnet20_lsq, ...)."),
    overrides: Optional[List[str]] = typer.Argument(
        None, metavar="KEY=VALUE",
        help="Dotted overrides across the run file (values are YAML)."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run from its "
                                "last checkpoints (at most the current epoch is lost)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Start again in an output folder "
                                   "that holds checkpoints of an earlier run."),
    output_dir: Optional[str] = typer.Option(None, "--output-dir", "-o", metavar="DIR",
                                             help="Override output_dir."),
    allow_recipe_change: bool = typer.Option(
        False, "--allow-recipe-change", help="With --resume: continue checkpoints written under "
        "another recipe (changed recipe keys or trainer.max_epochs); refused otherwise."),
):
    """Train: FP pretraining (or a checkpoint), then QAT with each recipe of the run file.

    Writes OUTPUT_DIR/run.yaml (the resolved run file), checkpoints/last.ckpt and best.ckpt,
    metrics.csv, logs/ (CSV, TensorBoard if installed), summary.json, plots/*.png and
    export/; further recipes of 'compare:' go to OUTPUT_DIR/compare/NAME/. Ends with a table
    of FP vs quantized accuracy, average bits, size and GBOPs.

    \b
    Examples:
      qtrainer run quickstart                 # a shipped run file, by name
      qtrainer run cifar10_resnet20_lsq data.root=/data/cifar10-jpeg
      qtrainer run run.yaml trainer.max_epochs=1 recipe.bits.weight=2 data.subset_per_class=50
      qtrainer run run.yaml --resume          # after Ctrl-C or a kill
      qtrainer run run.yaml recipe.optimizer.lr=0.001 --resume --allow-recipe-change
    """
    from .run import load_run_file, resolve_run_file
    from .run import run as run_config

    _lightning_logs()
    items = dict(_overrides(overrides))
    if output_dir is not None:
        items["output_dir"] = output_dir
    cfg = load_run_file(resolve_run_file(file), items)
    try:
        run_config(cfg, resume=resume, overwrite=overwrite,
                   allow_recipe_change=allow_recipe_change, echo=typer.echo)
    except SystemExit as e:  # Lightning turns Ctrl-C into sys.exit(1) after saving state
        args = " ".join([file, *(overrides or [])])
        fail(EXIT_FAILURE, f"interrupted; continue with: qtrainer run {args} --resume "
                            f"(output in {cfg.output_dir})", e)


# ----------------------------------------------------------------------------- recipes


@recipes_app.callback(invoke_without_command=True)
@handle_errors
def recipes(ctx: typer.Context):
    """List the available recipes: name, method, bits, description, source.

    Recipes come from the built-ins, the folders of $QTRAINER_RECIPE_PATH, the
    'qtrainer.recipes' entry points of installed packages and register_recipe().

    \b
    Examples:
      qtrainer recipes
      qtrainer recipes copy lsq-4bit my-lsq.yaml
    """
    if ctx.invoked_subcommand is not None:
        return
    from .recipes import list_recipes

    infos = list_recipes()
    rows = [("name", "method", "bits W/A", "source", "description")]
    for i in infos:
        desc = " ".join(i.description.split())
        act = "none" if i.act_bits is None else i.act_bits  # none: weights only
        bits = f"learned, {i.target}" if i.target else f"{i.weight_bits}/{act}"
        rows.append((i.name, i.method, bits, i.source,
                     desc if len(desc) <= 70 else desc[:67] + "..."))
    widths = [max(len(r[c]) for r in rows) for c in range(4)]
    for n, r in enumerate(rows):
        typer.echo("  ".join(r[c].ljust(widths[c]) for c in range(4)) + "  " + r[4])
        if n == 0:
            typer.echo("  ".join("-" * w for w in widths) + "  " + "-" * 11)


@recipes_app.command("copy")
@handle_errors
def recipes_copy(
    name: str = typer.Argument(..., metavar="NAME", help="A recipe name (or path)."),
    file: str = typer.Argument(..., metavar="FILE", help="Where to write the YAML."),
    new_name: Optional[str] = typer.Option(None, "--name", metavar="NAME",
                                           help="The copy's name (default: FILE's name "
                                                "without .yaml)."),
    force: bool = typer.Option(False, "--force", "-f", help="Replace an existing file."),
):
    """Write a recipe, fully resolved and renamed, to FILE to edit it.

    The copy is named after FILE (or --name), so that it can sit in a folder of
    $QTRAINER_RECIPE_PATH next to the original without a name clash.

    \b
    Examples:
      qtrainer recipes copy lsq-4bit my-lsq.yaml        # recipe 'my-lsq'
      qtrainer run my_run.yaml recipe=my-lsq.yaml
    """
    from .atomic import write_text_atomic
    from .recipes import load_recipe

    source = load_recipe(name)
    target = new_name if new_name is not None else Path(file).name.rsplit(".", 1)[0]
    try:
        load_recipe(target)
    except RecipeError as e:
        if e.key_path != "name" or "unknown recipe" not in e.detail:
            raise
    else:
        raise BadInput(f"a recipe named {target!r} exists already; give the copy another name "
                       f"with --name or another FILE name")
    try:
        recipe = load_recipe(source.to_dict(), overrides={"name": target})
    except RecipeError as e:
        raise BadInput(f"{target!r} cannot name a recipe ({e.detail}); pass --name") from None
    if Path(file).exists() and not force:
        raise BadInput(f"{file!r} exists; pass --force to replace it")
    Path(file).parent.mkdir(parents=True, exist_ok=True)
    text = f"# copy of recipe '{source.name}', renamed '{recipe.name}'\n"
    write_text_atomic(file, text + recipe.to_yaml())
    typer.echo(f"wrote {file} (recipe '{recipe.name}', a copy of '{source.name}')")


# ----------------------------------------------------------------------------- show, validate


@app.command()
@handle_errors
def show(
    ref: str = typer.Argument(..., metavar="NAME|FILE",
                              help="A recipe name, a recipe file or a run file."),
    overrides: Optional[List[str]] = typer.Argument(None, metavar="KEY=VALUE",
                                              help="Dotted overrides."),
):
    """Print a recipe (or a run file) fully resolved: extends, overrides and defaults applied.

    \b
    Examples:
      qtrainer show lsq-4bit
      qtrainer show nipq-mp-4bit mixed_precision.value=3
      qtrainer show quickstart trainer.max_epochs=2     # a shipped run file
    """
    from .recipes import load_recipe
    from .recipes.io import is_path_reference
    from .run import is_run_file, load_run_file, packaged_run_files

    items = _overrides(overrides)
    shipped = packaged_run_files()
    if not (is_path_reference(ref) or Path(ref).is_file()) and ref in shipped:
        ref = str(shipped[ref])  # a shipped run file by name
    if is_path_reference(ref) or Path(ref).is_file():
        raw = _read(ref)
        if is_run_file(raw):
            typer.echo(load_run_file(ref, items).to_yaml(), nl=False)
            return
    typer.echo(load_recipe(ref, overrides=items).to_yaml(), nl=False)


@app.command()
@handle_errors
def validate(
    file: str = typer.Argument(..., metavar="FILE", help="A run file or a recipe file."),
    overrides: Optional[List[str]] = typer.Argument(None, metavar="KEY=VALUE",
                                              help="Dotted overrides."),
):
    """Check a run file or recipe file without running it (exit 2 with the key on errors).

    Run files: besides every key, the classes named by model.class_path and data.class_path
    must import, and the recipes' layer patterns must match layers of the model (built
    without loading data, when the data section gives its input shape).

    \b
    Examples:
      qtrainer validate recipes/lsq_resnet18.yaml
      qtrainer validate my-recipe.yaml
    """
    from .recipes import load_recipe
    from .run import is_run_file, load_run_file, resolve_run_file
    from .run.layers import check_without_data

    items = _overrides(overrides)
    if not Path(file).is_file():
        file = str(resolve_run_file(file))
    raw = _read(file)
    if is_run_file(raw):
        cfg = load_run_file(file, items)
        note = check_without_data(cfg)
        names = ", ".join(f"{r.name} ({r.method.name}, {r.phases.epochs} epochs)"
                          for r in cfg.recipes)
        typer.echo(f"ok: run file {file}: recipes {names}; model "
                   f"{cfg.model.get('name') or cfg.model.get('class_path')}; data "
                   f"{cfg.data.get('name') or cfg.data.get('class_path')}; output "
                   f"{cfg.output_dir}; {note}")
    else:
        recipe = load_recipe(file, overrides=items)
        typer.echo(f"ok: recipe {recipe.name} ({recipe.method.name}, hash "
                   f"{recipe.content_hash()}) in {file}")


# ----------------------------------------------------------------------------- eval, export


@app.command("eval")
@handle_errors
def eval_(
    ckpt: str = typer.Argument(..., metavar="CKPT",
                       help="A checkpoint of a run (last.ckpt, best.ckpt, fp.ckpt), or with "
                            "--model-class any QAT checkpoint."),
    run_file: Optional[str] = typer.Option(None, "--run-file", metavar="FILE", help="Default: the run.yaml "
                                           "next to or above the checkpoint."),
    split: str = typer.Option("test", "--split", metavar="SPLIT", help="test or val."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    model_class: Optional[str] = typer.Option(None, "--model-class", metavar="PKG.MOD:CLASS",
                                              help=MODEL_CLASS_HELP),
    init_arg: Optional[List[str]] = typer.Option(None, "--init-arg", metavar="KEY=VALUE",
                                                 help=INIT_ARG_HELP),
    data: Optional[List[str]] = typer.Option(None, "--data", metavar="KEY=VALUE", help=(
        "With --model-class: a key of a run file's data section (repeatable), e.g. "
        "--data name=digits; default: the --run-file's data.")),
):
    """Evaluate a checkpoint: top-1/top-5 accuracy and loss of a classifier.

    A run's checkpoint is rebuilt from its run.yaml (data and model). With --model-class, a
    checkpoint written under QuantizationCallback is rebuilt as your class, quantized as saved
    (no example input needed), and evaluated on --data (or --run-file's data); its forward(x)
    must return logits.

    \b
    Examples:
      qtrainer eval runs/quickstart/checkpoints/best.ckpt
      qtrainer eval runs/quickstart/fp.ckpt --split val --json
      qtrainer eval last.ckpt --model-class my_pkg.models:LitNet --data name=npz-jpeg
      qtrainer eval last.ckpt --model-class my_pkg.models:LitNet --init-arg width=16 --run-file run.yaml
    """
    from .cli_checkpoints import evaluate_checkpoint

    _lightning_logs()
    out, recipe_name = evaluate_checkpoint(ckpt, run_file, split, model_class, init_arg, data)
    if as_json:
        typer.echo(json.dumps(out, indent=2))
    else:
        kind = f"quantized ({recipe_name})" if out["quantized"] else "full precision"
        typer.echo(f"{ckpt}: {kind}, {split} top-1 {100 * out['acc']:.2f}%, top-5 "
                   f"{100 * out['acc_top5']:.2f}%, loss {out['loss']:.4f}")


@app.command("export")
@handle_errors
def export_(
    ckpt: str = typer.Argument(..., metavar="CKPT", help="A QAT checkpoint of a run, or with "
                               "--model-class any QAT checkpoint."),
    format: str = typer.Option("int", "--format", "-f", metavar="FORMAT",
                               help="int | onnx | torchscript | exported_program"),
    output: Optional[str] = typer.Option(None, "--output", "-o", metavar="PATH",
                                         help="Default: RUN_DIR/export/model.<ext> (with "
                                              "--model-class: export/ next to CKPT)."),
    run_file: Optional[str] = typer.Option(None, "--run-file", metavar="FILE", help="Default: the run.yaml "
                                           "next to or above the checkpoint."),
    fold_bn: bool = typer.Option(False, "--fold-bn", help="Fold BatchNorm into conv weights."),
    model_class: Optional[str] = typer.Option(None, "--model-class", metavar="PKG.MOD:CLASS",
                                              help=MODEL_CLASS_HELP),
    init_arg: Optional[List[str]] = typer.Option(None, "--init-arg", metavar="KEY=VALUE",
                                                 help=INIT_ARG_HELP),
):
    """Export a quantized checkpoint (integer safetensors, QDQ ONNX, TorchScript, ExportedProgram).

    With --model-class the traced formats take their example input from the input shapes saved
    in the checkpoint.

    \b
    Examples:
      qtrainer export runs/quickstart/checkpoints/best.ckpt --format int
      qtrainer export runs/quickstart/checkpoints/best.ckpt --format onnx -o model.onnx
      qtrainer export last.ckpt --model-class my_pkg.models:LitNet --format onnx -o model.onnx
    """
    from .cli_checkpoints import export_checkpoint

    path, report = export_checkpoint(ckpt, format, output, run_file, fold_bn, model_class,
                                     init_arg)
    typer.echo(f"wrote {path} ({report.get('file_bytes', path.stat().st_size)} bytes, {format})")


# ----------------------------------------------------------------------------- report


@app.command()
@handle_errors
def report(
    run_dir: str = typer.Argument(..., metavar="RUN_DIR", help="A run's output folder."),
    plots: bool = typer.Option(True, "--plots/--no-plots", help="Rewrite the PNG plots."),
):
    """Print a finished run's table and (re)write its plots (needs matplotlib).

    \b
    Examples:
      qtrainer report runs/quickstart
    """
    from .report import report as make_report

    if not Path(run_dir).is_dir():
        raise BadInput(f"run folder {run_dir!r} does not exist")
    table, written, note = make_report(run_dir, plots=plots)
    typer.echo(table)
    for path in written:
        typer.echo(f"plot: {path}")
    if note:
        typer.echo(f"no plots: {note}")


def entry() -> None:  # pragma: no cover - python -m qtrainer.cli
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
