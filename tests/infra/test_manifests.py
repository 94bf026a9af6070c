"""infra/: the container image, the Ray cluster launcher config and the KubeRay manifests, checked
offline (no Kubernetes cluster, no Docker engine, no network).

What each part is validated against:
- Kubernetes objects (Namespace, Secret, ConfigMap, ServiceAccount, Role, RoleBinding, CronJob), and
  every pod template and ObjectMeta inside the Ray custom resources: the Kubernetes JSON schemas that
  the `kubernetes-validate` wheel ships, in their strict variant (an unknown field fails), for
  Kubernetes KUBERNETES_VERSION.
- RayCluster, RayJob, RayCronJob (also a RayJob kept inside a ConfigMap): the JSON Schema in
  infra/kuberay/schema/ (written from KubeRay's ray.io/v1 API reference, additionalProperties: false);
  and, when CURATE_KUBERAY_CRDS names directories of KubeRay's CRD YAMLs (separated by the path
  separator), each CRD's openAPIV3Schema, made strict the way `kubectl apply --validate=strict` is.
- infra/cluster.yaml: Ray's own launcher schema (ray-schema.json in the ray wheel), then Ray's
  prepare_config + validate_config (defaults merged, node-type checks).
- infra/Dockerfile: its Ray tag is the installed Ray, its torch pins are requirements/pins.in's, it installs
  the project and copies jobs/ under the working directory the pods use.
- every entrypoint (manifests and infra/README.md): expanded by bash as KubeRay's submitter does, its
  --config file exists in jobs/, and the file plus its overrides validates with load_config.
"""

from __future__ import annotations

import copy
import datetime as dt
import functools
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

kubernetes_validate = pytest.importorskip(
    "kubernetes_validate", reason="pip install kubernetes-validate (the test extra) for the Kubernetes schemas"
)

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
KUBERAY = INFRA / "kuberay"
SCHEMA_PATH = KUBERAY / "schema" / "kuberay-ray.io-v1.schema.json"
KUBERNETES_VERSION = "1.30"  # the oldest Kubernetes the manifests target (CronJob.timeZone is GA since 1.27)
RAY_KINDS = ("RayCluster", "RayJob", "RayCronJob")
CRDS_ENV = "CURATE_KUBERAY_CRDS"


# ---------------------------------------------------------------------------------------------------
# Loading


def _name(doc: dict) -> str:
    meta = doc.get("metadata") or {}
    return meta.get("name") or meta.get("generateName") or "?"


_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml: the CRDs are large


def _load_docs(path: Path) -> list[dict]:
    return [doc for doc in yaml.load_all(path.read_text(), Loader=_LOADER) if doc is not None]


def _collect_objects() -> list[tuple[str, dict]]:
    """(where, object) for every object in infra/kuberay/*.yaml, and for the Kubernetes / Ray objects
    kept as YAML inside a ConfigMap (a RayJob that a CronJob creates). Unparsable files are left to
    test_every_yaml_file_parses."""
    found = []
    for path in sorted(KUBERAY.glob("*.yaml")):
        try:
            docs = _load_docs(path)
        except yaml.YAMLError:
            continue
        for doc in docs:
            if not isinstance(doc, dict):
                continue
            found.append((f"{path.name}:{doc.get('kind')}/{_name(doc)}", doc))
            if doc.get("kind") == "ConfigMap":
                for key, text in (doc.get("data") or {}).items():
                    if not key.endswith((".yaml", ".yml")):
                        continue
                    for inner in yaml.safe_load_all(text):
                        if isinstance(inner, dict) and "apiVersion" in inner and "kind" in inner:
                            found.append((f"{path.name}:ConfigMap/{_name(doc)}[{key}]:{inner['kind']}/{_name(inner)}", inner))
    return found


OBJECTS = _collect_objects()
RAY_OBJECTS = [(w, d) for w, d in OBJECTS if d.get("apiVersion") == "ray.io/v1"]
K8S_OBJECTS = [(w, d) for w, d in OBJECTS if not str(d.get("apiVersion", "")).startswith("ray.io/")]


def _ids(items):
    return [where for where, _ in items]


