"""Stage 7, report: one self-contained HTML file saying what a run kept, what it removed and why.

The report is a list of sections (`SECTIONS`), each a builder that takes the run's inputs and
returns an HTML fragment; a builder whose input is absent (no scores, no DBP clusters, no
manifest) raises `Missing` and its section shows that short note instead. A new section is one more
`Section` in the list (or in the `sections` argument of `build_report`).

Nothing in the file is fetched from elsewhere: plots are SVG and thumbnails JPEG, both embedded as
data: URIs, and a Content-Security-Policy forbids every other load and every script. Text from the
data (captions, details, config values) is always HTML-escaped, never trusted as markup. Images of
samples dropped before decoding was safe (decompression bombs, hostile or cut-short members) are
never decoded here either; they show a text tile saying why.

It reads only the run's files (metadata through the DuckDB catalog, manifest.json, clusters/, and
eval/eval.json where `curate eval` left one) and the source shards by the byte ranges ingest
recorded, so `curate report RUN_DIR` regenerates it at any time, and identical runs give identical
reports except for the stage timings.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from pipeline.io import fs
from pipeline.config import IngestConfig
from pipeline.reasons import DEDUP_REASONS, DROP_REASONS, NOT_DECODED, REASON_NAMES

log = logging.getLogger("curate")
NAME = "report"

MEANING = {r.name: r.meaning for r in DROP_REASONS}
STEP = {r.name: r.step for r in DROP_REASONS}
STEP_COLOURS = {"ingest": "#7f7f7f", "basic_filter": "#e6a23c", "dedup": "#9467bd", "select": "#1f77b4", "other": "#d62728"}
KEPT_COLOUR = "#2ca02c"
DEFAULT_MAX_PIXELS = IngestConfig.model_fields["max_image_pixels"].default  # a run's config may lack it
CAPTION_CHARS = 240
PAIRS_PER_KIND = 4
HISTOGRAM_BINS = 40
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'"
TILE_COLUMNS = [
    "uid", "shard", "key", "partition", "row", "kept", "drop_reason", "drop_detail", "duplicate_of", "caption",
    "width", "height", "clip_score", "dfn_score", "phash_distance", "duplicate_similarity",
    "image_offset", "image_size",
]


def esc(value) -> str:
    """Text for HTML content or a quoted attribute: every <, >, &, ' and " escaped."""
    return html.escape("" if value is None else str(value), quote=True)


class Missing(Exception):
    """A section's input is absent; the message says which, and the section shows it instead."""


@dataclass(frozen=True)
class Section:
    id: str
    title: str
    build: Callable[["ReportInputs"], str]


@dataclass
class ReportInputs:
    """What section builders read: the manifest, a DuckDB connection with the run's views, options."""

    run_url: str
    manifest: dict
    con: object  # duckdb.DuckDBPyConnection with views samples / embeddings / clusters, table `reasons`
    views: frozenset[str]
    sample_columns: frozenset[str]
    examples_per_reason: int = 8
    thumb_px: int = 160
    _shard_urls: dict[int, str] = field(default_factory=dict)

    @property
    def config(self) -> dict:
        return self.manifest.get("config") or {}

    def setting(self, dotted: str, default=None):
        node = self.config
        for part in dotted.split("."):
            if not isinstance(node, dict) or part not in node:
                return default
            node = node[part]
        return default if node is None else node

    def require_samples(self, *columns: str) -> None:
        if "samples" not in self.views:
            raise Missing("the run has no metadata/part-*.parquet (its metadata stage has not finished)")
        absent = [c for c in columns if c not in self.sample_columns]
        if absent:
            raise Missing(f"the metadata has no {', '.join(absent)} column")

    def require_manifest(self) -> None:
        if not self.manifest:
            raise Missing("the run has no manifest.json")

    def rows(self, sql: str, params: Sequence = ()) -> list[dict]:
        cursor = self.con.execute(sql, list(params))
        names = [d[0] for d in cursor.description]
        return [dict(zip(names, row)) for row in cursor.fetchall()]

    def scalar(self, sql: str, params: Sequence = ()):
        return self.con.execute(sql, list(params)).fetchone()[0]

    def tile_columns(self) -> str:
        return ", ".join(f's."{c}"' for c in TILE_COLUMNS if c in self.sample_columns)

    def shard_url(self, partition) -> str | None:
        if not self._shard_urls:
            for shard in (self.manifest.get("input") or {}).get("shards", []):
                self._shard_urls[int(shard["partition"])] = shard["url"]
        return None if partition is None else self._shard_urls.get(int(partition))


# -- the stage ---------------------------------------------------------------------------------

def config_fingerprint(config) -> dict:
    return {}  # the report depends on nothing beyond the stages it reads


def outputs(paths) -> list[str]:
    return [paths.report]


def run(ctx) -> None:
    page = build_report(ctx.paths.root).encode("utf-8")
    fs.write_bytes_atomic(ctx.paths.report, page)
    samples = ctx.manifest.data.get("stages", {}).get("metadata", {}).get("samples_in", 0)
    ctx.record.samples_in = ctx.record.samples_out = samples
    ctx.record.counts["bytes"] = len(page)


def build_report(run_url: str, *, examples_per_reason: int = 8, thumb_px: int = 160,
                 sections: Sequence[Section] | None = None) -> str:
    """The run's report as one self-contained HTML document."""
    from pipeline.io.catalog import connect

    manifest_url = fs.join(run_url, "manifest.json")
    manifest = json.loads(fs.read_bytes(manifest_url)) if fs.exists(manifest_url) else {}
    con = connect(run_url)
    try:
        views = frozenset(row[0] for row in con.execute("select view_name from duckdb_views() where not internal").fetchall())
        columns = frozenset(row[0] for row in con.execute("describe samples").fetchall()) if "samples" in views else frozenset()
        con.execute("create temp table reasons (name varchar, rank integer, step varchar)")
        con.executemany("insert into reasons values (?, ?, ?)", [(r.name, i, r.step) for i, r in enumerate(DROP_REASONS)])
        inputs = ReportInputs(run_url, manifest, con, views, columns, examples_per_reason, thumb_px)
        body = [_render_section(section, inputs) for section in (SECTIONS if sections is None else sections)]
    finally:
        con.close()
    toc = "".join(f'<li><a href="#{esc(s.id)}">{esc(s.title)}</a></li>' for s in (SECTIONS if sections is None else sections))
    return _page(f"Curate report: {run_url}", run_url, toc, "\n".join(body), thumb_px)


