"""The `dppmg` command line: parse, load the config, call the library. No logic of its own.

dppmg <command> [CONFIG.yaml] [key=value ...]
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from dppmg import __version__
from dppmg.config import Config, load_config, to_yaml
from dppmg.errors import DppmgError
from dppmg.io import DISK_FULL, disk_full_message
from dppmg.log import logger, setup_logging

FORMATS = ("safetensors", "textual-inversion", "hf")  # stage2_generation.export.FORMATS, without its imports


def _config_args(args: Sequence[str]) -> tuple[str | None, list[str]]:
    """Split `[CONFIG.yaml] [key=value ...]`: the config file is the one argument without '='."""
    path, overrides = None, []
    for a in args:
        if "=" in a:
            overrides.append(a)
        elif path is None:
            path = a
        else:
            raise DppmgError(f"unexpected argument {a!r}: give one config file and key=value overrides")
    return path, overrides


def _sweep_run_name(overrides: list[str]) -> list[str]:
    """A trial that a W&B agent started (online sweeps) gets its own run folder, sweep-<sweep id>-<run id>,
    unless the command names one: the agent appends only the sweep's parameters."""
    sweep, run = os.environ.get("WANDB_SWEEP_ID"), os.environ.get("WANDB_RUN_ID")
    if not sweep or not run or any(o.split("=", 1)[0] == "run_name" for o in overrides):
        return overrides
    return [*overrides, f"run_name=sweep-{sweep}-{run}"]


def cmd_data_prepare(cfg: Config, ns: argparse.Namespace) -> None:
    from dppmg.data.prepare import prepare

    prepare(cfg, progress=not ns.quiet)


def cmd_data_stats(cfg: Config, ns: argparse.Namespace) -> None:
    from dppmg.data.format import load_dataset
    from dppmg.data.stats import format_stats, write_stats

    ds = load_dataset(cfg.data.processed_dir)
    out = cfg.data.processed_dir / "stats"
    stats = write_stats(ds, out, seed=cfg.seed)
    print(format_stats(stats))
    logger.info("wrote %s and %s", out / "stats.json", out / "sample_items.png")


def cmd_stage1(cfg: Config, ns: argparse.Namespace) -> None:
    from stage1_preference.train import run_stage1

    run_stage1(cfg, progress=not ns.quiet)


def cmd_stage2(cfg: Config, ns: argparse.Namespace) -> None:
    from stage2_generation.rewards import check_weights

    # A misspelt reward fails here, before the pipeline's imports (seconds) and its data and warm-start (minutes).
    check_weights(cfg.stage2.rl.weights)
    from stage2_generation.pipeline import run_stage2

    run_stage2(cfg, progress=not ns.quiet)


def cmd_eval(cfg: Config, ns: argparse.Namespace) -> None:
    from stage2_generation.evaluation.run import run_eval

    run_eval(cfg, progress=not ns.quiet)


def cmd_models_prepare(cfg: Config, ns: argparse.Namespace) -> None:
    from dppmg.models import prepare_models

    # The packaged models, and the config's text model when it names another GGUF file: that one first, so that a
    # missing or broken file fails before the minutes the packaged ones may take.
    names = None
    text_model = cfg.stage2.generators.text_model
    if text_model is not None and str(text_model).lower().endswith(".gguf"):
        from dppmg.models import PACKAGED

        names = [text_model] + [m.name for m in PACKAGED.values()]
    for row in prepare_models(cfg.features.cache_dir, names):
        print(f"{row['name']:<24} {row['kind']:<14} {row['ready']}")


def cmd_config_show(cfg: Config, ns: argparse.Namespace) -> None:
    print(to_yaml(cfg), end="")