def cluster_specs(doc: dict):
    """(path, RayClusterSpec) of a Ray object."""
    spec = doc.get("spec") or {}
    if doc["kind"] == "RayCluster":
        yield "spec", spec
    elif doc["kind"] == "RayJob" and "rayClusterSpec" in spec:
        yield "spec.rayClusterSpec", spec["rayClusterSpec"]
    elif doc["kind"] == "RayCronJob" and "rayClusterSpec" in spec.get("jobTemplate", {}):
        yield "spec.jobTemplate.rayClusterSpec", spec["jobTemplate"]["rayClusterSpec"]


def job_specs(doc: dict):
    """(path, RayJobSpec) of a RayJob or RayCronJob."""
    if doc["kind"] == "RayJob":
        yield "spec", doc.get("spec") or {}
    elif doc["kind"] == "RayCronJob":
        yield "spec.jobTemplate", (doc.get("spec") or {}).get("jobTemplate") or {}


def groups(cluster_spec: dict):
    """(name, group spec) for the head and each worker group."""
    yield "head", cluster_spec.get("headGroupSpec") or {}
    for group in cluster_spec.get("workerGroupSpecs") or []:
        yield group.get("groupName", "?"), group


def pod_templates(doc: dict):
    """(path, PodTemplateSpec) of every pod template inside a Ray object."""
    for prefix, cluster in cluster_specs(doc):
        yield f"{prefix}.headGroupSpec.template", (cluster.get("headGroupSpec") or {}).get("template")
        for i, group in enumerate(cluster.get("workerGroupSpecs") or []):
            yield f"{prefix}.workerGroupSpecs[{i}].template", group.get("template")
    for prefix, job in job_specs(doc):
        if "submitterPodTemplate" in job:
            yield f"{prefix}.submitterPodTemplate", job["submitterPodTemplate"]


def entrypoints():
    """(where, entrypoint string) from the manifests and from infra/README.md's command lines."""
    found = []
    for where, doc in RAY_OBJECTS:
        for prefix, job in job_specs(doc):
            if "entrypoint" in job:
                found.append((f"{where}:{prefix}.entrypoint", job["entrypoint"]))
    readme = INFRA / "README.md"
    if readme.exists():
        blocks = re.findall(r"^```(?:bash|sh|console)?\n(.*?)^```", readme.read_text(), flags=re.M | re.S)
        for b, block in enumerate(blocks, 1):
            for line in re.sub(r"\\\n\s*", " ", block).splitlines():
                at = line.find("python pipeline/curate.py")
                if at >= 0:
                    found.append((f"README.md:block{b}", line[at:].split(" #", 1)[0].strip()))
    return found


ENTRYPOINTS = entrypoints()


# ---------------------------------------------------------------------------------------------------
# Validators: each returns a list of error strings, empty when valid.


def k8s_errors(doc: dict) -> list[str]:
    try:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        return [f"{'.'.join(map(str, exc.absolute_path)) or '(top)'}: {exc.message}"]
    except kubernetes_validate.SchemaNotFoundError as exc:
        return [exc.message]
    return []