def _render_section(section: Section, inputs: ReportInputs) -> str:
    try:
        fragment = section.build(inputs)
    except Missing as why:
        # The page says why in full; the log, at debug level, only the first sentence.
        log.debug("report: section %s not shown: %s", section.id, str(why).split(". ")[0])
        return (f'<section id="{esc(section.id)}" class="skipped"><h2>{esc(section.title)}</h2>'
                f'<p class="note">Not shown: {esc(why)}.</p></section>')
    return f'<section id="{esc(section.id)}"><h2>{esc(section.title)}</h2>\n{fragment}\n</section>'


# -- sections ----------------------------------------------------------------------------------

def overview_section(inputs: ReportInputs) -> str:
    inputs.require_manifest()
    config = inputs.config
    source = config.get("input")
    source = ", ".join(source) if isinstance(source, list) else source
    shards = len((inputs.manifest.get("input") or {}).get("shards", []))
    items = [("input", f"{source} ({shards} shards)"), ("run", inputs.run_url)]
    if config.get("output") and str(config["output"]).rstrip("/") != inputs.run_url.rstrip("/"):
        items.append(("written to", config["output"]))
    items.append(("curate", inputs.manifest.get("curate_version", "?")))
    if "samples" in inputs.views:
        total, kept = inputs.con.execute("select count(*), count(*) filter (where kept) from samples").fetchone()
        items.append(("samples", f"{total:,} in, {kept:,} kept ({_percent(kept, total)}), {total - kept:,} dropped"))
    rows = "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in items)
    settings = "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in _settings_summary(inputs))
    flat = "".join(f"<tr><th>{esc(k)}</th><td><code>{esc(json.dumps(v))}</code></td></tr>" for k, v in _flatten(config))
    packages = "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>"
                       for k, v in sorted((inputs.manifest.get("packages") or {}).items()))
    return (f'<table class="kv">{rows}</table>'
            f'<h3>Settings</h3><table class="kv">{settings}</table>'
            f'<details><summary>Full configuration</summary><table class="kv small">{flat}</table></details>'
            f'<details><summary>Package versions</summary><table class="kv small">{packages}</table></details>')


def stages_section(inputs: ReportInputs) -> str:
    inputs.require_manifest()
    stages = inputs.manifest.get("stages") or {}
    if not stages:
        raise Missing("the manifest records no stages")
    rows = []
    for name, record in stages.items():
        if name == NAME:
            continue
        note = "not complete" if not record.get("complete") else "done in an earlier run" if record.get("skipped") else ""
        rows.append(f'<tr data-stage="{esc(name)}"><td>{esc(name)}</td><td class="n">{record.get("seconds", 0):,.1f}</td>'
                    f'<td class="n">{record.get("samples_in", 0):,}</td><td class="n">{record.get("samples_out", 0):,}</td>'
                    f'<td>{esc(note)}</td></tr>')
    return ('<table id="stages-table"><thead><tr><th>stage</th><th>seconds</th><th>samples in</th><th>samples out</th>'
            f'<th></th></tr></thead><tbody>{"".join(rows)}</tbody></table>'
            '<p class="note">A stage sees the survivors of the stages before it; embed scores every sample with an image.</p>')


def shard_errors_section(inputs: ReportInputs) -> str:
    """The input shards that could not be read to their end: where each broke and why."""
    inputs.require_manifest()
    errors = inputs.manifest.get("shard_errors")
    if errors is None:
        raise Missing("the manifest records no shard errors list (the run did not finish its ingest stage)")
    shards = len((inputs.manifest.get("input") or {}).get("shards", []))
    if not errors:
        return f'<p id="shard-errors-none">Every one of the {shards:,} input shards was read to its end.</p>'
    rows = "".join(f'<tr><td><code>{esc(e["shard"])}</code></td><td class="n">{_byte(e["offset"])}</td>'
                   f'<td>{esc(e["error"])}</td></tr>' for e in errors)
    return (f'<p>{len(errors):,} of {shards:,} input shards could not be read to their end. The samples read from '
            'them are in the metadata (a member cut short is <code>truncated</code>); a stretch skipped to the next '
            'valid tar header lost the samples it held, unless the shard\'s img2dataset listing names them.</p>'
            '<table id="shard-errors-table"><thead><tr><th>shard</th><th>byte</th><th>error</th></tr></thead>'
            f'<tbody>{rows}</tbody></table>')


def _byte(offset) -> str:
    return "-" if offset is None else f"{offset:,}"


