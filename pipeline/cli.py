"""The `curate` command: run, synth, query, schema, report, train-dfn, eval.

A mistake of the user's (a UserError: config, input, credentials, weights, SQL) ends the command with
one `curate: ...` line on stderr and exit code 2; any other failure with one line and exit code 1.
`--debug` (or CURATE_DEBUG=1) prints the traceback as well.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback

from pipeline.config import UserError, one_line
from pipeline.evaluate import add_eval_parser
from pipeline.stages.report import add_report_parser
from pipeline.train_dfn import add_train_dfn_parser


def _setup_logging(verbose: bool) -> None:
    """Curate's own log from INFO; other libraries' from WARNING (botocore's "Found credentials in
    environment variables" is noise to the user); with -v everything from DEBUG."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    logging.getLogger("curate").setLevel(logging.DEBUG if verbose else logging.INFO)


def cmd_run(args) -> int:
    from pipeline.config import load_config

    config = load_config(args.config, args.overrides)
    # Only a valid config gets this far: the runner imports Ray (and the stages their libraries).
    from pipeline.ray_adapter import ItemTimeoutError
    from pipeline.runner import InvariantError, format_summary, run_pipeline

    try:
        summary = run_pipeline(config)
    except (InvariantError, ItemTimeoutError) as exc:  # the run's own failure, not the user's: exit 1
        return report_error(exc, 1, args.debug)
    print(format_summary(summary))
    return 0


def cmd_synth(args) -> int:
    from pipeline.synth import synthesize

    if args.eval_set and args.datacomp_metadata:
        raise UserError("synth: --datacomp-metadata describes a pool; an --eval-set is not one")
    if args.eval_set:
        from pipeline.synth.evalset import synthesize_eval_set

        seed = 1 if args.seed is None else args.seed
        summary = synthesize_eval_set(args.out, per_class=args.per_class, seed=seed,
                                      pairs_per_class=args.pairs_per_class)
        print(f"wrote an evaluation set of seed {seed} to {args.out}: {summary['images']} labelled images of "
              f"{summary['classes']} classes in {summary['classes_dir']}, {summary['pairs']} image-caption pairs "
              f"in {summary['pairs_dir']}")
        return 0
    seed = 0 if args.seed is None else args.seed
    summary = synthesize(args.out, samples=args.samples, seed=seed, shard_size=args.shard_size)
    print(f"wrote {summary['samples']} samples in {summary['shards']} shards to {args.out} "
          f"(ground truth: {args.out}/truth/truth.parquet)")
    if args.datacomp_metadata:
        from pipeline.synth.datacomp import write_datacomp_metadata

        written = write_datacomp_metadata(args.out)
        print(f"wrote DataComp-style metadata to {written['out_dir']}: {written['files']} .parquet + .npz pairs, "
              f"{written['rows']} rows ({written['no_row']} samples without a decodable image have none), "
              f"embeddings and scores of {written['model']} under both the b32 and l14 names")
    return 0


def cmd_query(args) -> int:
    from pipeline.io.catalog import connect  # a URL that is no run raises NotARunError

    con = connect(args.run_dir)
    try:
        if args.format == "csv":
            import csv

            cursor = con.execute(args.sql)
            writer = csv.writer(sys.stdout, lineterminator="\n")
            writer.writerow([d[0] for d in cursor.description or []])
            while rows := cursor.fetchmany(10_000):
                writer.writerows(["true" if v is True else "false" if v is False else v for v in row] for row in rows)
        else:
            relation = con.sql(args.sql)
            if relation is not None:
                relation.show(max_rows=args.max_rows, max_width=200)
    except Exception as exc:  # duckdb raises many error types; all are the user's SQL
        raise UserError(f"query failed: {one_line(str(exc))}") from exc
    return 0


def cmd_schema(args) -> int:
    from pathlib import Path

    from pipeline.config import write_config_schema
    from pipeline.schema import metadata_schema_json

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_config_schema(out / "config.schema.json")
    (out / "metadata.schema.json").write_text(metadata_schema_json())
    print(f"wrote {out}/config.schema.json and {out}/metadata.schema.json")
    return 0


class Parser(argparse.ArgumentParser):
    """argparse with its usage errors as one `curate: ...` line, exit code 2, like every user error."""

    def error(self, message: str):
        command = self.prog.removeprefix("curate").strip()
        self.exit(2, f"curate: {command + ': ' if command else ''}{message} (see `{self.prog} --help`)\n")


DEBUG_HELP = "on an error, print the traceback too; also CURATE_DEBUG=1 (default: off)"
VERBOSE_HELP = "log debug messages (default: off)"


def _global_options() -> argparse.ArgumentParser:
    """--debug and -v, also accepted after the subcommand (`python pipeline/curate.py --debug ...` passes
    them after `run`); absent there, they keep the value given before it."""
    options = argparse.ArgumentParser(add_help=False)
    options.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)
    options.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=VERBOSE_HELP)
    return options


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="curate", description="Curate image-text WebDataset pools on Ray.")
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    parser.add_argument("-v", "--verbose", action="store_true", help=VERBOSE_HELP)
    sub = parser.add_subparsers(dest="command", required=True)
    common = [_global_options()]

    run = sub.add_parser("run", parents=common, help="run a job config (embedded Ray, or the cluster in RAY_ADDRESS)",
                         description="Run a job config: validate it, check the input, reference, select.where and "
                                     "model weights, then run the stages on Ray (embedded, or the cluster in "
                                     "RAY_ADDRESS).")
    run.add_argument("--config", required=True, help="the job's YAML file (any fsspec URL), e.g. jobs/quickstart.yaml")
    run.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                     help="dotted-key overrides of the job file, the value read as YAML, e.g. output=/tmp/r2 "
                          "select.dfn.fraction=0.3 (default: none)")
    run.set_defaults(func=cmd_run)

    synth = sub.add_parser("synth", parents=common, help="render a synthetic pool with ground truth")
    synth.add_argument("--out", required=True, help="local directory to write into (created if missing)")
    synth.add_argument("--samples", type=int, default=2000, help="samples in the pool (default: %(default)s)")
    synth.add_argument("--seed", type=int, default=None,
                       help="the same seed renders the same bytes (default: 0 for a pool, 1 for --eval-set)")
    synth.add_argument("--shard-size", type=int, default=1000, help="samples per .tar shard (default: %(default)s)")
    synth.add_argument("--datacomp-metadata", action="store_true",
                       help="also write DataComp-style metadata into OUT/metadata (NAME.parquet with uid, url, text, "
                            "clip_*_similarity_score, sha256, and NAME.npz with b32_img/b32_txt/l14_img/l14_txt per "
                            "shard), computed on the CPU with the quickstart's model, for "
                            "jobs/datacomp_metadata.yaml (default: off)")
    synth.add_argument("--eval-set", action="store_true",
                       help="render a clean, class-balanced held-out set for `curate eval` instead of a pool "
                            "(an image folder per class and image-caption pairs; never part of any pool; "
                            "default: off)")
    synth.add_argument("--per-class", type=int, default=10,
                       help="--eval-set: labelled images per class (default: %(default)s)")
    synth.add_argument("--pairs-per-class", type=int, default=1,
                       help="--eval-set: image-caption pairs per class (default: %(default)s)")
    synth.set_defaults(func=cmd_synth)

    query = sub.add_parser("query", parents=common,
                           help="SQL over a run's catalog (views: samples, embeddings, clusters, duplicates)")
    query.add_argument("run_dir", help="the run's output directory or URL")
    query.add_argument("sql", help="a DuckDB query, e.g. \"select drop_reason, count(*) from samples group by 1\"")
    query.add_argument("--format", choices=["table", "csv"], default="table",
                       help="a table for reading, or CSV of every row (default: %(default)s)")
    query.add_argument("--max-rows", type=int, default=100, help="rows a table shows (default: %(default)s)")
    query.set_defaults(func=cmd_query)

    schema = sub.add_parser("schema", parents=common, help="write the config and metadata JSON Schemas")
    schema.add_argument("--out", default="schemas",
                        help="folder for config.schema.json and metadata.schema.json (default: %(default)s)")
    schema.set_defaults(func=cmd_schema)
    add_report_parser(sub, parents=common)
    add_train_dfn_parser(sub, parents=common)
    add_eval_parser(sub, parents=common)
    return parser


def report_error(exc: BaseException, code: int, debug: bool, *, unexpected: bool = False) -> int:
    """Print `exc` as one `curate: ...` line (after its traceback with --debug); return the exit code.

    An unexpected failure is named by its type, with how to see where it happened.
    """
    cause = getattr(exc, "cause", None)  # an error raised inside a Ray task: the task's own exception
    shown = cause if isinstance(cause, BaseException) else exc
    message = one_line(str(shown)) or type(shown).__name__
    if unexpected:
        message = f"{type(shown).__name__}: {message}"
        if not debug:
            message += " (--debug or CURATE_DEBUG=1 shows the traceback)"
    if debug:
        traceback.print_exception(exc)
    print(f"curate: {message}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.debug = args.debug or os.environ.get("CURATE_DEBUG", "") not in ("", "0")
    _setup_logging(args.verbose)
    try:
        return args.func(args)
    except UserError as exc:
        return report_error(exc, 2, args.debug)
    except Exception as exc:  # a failure of Curate or of its environment, not of the user's request
        return report_error(exc, 1, args.debug, unexpected=True)


if __name__ == "__main__":
    sys.exit(main())