def pod_template_errors(template) -> list[str]:
    """A PodTemplateSpec, validated as the `template` of a core/v1 PodTemplate."""
    return k8s_errors({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": template})


def object_meta_errors(meta) -> list[str]:
    """An ObjectMeta, validated as the metadata of an otherwise empty ConfigMap."""
    return k8s_errors({"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta})


SCHEMA = json.loads(SCHEMA_PATH.read_text())


def _format(errors) -> list[str]:
    return [f"{'.'.join(map(str, e.absolute_path)) or '(top)'}: {e.message}" for e in errors]


def own_schema_errors(doc: dict) -> list[str]:
    kind = doc.get("kind")
    if kind not in RAY_KINDS:
        return [f"kind {kind!r} is not one of {RAY_KINDS}"]
    schema = {k: v for k, v in SCHEMA.items() if k != "oneOf"} | {"$ref": f"#/$defs/{kind}"}
    validator = jsonschema.Draft202012Validator(schema)
    return _format(sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path))))


def _strict(node):
    """A CRD schema where an object with listed properties takes no others (unless it says it keeps
    unknown fields): what `kubectl apply --validate=strict` and server-side field validation enforce,
    where the API server would otherwise prune the field silently."""
    if not isinstance(node, dict):
        return node
    node = dict(node)
    for key in ("properties", "patternProperties"):
        if isinstance(node.get(key), dict):
            node[key] = {name: _strict(sub) for name, sub in node[key].items()}
    for key in ("items", "additionalProperties", "not"):
        if isinstance(node.get(key), dict):
            node[key] = _strict(node[key])
    for key in ("allOf", "anyOf", "oneOf"):
        if isinstance(node.get(key), list):
            node[key] = [_strict(sub) for sub in node[key]]
    if "properties" in node and "additionalProperties" not in node and not node.get("x-kubernetes-preserve-unknown-fields"):
        node["additionalProperties"] = False
    return node


def official_crds() -> dict[str, dict[str, dict]]:
    """{directory: {kind: strict openAPIV3Schema of ray.io/v1}} from CURATE_KUBERAY_CRDS."""
    return _official_crds(os.environ.get(CRDS_ENV, ""))


@functools.lru_cache(maxsize=4)
def _official_crds(setting: str) -> dict[str, dict[str, dict]]:
    result = {}
    for directory in filter(None, setting.split(os.pathsep)):
        kinds = {}
        paths = sorted(Path(directory).glob("*.yaml")) + sorted(Path(directory).glob("*.yml"))
        assert paths, f"{CRDS_ENV}: no CRD YAML files in {directory}"
        for path in paths:
            for doc in _load_docs(path):
                if doc.get("kind") != "CustomResourceDefinition" or doc["spec"].get("group") != "ray.io":
                    continue
                for version in doc["spec"]["versions"]:
                    if version["name"] == "v1":
                        kinds[doc["spec"]["names"]["kind"]] = _strict(version["schema"]["openAPIV3Schema"])
        result[directory] = kinds
    return result


def crd_errors(doc: dict, schema: dict) -> list[str]:
    # openAPIV3Schema is OpenAPI 3.0's JSON Schema dialect (draft 4 based); CEL rules
    # (x-kubernetes-validations) are not evaluated here.
    validator = jsonschema.Draft4Validator(schema)
    return _format(sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path))))


def launcher_errors(config: dict) -> list[str]:
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    errors = _format(jsonschema.Draft7Validator(schema).iter_errors(config))
    if errors:
        return errors
    try:
        validate_config(prepare_config(copy.deepcopy(config)))
    except (ValueError, RuntimeError, AssertionError, jsonschema.ValidationError) as exc:
        return [f"{type(exc).__name__}: {exc}"]
    return []


# ---------------------------------------------------------------------------------------------------
# Parsing


def test_every_yaml_file_parses():
    files = sorted(INFRA.rglob("*.yaml")) + sorted(INFRA.rglob("*.yml"))
    assert {p.relative_to(INFRA).as_posix() for p in files} >= {
        "cluster.yaml", "kuberay/raycluster.yaml", "kuberay/rayjob.yaml", "kuberay/raycronjob.yaml", "kuberay/cronjob.yaml",
    }
    for path in files:
        docs = _load_docs(path)
        assert docs, f"{path}: empty"
        for doc in docs:
            assert isinstance(doc, dict), f"{path}: a document is not a mapping"
            if path.parent == KUBERAY:
                assert {"apiVersion", "kind", "metadata"} <= doc.keys(), f"{path}: {_name(doc)} lacks apiVersion/kind/metadata"
    jsonschema.Draft202012Validator.check_schema(SCHEMA)


def test_the_expected_objects_are_there():
    kinds = {d["kind"] for _, d in OBJECTS}
    assert kinds >= {"RayCluster", "RayJob", "RayCronJob", "CronJob", "ServiceAccount", "Role", "RoleBinding", "Secret", "ConfigMap"}
    # the CronJob's RayJob lives in a ConfigMap and is validated like the others
    assert any("[" in where and d["kind"] == "RayJob" for where, d in RAY_OBJECTS)


# ---------------------------------------------------------------------------------------------------
# Kubernetes schemas


@pytest.mark.parametrize("where,doc", K8S_OBJECTS, ids=_ids(K8S_OBJECTS))
def test_kubernetes_object_validates(where, doc):
    assert k8s_errors(doc) == [], where