def counts_section(inputs: ReportInputs) -> str:
    inputs.require_samples("kept", "drop_reason")
    total, kept = inputs.con.execute("select count(*), count(*) filter (where kept) from samples").fetchone()
    found = dict(inputs.con.execute(
        "select coalesce(drop_reason, '(no reason)'), count(*) from samples where not kept or kept is null group by 1"
    ).fetchall())
    order = [r for r in REASON_NAMES if r in found] + sorted(r for r in found if r not in REASON_NAMES)
    dropped = sum(found.values())
    rows = []
    for reason in order:
        step = STEP.get(reason, "other")
        rows.append(f'<tr data-key="{esc(reason)}"><td><span class="swatch" style="background:{STEP_COLOURS[step]}"></span>'
                    f'{esc(step)}</td><td><a href="#examples-{esc(reason)}"><code>{esc(reason)}</code></a></td>'
                    f'<td>{esc(MEANING.get(reason, "not a known drop reason"))}</td>'
                    f'<td class="n">{found[reason]:,}</td><td class="n">{_percent(found[reason], total)}</td></tr>')
    rows.append(f'<tr data-key="kept" class="kept"><td><span class="swatch" style="background:{KEPT_COLOUR}"></span>output</td>'
                f'<td><a href="#examples-kept"><code>kept</code></a></td><td>in the output shards</td>'
                f'<td class="n">{kept:,}</td><td class="n">{_percent(kept, total)}</td></tr>')
    balance = "holds" if total == kept + dropped else "DOES NOT HOLD"
    chart = _svg_img(_counts_figure(order, found, kept), "bar chart of samples kept and dropped by reason", "counts-chart")
    return (f'<p>{total:,} input samples = {kept:,} kept + {dropped:,} dropped ({balance}). '
            'A sample is counted under the first step that dropped it.</p>'
            '<table id="counts-table"><thead><tr><th>step</th><th>reason</th><th>meaning</th><th>samples</th>'
            f'<th>share</th></tr></thead><tbody>{"".join(rows)}</tbody>'
            f'<tfoot><tr data-key="total"><td></td><td>input</td><td></td><td class="n">{total:,}</td><td class="n">100%</td></tr>'
            f'</tfoot></table>{chart}')


def _score_section(column: str, label: str, rule_key: str) -> Callable[[ReportInputs], str]:
    def build(inputs: ReportInputs) -> str:
        inputs.require_samples(column, "kept", "drop_reason")
        step_rank = REASON_NAMES.index(column)
        scored = f"""
            select s.{column} as v,
                   case when s.kept then 'kept' when s.drop_reason = '{column}' then 'cut'
                        when r.rank > {step_rank} then 'later' else 'before' end as outcome
            from samples s left join reasons r on r.name = s.drop_reason
            where s.{column} is not null and not isnan(s.{column})"""
        n, lo, hi, passed_min, cut_n = inputs.con.execute(
            f"select count(*), min(v), max(v), min(v) filter (where outcome in ('kept', 'later')), "
            f"count(*) filter (where outcome = 'cut') from ({scored})"
        ).fetchone()
        if not n:
            raise Missing(f"no sample has a {column} (set {'embed' if column == 'clip_score' else 'dfn'}.model to compute it)")
        unscored = inputs.scalar(f"select count(*) from samples where {column} is null or isnan({column})")
        width = (hi - lo) / HISTOGRAM_BINS if hi > lo else 1.0
        binned = inputs.con.execute(
            f"select least(cast(floor((v - ?) / ?) as integer), {HISTOGRAM_BINS - 1}) as bin, outcome, count(*) "
            f"from ({scored}) group by 1, 2", [lo, width]
        ).fetchall()
        rule = inputs.setting(rule_key, {}) or {}
        if rule.get("threshold") is not None:
            cut, cut_text = float(rule["threshold"]), f"threshold {rule['threshold']:g}: keep {column} >= {rule['threshold']:g}"
        elif rule.get("fraction") is not None:
            cut = passed_min
            applied = "no sample passed" if cut is None else f"the lowest score that passed is {cut:.4f}"
            cut_text = f"top {rule['fraction']:g} of the samples reaching the cut; {applied}"
        else:
            cut, cut_text = None, f"no {label} cut in this run ({rule_key} is off)"
        figure = _histogram_figure(binned, lo, width, cut, label)
        return (f'<p>{n:,} samples scored ({unscored:,} without a score: no image embedded). Cut: {esc(cut_text)}; '
                f'{cut_n:,} dropped by it.</p>'
                + _svg_img(figure, f"histogram of {label} scores, kept and dropped, with the cut marked", f"{column}-histogram"))

    return build


def dbp_section(inputs: ReportInputs) -> str:
    if "clusters" not in inputs.views:
        raise Missing("the run has no clusters/*.parquet (select.dbp.enabled is off)")
    cluster_columns = {row[0] for row in inputs.con.execute("describe clusters").fetchall()}
    needed = {"clustering", "cluster", "size", "complexity", "quota", "kept"}
    if not needed <= cluster_columns:
        raise Missing("the run has no DBP cluster table (clusters/dbp.parquet; select.dbp.enabled is off)")
    rows = inputs.rows("select cluster, size, d_intra, d_inter, complexity, quota, kept from clusters "
                       "where clustering = 'dbp' order by cluster")
    if not rows:
        raise Missing("the run has no DBP cluster table (clusters/dbp.parquet; select.dbp.enabled is off)")
    size = sum(r["size"] for r in rows)
    kept = sum(r["kept"] for r in rows)
    counts = ((inputs.manifest.get("stages") or {}).get("select") or {}).get("counts", {}).get("dbp", {})
    target = counts.get("target", inputs.setting("select.dbp.target"))
    table = "".join(
        f'<tr><td class="n">{r["cluster"]}</td><td class="n">{r["size"]:,}</td><td class="n">{_num(r["d_intra"])}</td>'
        f'<td class="n">{_num(r["d_inter"])}</td><td class="n">{_num(r["complexity"])}</td>'
        f'<td class="n">{r["quota"]:,}</td><td class="n">{r["kept"]:,}</td></tr>' for r in rows)
    figure = _dbp_figure(rows)
    return (f'<p>{len(rows)} concept clusters; {size:,} samples entered DBP, target {esc(target)}, {kept:,} kept. '
            'A cluster\'s quota grows with its complexity (d_intra × d_inter); it keeps the samples farthest from its centroid.</p>'
            + _svg_img(figure, "DBP clusters: size against complexity coloured by quota, and kept against size", "dbp-plot")
            + '<details><summary>Cluster table</summary><table class="small"><thead><tr><th>cluster</th><th>size</th>'
            '<th>d_intra</th><th>d_inter</th><th>complexity</th><th>quota</th><th>kept</th></tr></thead>'
            f'<tbody>{table}</tbody></table></details>')


