"""The stages of a run, declared once: what each reads, when it runs, what it asks of the cluster.

The runner's plan (which stages run, in order), the fingerprints a stage's resume depends on (the
stages it reads), the config's cross-checks (an option that needs a stage that is off) and the
reads a stage may make (RunContext.read) all come from these records. A stage's module holds its
code: `run(ctx)`, `config_fingerprint(config)` (the config it depends on) and `outputs(paths)`
(what a fresh start clears); it is imported only when the stage runs, so a run without a model
never imports the model code.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Callable

Needs = dict[str, "str | None"]  # stage read -> the option that makes this stage read it (None: always)


@dataclass(frozen=True)
class Resources:
    """What one worker (task or actor) of a stage asks Ray for; the Ray adapter maps it to Ray's
    options, and pools are sized from it and `ray.max_workers`, never from an empty cluster."""

    cpus: float = 1.0
    gpus: float = 0.0  # used where the cluster has GPUs


@dataclass(frozen=True)
class Stage:
    name: str
    module: str  # pipeline.stages.<module>
    needs: Callable[[object], Needs]  # stages it must read, for this config
    enabled: Callable[[object], bool] = lambda config: True
    uses: tuple[str, ...] = ()  # stages it reads when they run (their columns join the metadata)
    resources: Resources = field(default_factory=Resources)

    def code(self):
        return importlib.import_module(f"pipeline.stages.{self.module}")

    def reads(self, config, running: set[str]) -> tuple[str, ...]:
        """The stages this one reads in a run whose stages are `running`, in plan order."""
        wanted = set(self.needs(config)) | {name for name in self.uses if name in running}
        return tuple(name for name in ORDER if name in wanted)

    def config_fingerprint(self, config) -> dict:
        return self.code().config_fingerprint(config)

    def outputs(self, paths) -> list[str]:
        return self.code().outputs(paths)

    def run(self, ctx) -> None:
        self.code().run(ctx)


def _select_on(config) -> bool:
    rules = config.select
    return bool(rules.subset or rules.faces == "drop" or rules.clip.enabled or rules.dfn.enabled or rules.dbp.enabled
                or rules.where)


def _select_needs(config) -> Needs:
    needs: Needs = {"ingest": None, "dedup": None}
    # select.dfn reads the embed stage's files too, but lacks a DFN scorer first (a config check of its own)
    options = [option for option, on in (("select.clip", config.select.clip.enabled),
                                         ("select.dbp", config.select.dbp.enabled)) if on]
    if options:
        needs["embed"] = ", ".join(options)
    if config.select.faces == "drop":
        needs["faces"] = "select.faces"
    return needs


def _write_needs(config) -> Needs:
    needs: Needs = {"metadata": None}
    if config.write.embeddings:
        needs["embed"] = "write.embeddings"
    if config.write.blur_faces:
        needs["faces"] = "write.blur_faces"  # the boxes reach it in the metadata; its output depends on them
    return needs


def faces_provided(config) -> bool:
    """The faces come with embed.provided's DataComp metadata (its face_bboxes), not from the detector."""
    return config.faces.enabled and config.faces.source == "provided"


def _semantic(config) -> Needs:
    return {"embed": "dedup.semantic", "cluster": "dedup.semantic"} if config.dedup.semantic else {}


STAGES: tuple[Stage, ...] = (
    Stage("ingest", "ingest", needs=lambda c: {}),
    Stage("embed", "embed", needs=lambda c: {"ingest": None}, enabled=lambda c: c.embed.enabled,
          resources=Resources(cpus=1, gpus=1)),
    Stage("faces", "faces", needs=lambda c: {"ingest": None, **({"embed": "faces.source"} if faces_provided(c) else {})},
          enabled=lambda c: c.faces.enabled,
          resources=Resources(cpus=1)),
    Stage("cluster", "cluster", needs=lambda c: {"ingest": None, "embed": "dedup.semantic"},
          enabled=lambda c: c.dedup.semantic, resources=Resources(cpus=1, gpus=1)),
    Stage("dedup", "dedup", needs=lambda c: {"ingest": None, **_semantic(c)}, resources=Resources(cpus=1, gpus=0.5)),
    Stage("select", "select", needs=_select_needs, enabled=_select_on, uses=("embed", "cluster", "faces"),
          resources=Resources(cpus=1, gpus=1)),
    Stage("metadata", "metadata", needs=lambda c: {"ingest": None, "dedup": None, **({"select": None} if _select_on(c) else {})},
          uses=("embed", "cluster", "faces"), resources=Resources(cpus=0.5)),
    Stage("write", "write", needs=_write_needs),
    Stage("report", "report", needs=lambda c: {"metadata": None, "write": None}),
)
ORDER = tuple(stage.name for stage in STAGES)
BY_NAME = {stage.name: stage for stage in STAGES}


def planned(config) -> list[tuple[Stage, tuple[str, ...]]]:
    """The stages this config runs, in order, each with the stages it reads."""
    on = [stage for stage in STAGES if stage.enabled(config)]
    running = {stage.name for stage in on}
    return [(stage, stage.reads(config, running)) for stage in on]


def missing_inputs(config) -> dict[str, list[str]]:
    """Stages that are off but that an enabled stage's option needs: stage -> those options."""
    on = {stage.name for stage in STAGES if stage.enabled(config)}
    missing: dict[str, list[str]] = {}
    for stage in STAGES:
        if stage.name not in on:
            continue
        for needed, option in stage.needs(config).items():
            if needed not in on and option is not None:
                missing.setdefault(needed, []).extend(o for o in option.split(", ") if o not in missing.get(needed, []))
    return missing