@pytest.mark.parametrize("where,doc", RAY_OBJECTS, ids=_ids(RAY_OBJECTS))
def test_pod_templates_and_metadata_of_ray_objects_validate(where, doc):
    errors = [f"metadata: {e}" for e in object_meta_errors(doc.get("metadata"))]
    templates = list(pod_templates(doc))
    assert templates or doc["kind"] != "RayCluster"
    for path, template in templates:
        errors += [f"{path}: {e}" for e in pod_template_errors(template)]
    assert errors == [], where


# ---------------------------------------------------------------------------------------------------
# KubeRay schemas


@pytest.mark.parametrize("where,doc", RAY_OBJECTS, ids=_ids(RAY_OBJECTS))
def test_ray_object_validates_against_kuberay_schema(where, doc):
    assert own_schema_errors(doc) == [], where


@pytest.mark.parametrize("where,doc", RAY_OBJECTS, ids=_ids(RAY_OBJECTS))
def test_ray_object_validates_against_official_crds(where, doc):
    if not os.environ.get(CRDS_ENV):
        pytest.skip(
            f"{CRDS_ENV} is not set: set it to a directory of KubeRay's CRD YAMLs (ray-operator/config/crd/bases "
            "or the Helm chart's crds/; several separated by ':') to also validate against their openAPIV3Schema"
        )
    errors, checked = [], []
    for directory, kinds in official_crds().items():
        if doc["kind"] not in kinds:
            continue  # e.g. no RayCronJob before KubeRay v1.6
        checked.append(directory)
        errors += [f"[{directory}] {e}" for e in crd_errors(doc, kinds[doc["kind"]])]
    if not checked:
        pytest.skip(f"no {doc['kind']} CRD in {os.environ[CRDS_ENV]}")
    assert errors == [], where


# ---------------------------------------------------------------------------------------------------
# Consistency between the manifests


def _spec_without_replicas(cluster_spec: dict) -> dict:
    spec = copy.deepcopy(cluster_spec)
    for group in spec.get("workerGroupSpecs") or []:
        group.pop("replicas", None)
    return spec


def test_every_ray_cluster_spec_is_raycluster_yaml():
    (reference,) = [d["spec"] for _, d in RAY_OBJECTS if d["kind"] == "RayCluster"]
    copies = [(f"{where}:{path}", spec) for where, d in RAY_OBJECTS for path, spec in cluster_specs(d) if d["kind"] != "RayCluster"]
    assert len(copies) >= 3
    for where, spec in copies:
        assert _spec_without_replicas(spec) == _spec_without_replicas(reference), f"{where} differs from raycluster.yaml"


def test_daily_rayjob_is_the_same_with_either_scheduler():
    cron = [d for _, d in RAY_OBJECTS if d["kind"] == "RayCronJob"]
    created = [d for where, d in RAY_OBJECTS if d["kind"] == "RayJob" and "[" in where]
    assert len(cron) == 1 and len(created) == 1
    assert created[0]["spec"] == cron[0]["spec"]["jobTemplate"]
    (cronjob,) = [d for _, d in K8S_OBJECTS if d["kind"] == "CronJob"]
    assert cronjob["spec"]["schedule"] == cron[0]["spec"]["schedule"]
    assert cronjob["spec"].get("timeZone") in ("Etc/UTC", "UTC")


def test_ray_version_and_images():
    import ray

    for where, doc in RAY_OBJECTS:
        for path, cluster in cluster_specs(doc):
            assert cluster.get("rayVersion") == ray.__version__, f"{where}:{path}.rayVersion"
            for group_name, group in groups(cluster):
                container = group["template"]["spec"]["containers"][0]
                gpus = int((container.get("resources", {}).get("limits") or {}).get("nvidia.com/gpu", 0))
                flavour = "gpu" if gpus else "cpu"
                assert re.fullmatch(rf"[a-z0-9.-]+(:\d+)?/[a-z0-9._/-]+:[\w.-]+-{flavour}", container["image"]), (
                    f"{where}:{path} group {group_name}: image {container['image']} should be the -{flavour} build"
                )
    launcher = yaml.safe_load((INFRA / "cluster.yaml").read_text())
    assert launcher["docker"]["image"].endswith("-cpu")
    for name, node_type in launcher["available_node_types"].items():
        image = (node_type.get("docker") or {}).get("worker_image", launcher["docker"]["image"])
        assert image.endswith("-gpu" if node_type["resources"].get("GPU") else "-cpu"), f"cluster.yaml node type {name}: {image}"