def faces_section(inputs: ReportInputs) -> str:
    inputs.require_samples("face_count", "faces_blurred")
    examined, with_faces, faces = inputs.con.execute(
        "select count(face_count), count(*) filter (where face_count > 0), coalesce(sum(face_count), 0) from samples"
    ).fetchone()
    if not examined:
        raise Missing("no image was examined for faces (faces.enabled is off)")
    dropped = inputs.scalar("select count(*) from samples where drop_reason = 'has_faces'")
    blurred = inputs.scalar("select count(*) from samples where kept and faces_blurred")
    kept_faces = inputs.scalar("select count(*) from samples where kept and face_count > 0")
    effects = []
    if inputs.setting("select.faces") == "drop":
        effects.append(f"{dropped:,} dropped (has_faces)")
    if inputs.setting("write.blur_faces"):
        effects.append(f"{blurred:,} published blurred (write.blur_faces)")
    if not effects:
        effects.append(f"{kept_faces:,} kept as they are (select.faces keep, write.blur_faces off)")
    rows = inputs.rows("select least(face_count, 4) as n, count(*) as images from samples "
                       "where face_count is not null group by 1 order by 1")
    table = "".join(f'<tr><td class="n">{"4 or more" if r["n"] == 4 else r["n"]}</td><td class="n">{r["images"]:,}</td></tr>'
                    for r in rows)
    return (f'<p>{examined:,} images examined, {with_faces:,} images with a face ({_percent(with_faces, examined)}), '
            f'{faces:,} faces in all. Effect: {esc("; ".join(effects))}.</p>'
            '<table class="small"><thead><tr><th>faces</th><th>images</th></tr></thead>'
            f'<tbody>{table}</tbody></table>')


def dedup_section(inputs: ReportInputs) -> str:
    inputs.require_samples("drop_reason", "duplicate_of")
    kinds = [r for r in REASON_NAMES if r in DEDUP_REASONS]
    extra = {
        "near_duplicate": ("phash_distance", "median pHash distance"),
        "semantic_duplicate": ("duplicate_similarity", "median cosine similarity"),
    }
    rows, present = [], []
    for kind in kinds:
        column, label = extra.get(kind, (None, ""))
        stat = f", median({column})" if column in inputs.sample_columns else ", null"
        count, value = inputs.con.execute(f"select count(*){stat} from samples where drop_reason = ?", [kind]).fetchone()
        if count:
            present.append(kind)
        note = f"{label} {_num(value)}" if value is not None else ""
        rows.append(f'<tr data-key="{esc(kind)}"><td><code>{esc(kind)}</code></td><td>{esc(MEANING[kind])}</td>'
                    f'<td class="n">{count:,}</td><td>{esc(note)}</td></tr>')
    parts = [f'<p>Settings: {esc(_dedup_settings(inputs))}.</p>',
             '<table id="dedup-table"><thead><tr><th>kind</th><th>meaning</th><th>dropped</th><th></th></tr></thead>'
             f'<tbody>{"".join(rows)}</tbody></table>']
    if "clusters" in inputs.views:
        stats = inputs.con.execute("select count(*), min(size), median(size), max(size) from clusters where clustering = 'dedup'").fetchone()
        if stats[0]:
            parts.append(f'<p>SemDeDup clustering: {stats[0]} clusters, sizes {stats[1]:,} to {stats[3]:,} (median {stats[2]:,.0f}).</p>')
    if not present:
        parts.append('<p class="note">No sample was dropped as a duplicate.</p>')
    for kind in present:
        pairs = _duplicate_pairs(inputs, kind, min(PAIRS_PER_KIND, inputs.examples_per_reason))
        if not pairs:
            continue
        flat = [sample for pair in pairs for sample in pair if sample is not None]
        pictures = dict(zip(map(_sample_key, flat), _pictures(inputs, flat)))
        html_pairs = []
        for dropped, other in pairs:
            left = _tile(dropped, pictures[_sample_key(dropped)], label="dropped")
            if other is None:
                right = f'<figure class="tile">{_text_tile("duplicate_of names no sample in the metadata")}</figure>'
            else:
                fate = "kept" if other.get("kept") else f"later dropped: {other.get('drop_reason')}"
                right = _tile(other, pictures[_sample_key(other)], label=f"duplicate_of ({fate})")
            html_pairs.append(f'<div class="pair">{left}{right}</div>')
        parts.append(f'<h3 id="pairs-{esc(kind)}"><code>{esc(kind)}</code> pairs</h3><div class="pairs">{"".join(html_pairs)}</div>')
    return "".join(parts)


def examples_section(inputs: ReportInputs) -> str:
    inputs.require_samples("kept", "drop_reason")
    present = {row[0] for row in inputs.con.execute("select distinct drop_reason from samples where drop_reason is not null").fetchall()}
    order = [r for r in REASON_NAMES if r in present] + sorted(present - set(REASON_NAMES))
    groups = [(reason, "drop_reason = ?", [reason]) for reason in order] + [("kept", "kept", [])]
    parts = [f'<p>Up to {inputs.examples_per_reason} samples per reason, those with the smallest uids. '
             'Captions and details are shown as the data has them (escaped, long ones shortened).</p>']
    for name, where, params in groups:
        samples = inputs.rows(f"select {inputs.tile_columns()} from samples s where {where} order by uid, partition, row "
                              f"limit {int(inputs.examples_per_reason)}", params)
        count = inputs.scalar(f"select count(*) from samples where {where}", params)
        meaning = MEANING.get(name, "in the output shards" if name == "kept" else "")
        tiles = "".join(_tile(s, picture) for s, picture in zip(samples, _pictures(inputs, samples)))
        parts.append(f'<div class="group" id="examples-{esc(name)}"><h3><code>{esc(name)}</code> '
                     f'<span class="count">{count:,} samples</span></h3><p class="note">{esc(meaning)}</p>'
                     f'<div class="grid">{tiles}</div></div>')
    return "".join(parts)