COMMANDS: dict[tuple[str, str | None], tuple[Callable[[Config, argparse.Namespace], None], str]] = {
    ("stage1", None): (
        cmd_stage1,
        "train the modal-specific GNN + residual VQ; write metrics and the token checkpoint",
    ),
    ("stage2", None): (
        cmd_stage2,
        "inject the tokens into the generators, ground them, RL-tune them; write metrics, gallery, exports",
    ),
    ("eval", None): (
        cmd_eval,
        "every method (none, pmg, dppmg_sft, dppmg, ablations) on stage 2's held-out pairs; write eval/results.*",
    ),
    ("data", "prepare"): (cmd_data_prepare, "build the processed dataset, item features and the scorer"),
    ("data", "stats"): (cmd_data_stats, "print dataset statistics; write stats.json and a sample grid PNG"),
    ("config", "show"): (cmd_config_show, "print the resolved config (defaults + file + overrides)"),
    ("models", "prepare"): (
        cmd_models_prepare,
        "make the offline pretrained models ready (SmolLM2 dequantized once into the cache, EfficientNet checked)",
    ),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dppmg",
        description="Personalized multimodal generation with discrete preference tokens.",
        epilog="Every command takes [CONFIG.yaml] [key=value ...], e.g. "
        "`dppmg data prepare configs/movielens.yaml data.raw_dir=../shared/data/ml-latest-small`.",
    )
    p.add_argument("--version", action="version", version=f"dppmg {__version__}")
    groups = p.add_subparsers(dest="group", metavar="<command>", required=True)
    by_group: dict[str, argparse._SubParsersAction] = {}
    for (group, name), (_, help_text) in COMMANDS.items():
        if name is None:
            sp = groups.add_parser(group, help=help_text, description=help_text)
        else:
            if group not in by_group:
                gp = groups.add_parser(group, help=f"{group} commands")
                by_group[group] = gp.add_subparsers(dest="name", metavar="<subcommand>", required=True)
            sp = by_group[group].add_parser(name, help=help_text, description=help_text)
        sp.add_argument(
            "args", nargs="*", metavar="CONFIG.yaml | key=value", help="config file and overrides"
        )
        sp.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
        sp.add_argument("-v", "--verbose", action="store_true", help="debug messages")
    tokens = groups.add_parser("tokens", help="inspect a token checkpoint").add_subparsers(
        dest="name", metavar="<subcommand>", required=True
    )
    ti = tokens.add_parser("inspect", help="summary of a token checkpoint (runs/<run>/stage1/tokens)")
    ti.add_argument("path", help="token checkpoint folder (or a run folder)")
    ts = tokens.add_parser("show", help="one user's tokens, history and nearest codes")
    ts.add_argument("path", help="token checkpoint folder (or a run folder)")
    ts.add_argument(
        "--user", required=True, help="user id as in the source data, or #<index> for a user index"
    )
    te = tokens.add_parser(
        "export",
        help="a finished run's tokens for use without dppmg (safetensors, diffusers, transformers)",
        description="Export a run's preference tokens: plain safetensors (codebooks, codes, tuned rows), the image "
        "tokens in diffusers' textual-inversion format, or the text tokens as a transformers tokenizer and "
        "embedding rows. Each folder has a README that shows how to load it.",
    )
    te.add_argument("run", help="run name (runs/<run>) or run folder")
    te.add_argument("--format", required=True, choices=FORMATS, help="what to write")
    te.add_argument("--out", help="output folder (default: runs/<run>/export/<format>)")
    te.add_argument(
        "--with-base",
        action="store_true",
        help="also write the base model (the image pipeline, or the LM with the rows in its table), so the "
        "folder loads with from_pretrained alone",
    )
    te.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    te.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    sw = groups.add_parser(
        "sweep",
        help="run a W&B sweep spec (configs/sweeps/*.yaml): offline with W&B's sweeps engine, or online",
        description="Offline (default): propose each trial with W&B's `sweeps` engine, run the spec's command, "
        "write runs/sweeps/<name>/leaderboard.{csv,md}; a rerun continues an interrupted sweep. "
        "Online (--online, or tracking.mode=online): create the sweep on W&B and run `wandb agent`.",
    )
    sw.add_argument("spec", help="sweep spec YAML (W&B sweep format)")
    sw.add_argument("--count", required=True, help="number of trials")
    sw.add_argument("args", nargs="*", metavar="CONFIG.yaml | key=value", help="config file and overrides")
    sw.add_argument("--online", action="store_true", help="create the sweep on the W&B server, run an agent")
    sw.add_argument("--stage1-run", help="stage-2 sweeps: the finished stage-1 run every trial uses")
    sw.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    sw.add_argument("-v", "--verbose", action="store_true", help="debug messages")
    gp = groups.add_parser(
        "generate",
        help="text + image for users and targets with a finished run's tokens",
        description="Generate a text and a PNG for every (user, target) with the preference tokens of a "
        "finished stage 2. Writes <out>/<user>__<target>.png and appends to <out>/generations.jsonl.",
    )
    gp.add_argument("run", help="run name (runs/<run>) or run folder")
    gp.add_argument("--user", action="append", required=True, help="user id or row index (repeatable)")
    gp.add_argument(
        "--target", action="append", required=True, help="target keywords, e.g. 'lamp' (repeatable)"
    )
    gp.add_argument("--out", help="output folder (default: runs/<run>/stage2/generate)")
    gp.add_argument("--no-tokens", action="store_true", help="the non-personalized baseline: keywords only")
    gp.add_argument(
        "--cold-start",
        action="store_true",
        help="a --user the dataset does not know gets the population's tokens (the most common per level) "
        "instead of an error; a known user without training history always does",
    )
    gp.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    gp.add_argument("-v", "--verbose", action="store_true", help="debug messages")
    return p