_QUANTITY = {"": 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


def _bytes(quantity) -> int:
    match = re.fullmatch(r"(\d+)([kMGT]i?|Ki)?", str(quantity))
    assert match, f"unsupported quantity {quantity!r}"
    return int(match.group(1)) * _QUANTITY[match.group(2) or ""]


def test_object_store_fits_shared_memory_and_pod_memory():
    for where, doc in RAY_OBJECTS:
        for path, cluster in cluster_specs(doc):
            for group_name, group in groups(cluster):
                at = f"{where}:{path} group {group_name}"
                store = _bytes(group["rayStartParams"]["object-store-memory"])
                pod = group["template"]["spec"]
                container = pod["containers"][0]
                (shm,) = [m for m in container.get("volumeMounts", []) if m["mountPath"] == "/dev/shm"]
                (volume,) = [v for v in pod["volumes"] if v["name"] == shm["name"]]
                assert volume["emptyDir"]["medium"] == "Memory", at
                assert store <= _bytes(volume["emptyDir"]["sizeLimit"]), f"{at}: object store larger than /dev/shm"
                limits = container["resources"]["limits"]
                assert store <= _bytes(limits["memory"]) // 2, f"{at}: object store over half the pod's memory"
                assert container["resources"]["requests"] == limits, f"{at}: Ray sizes itself from the limits"
            head = cluster["headGroupSpec"]["rayStartParams"]
            assert head.get("num-cpus") == "0", f"{where}: tasks would be scheduled on the head"
            assert cluster.get("enableInTreeAutoscaling") is True
            for group_name, group in groups(cluster):
                if group_name != "head":
                    assert 0 <= group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"], f"{where} {group_name}"


def test_pods_share_one_namespace_and_read_s3_credentials_from_a_defined_secret():
    namespaces = [d["metadata"]["name"] for _, d in K8S_OBJECTS if d["kind"] == "Namespace"]
    assert len(namespaces) == 1
    (namespace,) = namespaces
    secrets = {d["metadata"]["name"] for _, d in K8S_OBJECTS if d["kind"] == "Secret"}
    for where, doc in OBJECTS:
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == namespace, f"{where}: not in namespace {namespace}"
        if doc["kind"] == "RoleBinding":
            assert all(s.get("namespace") == namespace for s in doc["subjects"]), where
    for where, doc in RAY_OBJECTS:
        for path, template in pod_templates(doc):
            for container in template["spec"]["containers"]:
                refs = [e["secretRef"]["name"] for e in container.get("envFrom", []) if "secretRef" in e]
                assert refs and set(refs) <= secrets, f"{where}:{path}: S3 credentials from {refs}, defined: {secrets}"


def test_cronjob_may_create_the_rayjob_it_mounts():
    (cronjob,) = [d for _, d in K8S_OBJECTS if d["kind"] == "CronJob"]
    pod = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    account = pod["serviceAccountName"]
    assert account in {d["metadata"]["name"] for _, d in K8S_OBJECTS if d["kind"] == "ServiceAccount"}
    bindings = [d for _, d in K8S_OBJECTS if d["kind"] == "RoleBinding" and any(s["name"] == account for s in d["subjects"])]
    roles = {d["metadata"]["name"]: d for _, d in K8S_OBJECTS if d["kind"] == "Role"}
    rules = [r for b in bindings for r in roles[b["roleRef"]["name"]]["rules"]]
    assert any("ray.io" in r["apiGroups"] and "rayjobs" in r["resources"] and "create" in r["verbs"] for r in rules)
    (container,) = pod["containers"]
    argv = container.get("command", []) + container.get("args", [])
    assert argv[:2] == ["kubectl", "create"], argv
    manifest = Path(argv[argv.index("-f") + 1])
    mount = next(m for m in container["volumeMounts"] if manifest.parent == Path(m["mountPath"]))
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    config_maps = {d["metadata"]["name"]: d for _, d in K8S_OBJECTS if d["kind"] == "ConfigMap"}
    rayjob = yaml.safe_load(config_maps[volume["configMap"]["name"]]["data"][manifest.name])
    assert rayjob["kind"] == "RayJob" and "generateName" in rayjob["metadata"], "kubectl create needs a fresh name each day"


# ---------------------------------------------------------------------------------------------------
# Entrypoints


def _expand(entrypoint: str) -> list[str]:
    """The entrypoint's words after bash expansion, as KubeRay's submitter (bash -c) and Ray's job
    supervisor (a shell) produce them."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "TZ": "UTC", "LC_ALL": "C"}
    result = subprocess.run(["bash", "-c", 'printf "%s\\0" ' + entrypoint], capture_output=True, text=True, env=env, timeout=30)
    assert result.returncode == 0, result.stderr
    return result.stdout.split("\0")[:-1]


def _parsed(where: str, entrypoint: str):
    """(job file, overrides as a dict, validated config) of a `python pipeline/curate.py` entrypoint."""
    from pipeline.config import load_config

    argv = _expand(entrypoint)
    assert argv[:2] == ["python", "pipeline/curate.py"], f"{where}: {argv[:2]}"
    assert (ROOT / "pipeline" / "curate.py").is_file()
    rest = argv[2:]
    assert "--config" in rest, f"{where}: no --config"
    at = rest.index("--config")
    config_path = rest[at + 1]
    overrides = rest[:at] + rest[at + 2:]
    assert config_path.startswith("jobs/") and (ROOT / config_path).is_file(), f"{where}: {config_path} not in jobs/"
    assert all("=" in o for o in overrides), f"{where}: {overrides}"
    return config_path, dict(o.split("=", 1) for o in overrides), load_config(str(ROOT / config_path), overrides)


def _is_daily(values: dict, entrypoint: str) -> bool:
    return "reference" in values or "$(" in entrypoint


@pytest.mark.parametrize("where,entrypoint", ENTRYPOINTS, ids=_ids(ENTRYPOINTS))
def test_entrypoint_job_file_exists_and_validates(where, entrypoint):
    _, values, config = _parsed(where, entrypoint)
    if _is_daily(values, entrypoint):
        # a daily incremental run: today's output, directly under the root whose latest successful run
        # it tops up (found at run start), never a fixed previous day that may have failed
        today = dt.datetime.now(dt.timezone.utc).date()
        assert values["output"].endswith(today.isoformat()), values["output"]
        root = values["output"].rsplit("/", 1)[0]
        assert values["reference"] == f"latest:{root}", f"{where}: reference {values['reference']}"
        assert "yesterday" not in entrypoint and "-d " not in entrypoint, f"{where}: a date computed from another day"
        assert config.reference == values["reference"]
    if "[" in where or "RayJob" in where or "RayCronJob" in where:
        assert str(config.output).startswith("s3://"), f"{where}: a cluster run needs an output every node can reach"


SCHEDULED = [(w, e) for w, e in ENTRYPOINTS if "RayCronJob" in w or "ConfigMap" in w]


def test_scheduled_runs_run_the_production_recipe_as_it_is():
    """Both schedulers run jobs/datacomp_dfn.yaml with only the day's input, output and reference set:
    the models and the settings are the job file's (not the demo's, nor overrides of it)."""
    assert len(SCHEDULED) == 2, SCHEDULED
    for where, entrypoint in SCHEDULED:
        config_path, values, config = _parsed(where, entrypoint)
        assert config_path == "jobs/datacomp_dfn.yaml", where
        assert set(values) == {"input", "output", "reference"}, f"{where}: {sorted(values)}"
        assert config.embed.pretrained is not None and config.dfn.pretrained is not None


def test_no_other_run_writes_under_the_daily_runs_root():
    """Any finished run under the root that `latest:` lists can become the next day's reference: manual
    runs (rayjob.yaml, the README's examples) write elsewhere."""
    roots, others = set(), []
    for where, entrypoint in ENTRYPOINTS:
        _, values, _ = _parsed(where, entrypoint)
        if _is_daily(values, entrypoint):
            roots.add(values["reference"].removeprefix("latest:"))
        else:
            others.append((where, values["output"]))
    assert roots and others
    for where, output in others:
        assert not any(output.startswith(root.rstrip("/") + "/") for root in roots), f"{where}: {output} is under {roots}"


# ---------------------------------------------------------------------------------------------------
# The Ray cluster launcher config


def test_cluster_launcher_config_validates_with_rays_schema():
    config = yaml.safe_load((INFRA / "cluster.yaml").read_text())
    assert launcher_errors(config) == []
    assert config["provider"]["type"] == "aws"
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    workers = {name: t for name, t in types.items() if name != config["head_node_type"]}
    assert any(t["resources"].get("GPU") for t in workers.values()), "a GPU worker type for embed"
    assert any(not t["resources"].get("GPU") for t in workers.values()), "a CPU worker type"
    assert sum(t["max_workers"] for t in workers.values()) <= config["max_workers"]
    assert config["setup_commands"] == [], "the image holds everything; no per-node installs"


# ---------------------------------------------------------------------------------------------------
# The container image


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    instructions, pending = [], ""
    for line in text.splitlines():
        if line.lstrip().startswith("#"):
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        if pending.strip():
            word, _, args = pending.strip().partition(" ")
            instructions.append((word.upper(), args.strip()))
        pending = ""
    return instructions


def _arg_defaults(instructions) -> dict[str, str]:
    defaults = {}
    for word, args in instructions:
        if word == "ARG" and "=" in args:
            name, value = args.split("=", 1)
            defaults.setdefault(name, value.strip('"'))
    return defaults


def _dockerignore() -> set[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return {line.strip().rstrip("/") for line in lines if line.strip() and not line.startswith("#")}


def test_dockerfile_builds_on_the_installed_ray_and_installs_the_project():
    import ray

    path = INFRA / "Dockerfile"
    instructions = dockerfile_instructions(path.read_text())
    defaults = _arg_defaults(instructions)
    froms = [args for word, args in instructions if word == "FROM"]
    assert len(froms) == 1
    base = re.sub(r"\$\{(\w+)\}", lambda m: defaults[m.group(1)], froms[0])
    match = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py3(\d+)-(cpu|gpu|cu\d+)", base)
    assert match, f"FROM {froms[0]} -> {base}: not an official rayproject/ray tag"
    assert match.group(1) == ray.__version__, f"image Ray {match.group(1)} != installed Ray {ray.__version__}"
    assert match.group(3) == "cpu", "the default build is the CPU one"
    assert "RAY_PLATFORM" in froms[0], "a build-arg chooses the CPU or CUDA tag"
    requires = re.search(r'requires-python\s*=\s*">=3\.(\d+)"', (ROOT / "pyproject.toml").read_text())
    assert int(match.group(2)) >= int(requires.group(1))

    pins = re.search(r"torch==([\w.+]+)\ntorchvision==([\w.+]+)", (ROOT / "requirements/pins.in").read_text())
    assert (defaults["TORCH_VERSION"], defaults["TORCHVISION_VERSION"]) == pins.groups(), "torch pins differ from pins.in's"

    runs = [args for word, args in instructions if word == "RUN"]
    assert any("pip install" in r and "torch==${TORCH_VERSION}" in r and "torchvision==${TORCHVISION_VERSION}" in r for r in runs)
    assert all("-c requirements/lock.txt" in r for r in runs if "pip install" in r), "every install follows the lock"
    assert any(re.search(r"pip install -c requirements/lock.txt [\"']?\.\[s3,gcs\]", r) for r in runs), \
        "installs the project with its object-store extras"

    (workdir,) = [args for word, args in instructions if word == "WORKDIR"]
    copies = [args.split() for word, args in instructions if word == "COPY"]
    copied = {}
    for words in copies:
        words = [w for w in words if not w.startswith("--")]
        for source in words[:-1]:
            copied[source.rstrip("/")] = words[-1]
    for needed in ("pyproject.toml", "requirements", "pipeline", "jobs"):
        assert needed in copied, f"the image does not copy {needed}"
        assert needed not in _dockerignore(), f".dockerignore excludes {needed}"
        assert (ROOT / needed).exists()
    for source in copied:
        assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
    # pipeline/curate.py and jobs/ land under the working directory, where the pods start Ray
    assert copied["pipeline"].rstrip("/") in ("pipeline", f"{workdir}/pipeline")
    assert copied["jobs"].rstrip("/") in ("jobs", f"{workdir}/jobs")
    for where, doc in RAY_OBJECTS:
        for tpl_path, template in pod_templates(doc):
            for container in template["spec"]["containers"]:
                assert container.get("workingDir") == workdir, f"{where}:{tpl_path}: workingDir != image WORKDIR {workdir}"


def test_dockerignore_keeps_local_state_out_of_the_build_context():
    ignored = _dockerignore()
    assert {".venv", "runs", "demo", ".git"} <= ignored
    assert {".pytest_cache", ".ruff_cache"} <= ignored
    assert any("__pycache__" in p for p in ignored) and any("egg-info" in p for p in ignored)


# ---------------------------------------------------------------------------------------------------
# The validators bite: a misspelt or mistyped field fails each of them.


def _rename(doc: dict, path: list, new_key: str) -> dict:
    doc = copy.deepcopy(doc)
    node = doc
    for key in path[:-1]:
        node = node[key]
    node[new_key] = node.pop(path[-1])
    return doc


def _set(doc: dict, path: list, value) -> dict:
    doc = copy.deepcopy(doc)
    node = doc
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return doc


def _first(kind: str) -> dict:
    return next(d for _, d in OBJECTS if d["kind"] == kind)


def _launcher() -> dict:
    return yaml.safe_load((INFRA / "cluster.yaml").read_text())


def _head_template() -> dict:
    return _first("RayCluster")["spec"]["headGroupSpec"]["template"]


WORKER0 = ["spec", "workerGroupSpecs", 0]
BROKEN = {
    "RayCluster minReplica": lambda: own_schema_errors(
        _rename(_first("RayCluster"), [*WORKER0, "minReplicas"], "minReplica")),
    "RayCluster rayStartParams number": lambda: own_schema_errors(
        _set(_first("RayCluster"), [*WORKER0, "rayStartParams", "object-store-memory"], 17179869184)),
    "RayJob shutdownAfterJobFinish": lambda: own_schema_errors(
        _rename(_first("RayJob"), ["spec", "shutdownAfterJobFinishes"], "shutdownAfterJobFinish")),
    "RayCronJob schedul": lambda: own_schema_errors(
        _rename(_first("RayCronJob"), ["spec", "schedule"], "schedul")),
    "RayCronJob jobTemplate.entrypoints": lambda: own_schema_errors(
        _rename(_first("RayCronJob"), ["spec", "jobTemplate", "entrypoint"], "entrypoints")),
    "pod template container resource": lambda: pod_template_errors(
        _rename(_head_template(), ["spec", "containers", 0, "resources"], "resource")),
    "pod template volume emptydir": lambda: pod_template_errors(
        _rename(_head_template(), ["spec", "volumes", 0, "emptyDir"], "emptydir")),
    "CronJob concurrencypolicy": lambda: k8s_errors(
        _rename(_first("CronJob"), ["spec", "concurrencyPolicy"], "concurrencypolicy")),
    "Role verb": lambda: k8s_errors(_rename(_first("Role"), ["rules", 0, "verbs"], "verb")),
    "cluster.yaml min_worker": lambda: launcher_errors(
        _rename(_launcher(), ["available_node_types", "gpu", "min_workers"], "min_worker")),
    "cluster.yaml max_workers below the sum of min_workers": lambda: launcher_errors(
        _set(_set(_launcher(), ["available_node_types", "cpu", "min_workers"], 4), ["max_workers"], 2)),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_validators_reject_a_misspelt_field(case):
    assert BROKEN[case](), f"{case}: accepted"


def test_official_crd_validation_rejects_a_misspelt_field():
    crds = official_crds()
    if not crds:
        pytest.skip(f"{CRDS_ENV} is not set (see test_ray_object_validates_against_official_crds)")
    broken = _rename(_first("RayCluster"), ["spec", "workerGroupSpecs", 0, "minReplicas"], "minReplica")
    for directory, kinds in crds.items():
        assert crd_errors(broken, kinds["RayCluster"]), directory


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