EVAL_FILE = ("eval", "eval.json")
EVAL_METRICS = {
    "zeroshot_top1": "zero-shot top-1",
    "zeroshot_top5": "zero-shot top-5",
    "i2t_r1": "image→text R@1",
    "i2t_r5": "image→text R@5",
    "t2i_r1": "text→image R@1",
    "t2i_r5": "text→image R@5",
}
_THIS_ARM = ' class="kept"'
ARM_COLOURS = {"this run": KEPT_COLOUR, "random": "#8c8c8c", "other": "#1f77b4"}


def evaluation_section(inputs: ReportInputs) -> str:
    """`curate eval`'s results when a copy lies in the run (RUN/eval/eval.json)."""
    url = fs.join(inputs.run_url, *EVAL_FILE)
    if not fs.exists(url):
        raise Missing(f"no evaluation of this run ({'/'.join(EVAL_FILE)}). `curate eval --pool POOL --arm "
                      f"{inputs.run_url} --heldout HELDOUT --out DIR` trains the same small CLIP on this run's samples "
                      "and on a random subset of the pool of equal size, measures them on held-out data and adds "
                      "the results here (`curate synth --eval-set --out HELDOUT` makes held-out data for a "
                      "synthetic pool)")
    result = json.loads(fs.read_bytes(url))
    arms, metrics = result.get("arms") or [], [m for m in result.get("metrics", []) if m in EVAL_METRICS]
    if not arms or not metrics:
        raise Missing(f"{'/'.join(EVAL_FILE)} lists no arms or no known metrics")
    this = result.get("run_arm")
    config, heldout = result.get("config") or {}, result.get("heldout") or {}
    classes, pairs = heldout.get("classification") or {}, heldout.get("pairs") or {}
    seeds = result.get("seeds") or []

    def cell(arm: dict, metric: str) -> str:
        mean, std = arm["mean"].get(metric), arm["std"].get(metric)
        return "-" if mean is None else f"{mean:.3f}" + ("" if std is None else f" ± {std:.3f}")

    header = "".join(f"<th>{esc(EVAL_METRICS[m])}</th>" for m in metrics)
    rows = "".join(
        f'<tr data-arm="{esc(a["name"])}"{_THIS_ARM if a["name"] == this else ""}><td>{esc(a["name"])}</td>'
        f'<td>{esc(a["kind"])}</td><td class="n">{a.get("selected", 0):,}</td>'
        + "".join(f'<td class="n">{cell(a, m)}</td>' for m in metrics) + "</tr>" for a in arms)
    intro = (f'<p>The same model (<code>{esc(config.get("model"))}</code>, from scratch, open_clip\'s trainer) '
             f'trained on {result.get("subset_size", 0):,} samples of each arm for {result.get("steps")} steps of '
             f'{result.get("batch_size")} with seeds {esc(", ".join(map(str, seeds)))}; <code>random</code> is a '
             f'uniformly random subset of the pool\'s {result.get("pool_trainable", 0):,} readable samples. '
             f'Held out: {classes.get("images", 0):,} labelled images of {classes.get("classes", 0)} classes '
             f'(zero-shot, prompts from {len(heldout.get("templates") or [])} templates) and {pairs.get("pairs", 0):,} '
             f'image-caption pairs (recall@k). Mean ± standard deviation over seeds; this run is '
             f'<code>{esc(this)}</code>.</p>')
    table = (f'<table id="eval-table"><thead><tr><th>arm</th><th>kind</th><th>selected</th>{header}</tr></thead>'
             f'<tbody>{rows}</tbody></table>')
    figure = _eval_figure(arms, metrics, this)
    return intro + table + _svg_img(figure, "each metric per arm: mean over seeds with its standard deviation, and "
                                    "each seed's value", "eval-plot")


