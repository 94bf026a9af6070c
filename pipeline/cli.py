"""The `curate` command: run, synth, query, schema, report, train-dfn, eval."""

from __future__ import annotations

import argparse
import logging
import sys

from pipeline.evaluate import add_eval_parser
from pipeline.stages.report import add_report_parser
from pipeline.train_dfn import add_train_dfn_parser


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )


def cmd_run(args) -> int:
    from pipeline.config import ConfigError, load_config
    from pipeline.runner import InvariantError, format_summary, run_pipeline

    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"curate: {exc}", file=sys.stderr)
        return 2
    try:
        summary = run_pipeline(config)
    except (FileNotFoundError, InvariantError) as exc:
        print(f"curate: {exc}", file=sys.stderr)
        return 1
    print(format_summary(summary))
    return 0


def cmd_synth(args) -> int:
    from pipeline.synth import synthesize

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
    return 0


def cmd_query(args) -> int:
    from pipeline.io.catalog import connect

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
        print(f"curate: query failed: {exc}", file=sys.stderr)
        return 1
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="curate", description="Curate image-text WebDataset pools on Ray.")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a job config (embedded Ray, or the cluster in RAY_ADDRESS)")
    run.add_argument("--config", required=True, help="job YAML (any fsspec URL)")
    run.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted-key overrides, e.g. output=/tmp/r2")
    run.set_defaults(func=cmd_run)

    synth = sub.add_parser("synth", help="render a synthetic pool with ground truth")
    synth.add_argument("--out", required=True)
    synth.add_argument("--samples", type=int, default=2000)
    synth.add_argument("--seed", type=int, default=None, help="default: 0 for a pool, 1 for --eval-set")
    synth.add_argument("--shard-size", type=int, default=1000)
    synth.add_argument("--eval-set", action="store_true",
                       help="render a clean, class-balanced held-out set for `curate eval` instead of a pool "
                            "(an image folder per class and image-caption pairs; never part of any pool)")
    synth.add_argument("--per-class", type=int, default=10, help="--eval-set: labelled images per class")
    synth.add_argument("--pairs-per-class", type=int, default=1, help="--eval-set: image-caption pairs per class")
    synth.set_defaults(func=cmd_synth)

    query = sub.add_parser("query", help="SQL over a run's catalog (views: samples, embeddings, clusters)")
    query.add_argument("run_dir")
    query.add_argument("sql")
    query.add_argument("--format", choices=["table", "csv"], default="table")
    query.add_argument("--max-rows", type=int, default=100)
    query.set_defaults(func=cmd_query)

    schema = sub.add_parser("schema", help="write the config and metadata JSON Schemas")
    schema.add_argument("--out", default="schemas")
    schema.set_defaults(func=cmd_schema)
    add_report_parser(sub)
    add_train_dfn_parser(sub)
    add_eval_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