def _run_generate(ns: argparse.Namespace, overrides: list[str]) -> int:
    from stage2_generation.pipeline import generate

    rows = generate(
        ns.run, ns.user, ns.target, out=Path(ns.out) if ns.out else None, personalized=not ns.no_tokens,
        overrides=overrides, progress=not ns.quiet, cold_start=ns.cold_start,
    )  # fmt: skip
    for r in rows:
        note = f"  (population fallback: the user {r['fallback']})" if r["fallback"] else ""
        print(f"{r['user_id']} | {r['target']} | {r['image']}{note}\n  {r['text']}")
    return 0


def _run_sweep(ns: argparse.Namespace, extra: list[str]) -> int:
    from dppmg.sweep import run_sweep

    if not str(ns.count).isdigit() or int(ns.count) < 1:
        raise DppmgError(f"--count must be a positive integer, got {ns.count!r}")
    path, overrides = _config_args([*ns.args, *extra])
    cfg = load_config(Path(path) if path else None, overrides)  # a bad config fails before any trial
    online = ns.online or cfg.tracking.mode == "online"
    run_sweep(
        ns.spec,
        int(ns.count),
        path,
        overrides,
        online=online,
        stage1_run=ns.stage1_run,
        default_stage1_run=cfg.run_name,
        runs_dir=Path(cfg.runs_dir),
    )
    return 0


def _run_tokens(ns: argparse.Namespace) -> int:
    from dppmg.tokens import TokenCheckpoint, inspect_text, show_user_text

    try:
        if ns.name == "export":
            from stage2_generation.export import export_run, export_summary

            out = export_run(ns.run, ns.format, ns.out, ns.with_base, ns.overwrite, progress=not ns.quiet)
            print(export_summary(out))
            return 0
        path = Path(ns.path)
        if (path / "stage1" / "tokens").is_dir():  # a run folder was given
            path = path / "stage1" / "tokens"
        ckpt = TokenCheckpoint.load(path)
        if ns.name == "inspect":
            print(inspect_text(ckpt))
        else:
            user = int(ns.user[1:]) if ns.user.startswith("#") and ns.user[1:].isdigit() else ns.user
            print(show_user_text(ckpt, user))
    except DppmgError as e:
        print(f"dppmg: error: {e}", file=sys.stderr)
        return 2
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return _main(argv)
    except BrokenPipeError:  # `dppmg tokens inspect ... | head`: the reader left, which is not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing loads from a hub unless the user allows it
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # transformers' and diffusers' notices (optional backends, unsaved None components) are not the user's concern.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault(
        "HF_HUB_DISABLE_PROGRESS_BARS", "1"
    )  # transformers' "Loading weights" bars; ours stay
    parser = build_parser()
    # Options may come after the key=value arguments (`dppmg data prepare cfg.yaml a=1 -q`).
    ns, extra = parser.parse_known_args(argv)
    unknown = [
        a
        for a in extra
        if a.startswith("-") or ns.group == "tokens" or (ns.group == "generate" and "=" not in a)
    ]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    setup_logging(getattr(ns, "verbose", False))
    if ns.group == "tokens":
        return _run_tokens(ns)
    if ns.group in ("generate", "sweep"):
        try:
            return (_run_generate if ns.group == "generate" else _run_sweep)(ns, extra)
        except DppmgError as e:
            print(f"dppmg: error: {e}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            if ns.group != "sweep":
                raise
            print("dppmg: sweep interrupted; rerun the same command to continue", file=sys.stderr)
            return 130
    ns.args = [*ns.args, *extra]
    func, _ = COMMANDS[(ns.group, getattr(ns, "name", None))]
    try:
        path, overrides = _config_args(ns.args)
        overrides = _sweep_run_name(overrides)
        cfg = load_config(Path(path) if path else None, overrides)
        func(cfg, ns)
    except DppmgError as e:
        print(f"dppmg: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if e.errno not in DISK_FULL:  # a write outside `atomic_path` (a staging folder's tables, say)
            raise
        print(f"dppmg: error: {disk_full_message(e.filename)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dppmg: interrupted; finished outputs are intact, partial ones were discarded", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