def _eval_figure(arms: list[dict], metrics: list[str], this: str | None):
    import numpy as np

    columns = min(3, len(metrics))
    lines = -(-len(metrics) // columns)
    figure = _figure(3.4 * columns, 0.6 + 2.6 * lines)
    axes = np.atleast_1d(figure.subplots(lines, columns, squeeze=False)).ravel()
    names = [a["name"] for a in arms]
    colours = [ARM_COLOURS["this run"] if a["name"] == this else ARM_COLOURS["random"] if a["kind"] == "random"
               else ARM_COLOURS["other"] for a in arms]
    for ax, metric in zip(axes, metrics):
        means = [a["mean"][metric] for a in arms]
        stds = [a["std"][metric] or 0.0 for a in arms]
        positions = np.arange(len(arms))
        ax.bar(positions, means, yerr=stds, color=colours, alpha=0.75, capsize=4, width=0.6)
        for x, arm in zip(positions, arms):
            values = [s["metrics"][metric] for s in arm["seeds"]]
            offsets = np.linspace(-0.15, 0.15, len(values)) if len(values) > 1 else np.zeros(1)
            ax.scatter(x + offsets, values, s=12, color="black", zorder=3)
        ax.set_xticks(list(positions), names, rotation=30, ha="right", fontsize=8)
        ax.set_title(EVAL_METRICS[metric], fontsize=10)
        ax.set_ylim(0, min(1.0, max(0.05, 1.15 * max(max(s["metrics"][metric] for s in a["seeds"]) for a in arms))))
        ax.spines[["top", "right"]].set_visible(False)
    for ax in axes[len(metrics):]:
        ax.set_visible(False)
    return figure


SECTIONS: list[Section] = [
    Section("overview", "Run", overview_section),
    Section("stages", "Stages", stages_section),
    Section("shard-errors", "Shard errors", shard_errors_section),
    Section("counts", "Kept and dropped", counts_section),
    Section("clip-scores", "CLIP scores", _score_section("clip_score", "CLIP", "select.clip")),
    Section("dfn-scores", "DFN scores", _score_section("dfn_score", "DFN", "select.dfn")),
    Section("dbp", "Density-based pruning", dbp_section),
    Section("dedup", "Duplicates", dedup_section),
    Section("faces", "Faces", faces_section),
    Section("evaluation", "Evaluation", evaluation_section),
    Section("examples", "Examples", examples_section),
]


# -- samples and thumbnails --------------------------------------------------------------------

def _sample_key(sample: dict) -> tuple:
    return sample.get("partition"), sample.get("row"), sample.get("uid")


def _duplicate_pairs(inputs: ReportInputs, kind: str, limit: int) -> list[tuple[dict, dict | None]]:
    """(dropped sample, the sample its duplicate_of names) for the smallest uids dropped as `kind`.

    For duplicate_uid both share the uid, so the partner is the other row with it, preferring one
    that survived dedup (kept, or dropped by a later step)."""
    columns = inputs.tile_columns()
    dropped = inputs.rows(f"select {columns} from samples s where drop_reason = ? and duplicate_of is not null "
                          f"order by uid, partition, row limit {int(limit)}", [kind])
    last_dedup = max(REASON_NAMES.index(r) for r in DEDUP_REASONS)
    pairs = []
    for sample in dropped:
        partner = inputs.rows(
            f"select {columns} from samples s left join reasons r on r.name = s.drop_reason "
            "where s.uid = ? and not (s.partition = ? and s.row = ?) "
            f"order by s.kept desc, coalesce(r.rank > {last_dedup}, false) desc, r.rank desc, s.partition, s.row limit 1",
            [sample["duplicate_of"], sample.get("partition"), sample.get("row")],
        )
        pairs.append((sample, partner[0] if partner else None))
    return pairs


def _pictures(inputs: ReportInputs, samples: list[dict]) -> list[str]:
    """The picture box of each sample's tile: an embedded thumbnail, or a text tile saying why not."""
    out: list[str | None] = [None] * len(samples)
    by_source: dict[str, list[int]] = {}
    for i, sample in enumerate(samples):
        reason = sample.get("drop_reason")
        if reason in NOT_DECODED:
            out[i] = _text_tile(f"not decoded ({reason}): {MEANING[reason]}")
        elif sample.get("image_offset") is None or sample.get("image_size") is None:
            out[i] = _text_tile("no image bytes recorded for this sample")
        elif (url := inputs.shard_url(sample.get("partition"))) is None:
            out[i] = _text_tile("source shard not listed in manifest.json")
        else:
            by_source.setdefault(url, []).append(i)
    max_pixels = int(inputs.setting("ingest.max_image_pixels", DEFAULT_MAX_PIXELS))
    from pipeline.io.shards import fetch_members

    for url, indices in by_source.items():
        try:
            fetched = fetch_members(url, [samples[i] for i in indices], kinds=("image",), block_size=2**20)
        except Exception as exc:  # a moved or unreadable source shard costs its thumbnails, not the report
            for i in indices:
                out[i] = _text_tile(f"source shard unreadable: {type(exc).__name__}: {exc}")
            continue
        for i, members in zip(indices, fetched):
            out[i] = _thumbnail(members["image"], inputs.thumb_px, max_pixels, samples[i].get("uid"))
    return out


def _thumbnail(data: bytes, px: int, max_pixels: int, uid) -> str:
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                if image.width * image.height > max_pixels:
                    return _text_tile(f"not decoded: {image.width}x{image.height} is more than {max_pixels:,} pixels")
                image.draft("RGB", (px, px))  # JPEG: decode at reduced scale
                image.thumbnail((px, px))
                picture = _flatten_alpha(image)
        buffer = io.BytesIO()
        picture.save(buffer, "JPEG", quality=80, optimize=True)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        return _text_tile("not decoded: the image declares more pixels than Pillow's limit")
    except Exception as exc:  # any decoder failure of untrusted bytes: show it, carry on
        return _text_tile(f"does not decode: {type(exc).__name__}")
    uri = "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
    return (f'<div class="thumb"><img src="{uri}" width="{picture.width}" height="{picture.height}" '
            f'alt="{esc(f"image of sample {uid}")}"></div>')


def _flatten_alpha(image):
    from PIL import Image

    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB")


def _text_tile(text: str) -> str:
    return f'<div class="thumb text-tile"><span>{esc(text)}</span></div>'


def _tile(sample: dict, picture: str, *, label: str | None = None) -> str:
    caption = sample.get("caption")
    if caption is None:
        caption_html = '<p class="caption none">(no caption)</p>'
    else:
        shown = caption if len(caption) <= CAPTION_CHARS else caption[:CAPTION_CHARS] + "…"
        caption_html = f'<p class="caption">{esc(shown)}</p>'
    detail = sample.get("drop_detail")
    detail_html = f'<p class="detail">{esc(detail)}</p>' if detail else ""
    facts = [f"{sample.get('shard')}/{sample.get('key')}"]
    if sample.get("width") and sample.get("height"):
        facts.append(f"{sample['width']}×{sample['height']}")
    for column, short in (("clip_score", "clip"), ("dfn_score", "dfn")):
        if sample.get(column) is not None:
            facts.append(f"{short} {sample[column]:.3f}")
    label_html = f'<p class="label">{esc(label)}</p>' if label else ""
    uid = sample.get("uid") or ""
    return (f'<figure class="tile" data-uid="{esc(uid)}">{label_html}{picture}<figcaption>{caption_html}{detail_html}'
            f'<p class="meta" title="{esc(uid)}">uid {esc(uid[:12])}… · {esc(" · ".join(facts))}</p></figcaption></figure>')


# -- plots -------------------------------------------------------------------------------------

def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)  # no pyplot, no GUI backend
    return figure


def _svg_img(figure, alt: str, element_id: str) -> str:
    import matplotlib

    buffer = io.BytesIO()
    # a fixed hash salt and no date: the same plot gives the same bytes
    with matplotlib.rc_context({"svg.hashsalt": "curate-report", "svg.fonttype": "path"}):
        figure.savefig(buffer, format="svg", metadata={"Date": None})
    width, height = figure.get_size_inches() * 96
    uri = "data:image/svg+xml;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
    return f'<img class="plot" id="{esc(element_id)}" src="{uri}" width="{width:.0f}" height="{height:.0f}" alt="{esc(alt)}">'


def _counts_figure(order: list[str], found: dict[str, int], kept: int):
    labels = ["kept", *order]
    values = [kept, *(found[r] for r in order)]
    colours = [KEPT_COLOUR, *(STEP_COLOURS[STEP.get(r, "other")] for r in order)]
    figure = _figure(8, 0.8 + 0.3 * len(labels))
    ax = figure.subplots()
    positions = range(len(labels))
    ax.barh(positions, values, color=colours)
    ax.set_yticks(list(positions), labels)
    ax.invert_yaxis()
    ax.set_xlabel("samples")
    for y, value in zip(positions, values):
        ax.annotate(f"{value:,}", (value, y), xytext=(3, 0), textcoords="offset points", va="center", fontsize=8)
    ax.margins(x=0.1)
    ax.spines[["top", "right"]].set_visible(False)
    handles = [_patch(STEP_COLOURS[s], s) for s in ("ingest", "basic_filter", "dedup", "select") if any(STEP.get(r) == s for r in order)]
    if handles:
        ax.legend(handles=[_patch(KEPT_COLOUR, "kept"), *handles], loc="lower right", fontsize=8, frameon=False)
    return figure


def _patch(colour: str, label: str):
    from matplotlib.patches import Patch

    return Patch(color=colour, label=label)


OUTCOMES = (
    ("before", "dropped by an earlier step", "#c7c7c7"),
    ("cut", "dropped by this cut", "#d62728"),
    ("later", "passed, dropped by a later step", "#ff9f4a"),
    ("kept", "kept", KEPT_COLOUR),
)


def _histogram_figure(binned: list[tuple], lo: float, width: float, cut: float | None, label: str):
    import numpy as np

    counts = {name: np.zeros(HISTOGRAM_BINS) for name, _, _ in OUTCOMES}
    for index, outcome, count in binned:
        counts[outcome][index] += count
    edges = lo + width * np.arange(HISTOGRAM_BINS)
    figure = _figure(8, 3.2)
    ax = figure.subplots()
    bottom = np.zeros(HISTOGRAM_BINS)
    for name, text, colour in OUTCOMES:
        if counts[name].any():
            ax.bar(edges, counts[name], width=width, bottom=bottom, align="edge", color=colour, label=text, linewidth=0)
            bottom += counts[name]
    if cut is not None:
        ax.axvline(cut, color="black", linestyle="--", linewidth=1.2, label=f"cut {cut:.4f}")
    ax.set_xlabel(f"{label} score (image-text cosine)")
    ax.set_ylabel("samples")
    ax.spines[["top", "right"]].set_visible(False)
    ax.legend(fontsize=8, frameon=False)
    return figure


def _dbp_figure(rows: list[dict]):
    import numpy as np

    size = np.array([r["size"] for r in rows], float)
    quota = np.array([r["quota"] for r in rows], float)
    kept = np.array([r["kept"] for r in rows], float)
    complexity = np.array([np.nan if r["complexity"] is None else r["complexity"] for r in rows], float)
    area = 20 + 180 * quota / max(quota.max(), 1)
    figure = _figure(10, 3.8)
    left, right = figure.subplots(1, 2)
    ok = ~np.isnan(complexity)
    points = left.scatter(complexity[ok], size[ok], s=area[ok], c=quota[ok], cmap="viridis",
                          vmin=quota.min(), vmax=max(quota.max(), quota.min() + 1), edgecolors="black", linewidths=0.4)
    left.set_xlabel("complexity (d_intra × d_inter)")
    left.set_ylabel("cluster size (samples entering DBP)")
    left.set_title("size vs complexity (marker: quota)", fontsize=10)
    left.ticklabel_format(axis="x", style="sci", scilimits=(-3, 3))
    right.scatter(size, kept, s=area, c=quota, cmap="viridis", vmin=quota.min(), vmax=max(quota.max(), quota.min() + 1),
                  edgecolors="black", linewidths=0.4)
    top = max(size.max(), 1)
    right.plot([0, top], [0, top], color="grey", linestyle=":", linewidth=1, label="all kept")
    right.set_xlabel("cluster size")
    right.set_ylabel("kept by DBP")
    right.set_title("kept vs size", fontsize=10)
    right.legend(fontsize=8, frameon=False, loc="upper left")
    for ax in (left, right):
        ax.spines[["top", "right"]].set_visible(False)
    figure.colorbar(points, ax=[left, right], label="quota", shrink=0.9)
    return figure


# -- text helpers ------------------------------------------------------------------------------

def _percent(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "-"


def _num(value) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}"


def _flatten(node, prefix: str = "") -> list[tuple[str, object]]:
    if isinstance(node, dict) and node:
        return [item for key, value in node.items() for item in _flatten(value, f"{prefix}{key}.")]
    return [(prefix.rstrip("."), node)]


def _cut(rule: dict) -> str:
    if (rule or {}).get("threshold") is not None:
        return f"score >= {rule['threshold']:g}"
    if (rule or {}).get("fraction") is not None:
        return f"top {rule['fraction']:g} of the samples reaching it"
    return "off"


def _on(value) -> str:
    return "on" if value else "off"


def _dedup_settings(inputs: ReportInputs) -> str:
    s = inputs.setting
    phash = f"on (radius {s('dedup.phash_radius', '?')})" if s("dedup.phash", True) else "off"
    semantic = f"on (eps {s('dedup.semantic_eps', '?')})" if s("dedup.semantic", False) else "off"
    return f"exact {_on(s('dedup.exact', True))}, pHash {phash}, semantic {semantic}"


def _settings_summary(inputs: ReportInputs) -> list[tuple[str, str]]:
    s = inputs.setting
    languages = ", ".join(s("basic_filter.languages", [])) or "any"
    basic = ("off" if not s("basic_filter.enabled", True) else
             f"languages {languages}; at least {s('basic_filter.min_caption_words', '?')} words and "
             f"{s('basic_filter.min_caption_chars', '?')} characters; min side {s('basic_filter.min_image_side', '?')} px; "
             f"aspect at most {s('basic_filter.max_aspect_ratio', '?')}")

    def model(section: str) -> str:
        name, pretrained = s(f"{section}.model"), s(f"{section}.pretrained")
        return "off" if name is None else name + (f" ({pretrained})" if pretrained else "")

    dbp = (f"target {s('select.dbp.target')}, k {s('select.dbp.k')}, temperature {s('select.dbp.temperature')}"
           if s("select.dbp.enabled", False) else "off")
    return [
        ("basic filter", basic),
        ("embed", model("embed")),
        ("DFN scorer", model("dfn")),
        ("dedup", _dedup_settings(inputs)),
        ("CLIP cut", _cut(s("select.clip", {}))),
        ("DFN cut", _cut(s("select.dfn", {}))),
        ("DBP", dbp),
        ("SQL filter", s("select.where") or "off"),
        ("shard size", f"{s('write.shard_size', '?')} samples"),
    ]


# -- command line ------------------------------------------------------------------------------

def add_report_parser(subparsers, parents=()) -> None:
    """`curate report`; `parents` carry the options every subcommand shares."""
    parser = subparsers.add_parser("report", parents=list(parents), help="(re)write a run's report.html")
    parser.add_argument("run_dir", help="the run's output directory or URL")
    parser.add_argument("--out", help="where to write the report (default: RUN_DIR/report.html; any fsspec URL)")
    parser.add_argument("--examples-per-reason", type=int, default=8,
                        help="example samples shown per drop reason (default: %(default)s)")
    parser.add_argument("--thumb-px", type=int, default=160,
                        help="longest side of the embedded thumbnails, in pixels (default: %(default)s)")
    parser.set_defaults(func=_cmd_report)


def _cmd_report(args) -> int:
    run_dir = args.run_dir.rstrip("/")  # a URL that is no run: build_report raises NotARunError
    out = args.out or fs.join(run_dir, "report.html")
    page = build_report(run_dir, examples_per_reason=args.examples_per_reason, thumb_px=args.thumb_px).encode("utf-8")
    fs.write_bytes_atomic(out, page)
    print(f"wrote {out} ({len(page) / 2**20:.1f} MiB)")
    return 0


# -- page --------------------------------------------------------------------------------------

CSS = """
:root { --ink: #1d2329; --muted: #5b6570; --line: #d9dee3; --panel: #f6f8fa; }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif;
       color: var(--ink); background: #fff; }
header { padding: 18px 28px 10px; border-bottom: 1px solid var(--line); background: var(--panel); }
header h1 { margin: 0 0 4px; font-size: 22px; }
header p { margin: 0 0 8px; color: var(--muted); word-break: break-all; }
nav ul { list-style: none; margin: 0; padding: 0; display: flex; flex-wrap: wrap; gap: 4px 16px; }
nav a { color: #0b5cad; text-decoration: none; }
main { max-width: 1240px; padding: 8px 28px 40px; }
section { margin-top: 26px; }
section.skipped h2 { color: var(--muted); }
h2 { font-size: 18px; border-bottom: 1px solid var(--line); padding-bottom: 4px; }
h3 { font-size: 15px; margin: 18px 0 4px; }
table { border-collapse: collapse; margin: 8px 0; }
th, td { padding: 3px 10px 3px 0; text-align: left; vertical-align: top; border-bottom: 1px solid var(--line); }
thead th { font-weight: 600; color: var(--muted); }
td.n { text-align: right; font-variant-numeric: tabular-nums; }
table.kv th { font-weight: 600; padding-right: 18px; white-space: nowrap; }
table.small { font-size: 12px; }
tfoot td { font-weight: 600; border-bottom: none; }
tr.kept td { background: #eef8ee; }
code { font: 12px/1.3 ui-monospace, "SFMono-Regular", Menlo, Consolas, monospace; }
td code { word-break: break-all; }
.swatch { display: inline-block; width: 10px; height: 10px; margin-right: 6px; border-radius: 2px; }
.note { color: var(--muted); margin: 2px 0 8px; }
.count { color: var(--muted); font-weight: 400; font-size: 13px; margin-left: 6px; }
details { margin: 8px 0; }
summary { cursor: pointer; color: #0b5cad; }
img.plot { display: block; max-width: 100%; height: auto; margin: 10px 0; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(var(--tile), 1fr)); gap: 12px; }
.pairs { display: flex; flex-wrap: wrap; gap: 14px; }
.pair { display: grid; grid-template-columns: repeat(2, var(--tile)); gap: 8px; padding: 8px;
        border: 1px solid var(--line); border-radius: 6px; background: var(--panel); }
figure.tile { margin: 0; min-width: 0; }
.thumb { width: var(--tile); height: var(--tile); display: flex; align-items: center; justify-content: center;
         background: #eceff2; border-radius: 4px; overflow: hidden; }
.thumb img { max-width: 100%; max-height: 100%; object-fit: contain; }
.text-tile { padding: 10px; text-align: center; font-size: 12px; color: var(--muted);
             background: repeating-linear-gradient(45deg, #f3f4f6, #f3f4f6 8px, #e9ebee 8px, #e9ebee 16px); }
figcaption p { margin: 3px 0 0; overflow-wrap: anywhere; }
.caption { font-size: 13px; }
.caption.none { color: var(--muted); font-style: italic; }
.detail { font-size: 12px; color: #a33; }
.meta { font-size: 11px; color: var(--muted); }
.label { font-size: 12px; font-weight: 600; margin: 0 0 3px; }
"""

def _page(title: str, run_url: str, toc: str, body: str, tile_px: int) -> str:
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{CSP}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{esc(title)}</title>
<style>{CSS}</style>
</head>
<body style="--tile: {int(tile_px)}px">
<header>
<h1>Curate run report</h1>
<p>{esc(run_url)}</p>
<nav><ul>{toc}</ul></nav>
</header>
<main>
{body}
</main>
</body>
</html>
"""
