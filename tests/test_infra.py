"""Structural checks of infra/: Dockerfiles, KubeRay manifests and the AWS cluster launcher.

Nothing here talks to Docker, Kubernetes or AWS. The KubeRay custom resources are validated
against the CRDs' own ``openAPIV3Schema`` (from the shared data folder), the launcher YAML
against Ray's own ``ray-schema.json``, and both validators are shown to reject broken input.
"""

from __future__ import annotations

import copy
import functools
import gzip
import json
import re
import shlex
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
KUBERAY = INFRA / "kuberay"
LAUNCHER = INFRA / "cluster-launcher" / "aws.yaml"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())

KNOWN_KINDS = {
    ("ray.io/v1", "RayCluster"),
    ("ray.io/v1", "RayJob"),
    ("ray.io/v1", "RayCronJob"),
    ("v1", "ConfigMap"),
    ("v1", "PersistentVolumeClaim"),
    ("v1", "ServiceAccount"),
    ("batch/v1", "CronJob"),
}
CRD_FILES = {
    "RayCluster": "ray.io_rayclusters.yaml.gz",
    "RayJob": "ray.io_rayjobs.yaml.gz",
    "RayCronJob": "ray.io_raycronjobs.yaml.gz",
}
DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


# ----------------------------------------------------------------------------- helpers


def _pin(name: str) -> str:
    """Exact version pinned for ``name`` in pyproject's dependencies."""
    for dep in PYPROJECT["project"]["dependencies"]:
        m = re.match(rf"^{re.escape(name)}(\[[^\]]*\])?==([\w.]+)$", dep)
        if m:
            return m.group(2)
    raise AssertionError(f"pyproject.toml has no exact pin for {name}")


_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


@functools.cache
def _load_all(path: Path) -> list[dict[str, Any]]:
    """Documents of a YAML file (cached: callers must deep-copy before changing them)."""
    return [d for d in yaml.load_all(path.read_text(), Loader=_LOADER) if d is not None]


def _manifest_files() -> list[Path]:
    return sorted(p for p in KUBERAY.glob("*.yaml") if p.name != "operator-values.yaml")


def _docs(kind: str) -> list[dict[str, Any]]:
    return [d for p in _manifest_files() for d in _load_all(p) if d.get("kind") == kind]


def _one(kind: str) -> dict[str, Any]:
    docs = _docs(kind)
    assert len(docs) == 1, f"expected one {kind} in {KUBERAY}, found {len(docs)}"
    return docs[0]


def _cluster_specs() -> dict[str, dict[str, Any]]:
    """Every RayCluster spec in the manifests, standalone or embedded."""
    return {
        "RayCluster": _one("RayCluster")["spec"],
        "RayJob": _one("RayJob")["spec"]["rayClusterSpec"],
        "RayCronJob": _one("RayCronJob")["spec"]["jobTemplate"]["rayClusterSpec"],
    }


def _groups(spec: dict[str, Any]) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(name, group spec, ray container) for the head and every worker group."""
    head = spec["headGroupSpec"]
    out = [("head", head, head["template"]["spec"]["containers"][0])]
    out += [
        (g["groupName"], g, g["template"]["spec"]["containers"][0])
        for g in spec["workerGroupSpecs"]
    ]
    return out


_QUANTITY = re.compile(r"^([0-9.]+)(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$")
_FACTORS = {
    None: 1,
    "m": 1e-3,
    "k": 1e3,
    "M": 1e6,
    "G": 1e9,
    "T": 1e12,
    "P": 1e15,
    "E": 1e18,
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
    "Pi": 2**50,
    "Ei": 2**60,
}


def parse_quantity(value: str | int | float) -> float:
    """Kubernetes resource quantity (``500m``, ``24Gi``, ``6``) as a number."""
    m = _QUANTITY.match(str(value))
    assert m, f"not a Kubernetes quantity: {value!r}"
    return float(m.group(1)) * _FACTORS[m.group(2)]


_CRON_RANGES = [(0, 59), (0, 23), (1, 31), (1, 12), (0, 7)]
_CRON_NAMES = [
    {},
    {},
    {},
    {
        m: i + 1
        for i, m in enumerate(
            ["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"]
        )
    },
    {d: i for i, d in enumerate(["sun", "mon", "tue", "wed", "thu", "fri", "sat"])},
]


def cron_is_valid(expr: str) -> bool:
    """True for a standard 5-field cron expression (numbers, names, ``*``, ranges, steps, lists)."""
    fields = expr.split()
    if len(fields) != 5:
        return False

    def value(tok: str, i: int) -> int | None:
        tok = tok.lower()
        if tok in _CRON_NAMES[i]:
            return _CRON_NAMES[i][tok]
        return int(tok) if tok.isdigit() else None

    for i, field in enumerate(fields):
        lo, hi = _CRON_RANGES[i]
        for item in field.split(","):
            base, _, step = item.partition("/")
            if step and (not step.isdigit() or int(step) == 0):
                return False
            if base == "*":
                continue
            a, _, b = base.partition("-")
            bounds = [value(a, i)] + ([value(b, i)] if b else [])
            if any(v is None or not lo <= v <= hi for v in bounds):
                return False
            if len(bounds) == 2 and bounds[0] > bounds[1]:  # type: ignore[operator]
                return False
    return True


def _daily_period_s(expr: str) -> int | None:
    """Seconds between runs for a once-a-day schedule (``M H * * *``), else None."""
    minute, hour, dom, month, dow = expr.split()
    if minute.isdigit() and hour.isdigit() and dom == month == dow == "*":
        return 86_400
    return None


def _to_jsonschema(node: Any, *, strict: bool = True) -> Any:
    """Turn a CRD structural schema into plain JSON Schema (Draft 7).

    ``x-kubernetes-*`` vendor keys and ``nullable`` are dropped after being honoured:
    int-or-string becomes ``anyOf [integer, string]``, nullable adds ``null``, embedded resources
    admit apiVersion/kind/metadata, and objects with ``properties`` reject unknown fields unless
    they preserve them (what ``kubectl apply`` with its default strict field validation does).
    """
    if isinstance(node, list):
        return [_to_jsonschema(n, strict=strict) for n in node]
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for key, val in node.items():
        if key.startswith("x-kubernetes-") or key == "nullable":
            continue
        if key in ("properties", "patternProperties"):
            out[key] = {name: _to_jsonschema(s, strict=strict) for name, s in val.items()}
        elif key in ("items", "additionalProperties", "not") and isinstance(val, dict):
            out[key] = _to_jsonschema(val, strict=strict)
        elif key in ("allOf", "anyOf", "oneOf"):
            out[key] = [_to_jsonschema(s, strict=strict) for s in val]
        else:
            out[key] = val
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    if node.get("x-kubernetes-embedded-resource"):
        props = out.setdefault("properties", {})
        for name in ("apiVersion", "kind"):
            props.setdefault(name, {"type": "string"})
        props.setdefault("metadata", {"type": "object"})
    if (
        strict
        and "properties" in out
        and "additionalProperties" not in out
        and not node.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


@pytest.fixture(scope="module")
def crd_validators(shared_data: Path) -> dict[str, jsonschema.Draft7Validator]:
    """A JSON-schema validator per KubeRay kind, from the served+stored v1 CRD version."""
    out = {}
    for kind, name in CRD_FILES.items():
        with gzip.open(shared_data / "kuberay" / name) as fh:
            crd = yaml.load(fh, Loader=_LOADER)
        assert crd["spec"]["names"]["kind"] == kind
        (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1" and v["served"]]
        assert version["storage"], f"{name}: v1 is not the stored version"
        schema = _to_jsonschema(version["schema"]["openAPIV3Schema"])
        if kind == "RayCluster":  # one is enough to show the conversion emits valid Draft 7
            jsonschema.Draft7Validator.check_schema(schema)
        out[kind] = jsonschema.Draft7Validator(schema)
    return out


def _errors(validator: jsonschema.Draft7Validator, doc: dict[str, Any]) -> list[str]:
    return [
        f"{'.'.join(str(p) for p in e.absolute_path)}: {e.message}"
        for e in validator.iter_errors(doc)
    ]


def _dockerfile(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with comments dropped and continuations joined."""
    out: list[tuple[str, str]] = []
    buf = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        instr, _, args = buf.partition(" ")
        out.append((instr.upper(), args.strip()))
        buf = ""
    assert not buf, f"{path}: dangling line continuation"
    return out


def _exec_form(args: str) -> list[str]:
    return json.loads(args) if args.startswith("[") else shlex.split(args)


def _job_scripts(text: str) -> list[str]:
    """Paths like ``jobs/run.py`` that a command line refers to."""
    return re.findall(r"\bjobs/[\w./-]+\.py\b", text)


def _require(*rels: str) -> None:
    """Fail if files that infra/ refers to are missing from the repo."""
    missing = [rel for rel in rels if not (ROOT / rel).exists()]
    assert not missing, f"{missing} referenced by infra/ but missing from the repo"


# ----------------------------------------------------------------------------- tests


@pytest.mark.parametrize(
    "expr", ["0 2 * * *", "*/15 * * * 1-5", "0 0 1,15 jan-jun sun", "5 4 * * 7"]
)
def test_cron_accepts_valid(expr: str) -> None:
    assert cron_is_valid(expr)


@pytest.mark.parametrize(
    "expr",
    ["0 2 * *", "60 * * * *", "0 24 * * *", "0 0 0 * *", "*/0 * * * *", "0 5-2 * * *", "@nightly"],
)
def test_cron_rejects_invalid(expr: str) -> None:
    assert not cron_is_valid(expr)


def test_parse_quantity() -> None:
    assert parse_quantity("500m") == 0.5
    assert parse_quantity("24Gi") == 24 * 2**30
    assert parse_quantity(6) == 6
    with pytest.raises(AssertionError, match="not a Kubernetes quantity"):
        parse_quantity("6 cores")


# ----------------------------------------------------------------------------- manifests


def test_every_manifest_parses_with_known_kind() -> None:
    files = _manifest_files()
    assert {p.name for p in files} >= {
        "raycluster.yaml",
        "rayjob.yaml",
        "raycronjob.yaml",
        "cronjob-rayjob.yaml",
        "configmap.yaml",
        "storage.yaml",
    }
    for path in files:
        docs = _load_all(path)
        assert docs, f"{path.name} holds no document"
        for doc in docs:
            key = (doc.get("apiVersion"), doc.get("kind"))
            assert key in KNOWN_KINDS, f"{path.name}: unknown apiVersion/kind {key}"
            name = doc["metadata"]["name"]
            assert DNS1035.match(name), f"{path.name}: {name!r} is not a DNS-1035 label"
            assert len(name) <= 40, f"{path.name}: {name!r} leaves no room for generated suffixes"


@pytest.mark.parametrize("kind", sorted(CRD_FILES))
def test_custom_resources_validate_against_crd(kind: str, crd_validators) -> None:
    doc = _one(kind)
    assert _errors(crd_validators[kind], doc) == []


_HEAD_CONTAINER = ("spec", "headGroupSpec", "template", "spec", "containers", 0)


def _at(doc: dict[str, Any], *path: str | int) -> Any:
    for key in path:
        doc = doc[key]
    return doc


# case -> (kind, change to make, a fragment the validator's error must contain)
_BREAKAGES = {
    "typo in a spec field": (
        "RayCluster",
        lambda d: d["spec"].update(workerGroupSpec=[]),
        "'workerGroupSpec' was unexpected",
    ),
    "replicas is a string": (
        "RayCluster",
        lambda d: d["spec"]["workerGroupSpecs"][0].update(replicas="two"),
        "'two' is not of type 'integer'",
    ),
    "rayStartParams value not a string": (
        "RayCluster",
        lambda d: d["spec"]["headGroupSpec"]["rayStartParams"].update({"num-cpus": 0}),
        "0 is not of type 'string'",
    ),
    "headGroupSpec missing": (
        "RayCluster",
        lambda d: d["spec"].pop("headGroupSpec"),
        "'headGroupSpec' is a required property",
    ),
    "bad memory quantity": (
        "RayCluster",
        lambda d: _at(d, *_HEAD_CONTAINER, "resources", "limits").update(memory="lots"),
        "'lots' does not match",
    ),
    "unknown container field": (
        "RayJob",
        lambda d: _at(d["spec"]["rayClusterSpec"], *_HEAD_CONTAINER[1:]).update(
            imagePullPolicyy="x"
        ),
        "'imagePullPolicyy' was unexpected",
    ),
    "entrypoint not a string": (
        "RayJob",
        lambda d: d["spec"].update(entrypoint=["python", "x.py"]),
        "is not of type 'string'",
    ),
    "schedule missing": (
        "RayCronJob",
        lambda d: d["spec"].pop("schedule"),
        "'schedule' is a required property",
    ),
    "concurrencyPolicy is not in the RayCronJob schema": (
        "RayCronJob",
        lambda d: d["spec"].update(concurrencyPolicy="Forbid"),
        "'concurrencyPolicy' was unexpected",
    ),
}


@pytest.mark.parametrize("case", sorted(_BREAKAGES))
def test_crd_validation_rejects_broken_manifest(case: str, crd_validators) -> None:
    kind, breakage, expected = _BREAKAGES[case]
    doc = copy.deepcopy(_one(kind))
    breakage(doc)
    errors = _errors(crd_validators[kind], doc)
    assert any(expected in e for e in errors), f"{case}: expected {expected!r}, got {errors}"


def test_cluster_spec_is_identical_everywhere() -> None:
    specs = _cluster_specs()
    assert specs["RayJob"] == specs["RayCluster"], (
        "rayjob.yaml rayClusterSpec drifted from raycluster.yaml"
    )
    assert _one("RayCronJob")["spec"]["jobTemplate"] == _one("RayJob")["spec"], (
        "raycronjob.yaml jobTemplate drifted from rayjob.yaml spec"
    )


def test_ray_and_python_versions_match_pyproject() -> None:
    ray_pin = _pin("ray")
    for where, spec in _cluster_specs().items():
        assert spec["rayVersion"] == ray_pin, (
            f"{where}: rayVersion {spec['rayVersion']} != {ray_pin}"
        )


def _images() -> tuple[str, str]:
    version = PYPROJECT["project"]["version"]
    cpu = _one("RayCluster")["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]
    repo, _, tag = cpu.rpartition(":")
    assert tag == version, f"image tag {tag} should be the package version {version}"
    return cpu, f"{repo}:{version}-cuda"


def test_images_consistent_and_cuda_for_gpu_groups() -> None:
    cpu, cuda = _images()
    for where, spec in _cluster_specs().items():
        for name, _group, container in _groups(spec):
            limits = container["resources"]["limits"]
            wants = cuda if "nvidia.com/gpu" in limits else cpu
            assert container["image"] == wants, (
                f"{where}/{name}: image {container['image']} != {wants}"
            )
    for job in _docs("CronJob"):
        for c in job["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]:
            assert c["image"] == cpu, (
                "the submitter needs the CPU image (it has /app and the ray CLI)"
            )


def test_resources_sane() -> None:
    for where, spec in _cluster_specs().items():
        assert spec["enableInTreeAutoscaling"] is True
        assert spec["headGroupSpec"]["rayStartParams"].get("num-cpus") == "0", (
            "head must run no tasks"
        )
        gpu_groups = 0
        for name, group, container in _groups(spec):
            req, lim = container["resources"]["requests"], container["resources"]["limits"]
            assert req == lim, f"{where}/{name}: Ray pods want requests == limits"
            assert parse_quantity(lim["cpu"]) >= 1
            assert parse_quantity(lim["memory"]) >= 4 * 2**30
            store = group["rayStartParams"].get("object-store-memory")
            assert store is not None, f"{where}/{name}: set object-store-memory explicitly"
            assert parse_quantity(lim["memory"]) >= 2 * int(store), (
                f"{where}/{name}: memory {lim['memory']} < 2 x object store {store}"
            )
            # KubeRay rejects resources given both in rayStartParams and the group's `resources`.
            starts = {"num-cpus", "num-gpus", "memory", "resources"} & set(group["rayStartParams"])
            assert not (starts and group.get("resources")), f"{where}/{name}: resources set twice"
            pod = group["template"]["spec"]
            mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
            assert mounts.get("dshm") == "/dev/shm", (
                f"{where}/{name}: object store needs a real /dev/shm"
            )
            if name == "head":
                continue
            assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], name
            if "nvidia.com/gpu" in lim:
                gpu_groups += 1
                assert int(lim["nvidia.com/gpu"]) >= 1
                assert group["minReplicas"] == 0, f"{where}/{name}: GPU group should scale to zero"
                assert group["maxReplicas"] >= 1
                tol = pod.get("tolerations", [])
                assert any(t["key"] == "nvidia.com/gpu" for t in tol), (
                    f"{where}/{name}: no GPU toleration"
                )
        assert gpu_groups >= 1, f"{where}: no autoscaling GPU worker group"
    for job in _docs("CronJob"):
        for c in job["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]:
            for res in ("cpu", "memory"):
                assert parse_quantity(c["resources"]["requests"][res]) <= parse_quantity(
                    c["resources"]["limits"][res]
                )


def test_shared_storage_mounted_everywhere() -> None:
    (pvc,) = _docs("PersistentVolumeClaim")
    assert "ReadWriteMany" in pvc["spec"]["accessModes"], "shards are written by many pods: RWX"
    cfg_map = _one("ConfigMap")
    for where, spec in _cluster_specs().items():
        for name, group, container in _groups(spec):
            volumes = {v["name"]: v for v in group["template"]["spec"]["volumes"]}
            mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
            assert volumes["data"]["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
            assert mounts["data"] == "/data", f"{where}/{name}: shared volume not at /data"
            assert volumes["job-config"]["configMap"]["name"] == cfg_map["metadata"]["name"]
            assert mounts["job-config"] == "/etc/raypipe"


def test_configmap_holds_a_valid_cluster_job_config() -> None:
    from raypipe.config import load_config

    data = _one("ConfigMap")["data"]
    assert set(data) == {"atlas.yaml", "atlas-pvc.yaml"}
    # the default: object storage, reached with the pods' own identity (no keys in config)
    cfg = load_config(yaml.safe_load(data["atlas.yaml"]))
    assert cfg.ray.address == "auto", "inside a cluster the job must join it, not start Ray"
    for path in (cfg.input.path, cfg.output_dir, str(cfg.cache_dir())):
        assert path.startswith("s3://"), f"{path} is not in a bucket"
    assert "secret" not in data["atlas.yaml"].lower()
    assert "AWS_" not in data["atlas.yaml"]
    # the alternative: the shared ReadWriteMany volume
    pvc = load_config(yaml.safe_load(data["atlas-pvc.yaml"]))
    assert pvc.ray.address == "auto"
    for path in (pvc.input.path, pvc.output_dir, str(pvc.cache_dir())):
        assert path.startswith("/data/"), f"{path} is not on the shared volume"
    assert pvc.model_dump(exclude={"input", "output_dir", "cache", "genes"}) == cfg.model_dump(
        exclude={"input", "output_dir", "cache", "genes"}
    )


def test_ray_pods_get_bucket_access_from_the_platform() -> None:
    """Every Ray pod runs as the ServiceAccount annotated for IRSA / GKE workload identity."""
    (sa,) = [d for d in _docs("ServiceAccount") if d["metadata"]["name"] == "raypipe"]
    notes = sa["metadata"]["annotations"]
    assert "eks.amazonaws.com/role-arn" in notes
    assert "iam.gke.io/gcp-service-account" in notes
    for where, spec in _cluster_specs().items():
        for name, group, _container in _groups(spec):
            pod = group["template"]["spec"]
            assert pod.get("serviceAccountName") == sa["metadata"]["name"], f"{where}/{name}"


def _entrypoints() -> dict[str, str]:
    rayjob = _one("RayJob")["spec"]
    cron = _one("RayCronJob")["spec"]["jobTemplate"]
    (cronjob,) = _docs("CronJob")
    script = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["args"][0]
    return {"RayJob": rayjob["entrypoint"], "RayCronJob": cron["entrypoint"], "CronJob": script}


@pytest.mark.parametrize("where", ["RayJob", "RayCronJob", "CronJob"])
def test_commands_reference_real_job_and_config(where: str) -> None:
    command = _entrypoints()[where]
    scripts = _job_scripts(command)
    assert scripts == ["jobs/run.py"], f"{where}: runs {scripts}"
    assert "--config /etc/raypipe/atlas.yaml" in command, f"{where}: not the ConfigMap's config"
    if where != "CronJob":
        env = yaml.safe_load(_one("RayJob")["spec"]["runtimeEnvYAML"])
        assert env["working_dir"] == "/app", "jobs/run.py is relative to the image's /app"
        assert _one("RayJob")["spec"]["submissionMode"] == "K8sJobMode"
    _require("jobs/run.py")


def test_rayjob_lifecycle() -> None:
    spec = _one("RayJob")["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["ttlSecondsAfterFinished"] >= 0
    assert spec["activeDeadlineSeconds"] > 0
    assert spec["backoffLimit"] >= 0
    assert "clusterSelector" not in spec, "a RayJob with its own cluster has no clusterSelector"


def test_schedules() -> None:
    rcj = _one("RayCronJob")["spec"]
    (cronjob,) = _docs("CronJob")
    for where, sched in (("RayCronJob", rcj["schedule"]), ("CronJob", cronjob["spec"]["schedule"])):
        assert cron_is_valid(sched), f"{where}: invalid cron {sched!r}"
        assert "TZ" not in sched, f"{where}: use the timeZone field, not TZ= in the schedule"
    # RayCronJob has no concurrencyPolicy: the deadline must end a run before the next tick.
    period = _daily_period_s(rcj["schedule"])
    assert period is not None, "the deadline check below assumes a daily schedule"
    assert rcj["jobTemplate"]["activeDeadlineSeconds"] < period
    job = cronjob["spec"]["jobTemplate"]["spec"]
    assert cronjob["spec"]["concurrencyPolicy"] == "Forbid"
    assert job["activeDeadlineSeconds"] < period
    assert job["template"]["spec"]["restartPolicy"] in ("Never", "OnFailure")


def test_cronjob_targets_the_standing_cluster() -> None:
    (cronjob,) = _docs("CronJob")
    pod = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    env = {e["name"]: e["value"] for e in pod["containers"][0]["env"]}
    head_svc = f"{_one('RayCluster')['metadata']['name']}-head-svc"
    assert env["RAY_DASHBOARD"] == f"http://{head_svc}:8265"
    accounts = {sa["metadata"]["name"]: sa for sa in _docs("ServiceAccount")}
    assert pod["serviceAccountName"] in accounts
    assert accounts[pod["serviceAccountName"]]["automountServiceAccountToken"] is False
    script = pod["containers"][0]["args"][0]
    assert "ray job submit" in script
    assert "--working-dir /app" in script
    assert "trap" in script, "a killed pod must stop its Ray job"
    assert "ray job stop" in script, "a killed pod must stop its Ray job"


def test_operator_values_enable_raycronjob() -> None:
    values = yaml.safe_load((KUBERAY / "operator-values.yaml").read_text())
    gates = {g["name"]: g["enabled"] for g in values["featureGates"]}
    assert gates["RayCronJob"] is True


# ----------------------------------------------------------------------------- Dockerfiles


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.cuda"])
def test_dockerfile_structure(name: str) -> None:
    path = INFRA / name
    instrs = _dockerfile(path)
    assert instrs[0][0] == "FROM"
    image = instrs[0][1].split()[0]
    m = re.fullmatch(r"rayproject/ray:([\d.]+)-py(\d)(\d+)-(cpu|cu\d+)", image)
    assert m, f"{name}: base {image} is not a rayproject/ray image with a version and py tag"
    assert m.group(1) == _pin("ray"), f"{name}: Ray {m.group(1)} != pyproject {_pin('ray')}"
    py = f"{m.group(2)}.{m.group(3)}"
    floor = PYPROJECT["project"]["requires-python"].removeprefix(">=")
    assert tuple(map(int, py.split("."))) >= tuple(map(int, floor.split("."))), f"{name}: py{py}"
    assert (m.group(4) == "cpu") == (name == "Dockerfile")

    args = dict(a[1].split("=", 1) for a in instrs if a[0] == "ARG")
    assert args["TORCH_VERSION"] == _pin("torch"), f"{name}: torch pin differs from pyproject"
    assert args["TORCH_INDEX"].endswith("/cpu" if name == "Dockerfile" else "/cu" + m.group(4)[2:])
    runs = " ".join(a for i, a in instrs if i == "RUN")
    assert '"torch==${TORCH_VERSION}"' in runs
    if name == "Dockerfile.cuda":
        assert '".[vllm]"' in runs
        assert "vllm" in PYPROJECT["project"]["optional-dependencies"]

    users = [a for i, a in instrs if i == "USER"]
    assert users, f"{name}: no USER instruction"
    assert users[-1] not in ("root", "0"), f"{name}: must end as a non-root user"
    workdirs = [a for i, a in instrs if i == "WORKDIR"]
    assert workdirs[-1] == "/app"

    sources = []
    for instr, a in instrs:
        if instr == "COPY":
            parts = [p for p in shlex.split(a) if not p.startswith("--")]
            sources += [s.rstrip("/") for s in parts[:-1]]
    assert {"pyproject.toml", "raypipe", "jobs", "configs"} <= set(sources)
    assert PYPROJECT["project"]["readme"] in sources, "setuptools needs the readme to build"
    ignore = (INFRA / f"{name}.dockerignore").read_text().splitlines()
    for src in sources:
        assert f"!{src}" in ignore or f"!{src}/" in ignore, f"{name}.dockerignore drops {src}"

    cmd = _exec_form([a for i, a in instrs if i == "CMD"][-1])
    scripts = [c for c in cmd if c.startswith("jobs/")]
    assert scripts == ["jobs/run.py"], f"{name}: CMD runs {cmd}"
    _require(*sources, *scripts)


# ----------------------------------------------------------------------------- cluster launcher


@pytest.fixture(scope="module")
def launcher_validator() -> jsonschema.Draft7Validator:
    import ray.autoscaler

    schema_path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    return jsonschema.Draft7Validator(json.loads(schema_path.read_text()))


def test_launcher_validates_against_ray_schema(launcher_validator) -> None:
    cfg = yaml.safe_load(LAUNCHER.read_text())
    assert _errors(launcher_validator, cfg) == []
    broken = copy.deepcopy(cfg)
    broken["available_node_types"]["ray.worker.cpu"].pop("node_config")
    broken["head_nodes"] = 1
    assert len(_errors(launcher_validator, broken)) == 2


def test_launcher_consistency() -> None:
    cfg = yaml.safe_load(LAUNCHER.read_text())
    cpu, cuda = _images()
    assert cfg["provider"]["type"] == "aws"
    types = cfg["available_node_types"]
    head = cfg["head_node_type"]
    assert head in types
    assert types[head]["resources"] == {"CPU": 0}, "the head runs no tasks"
    assert types[head]["node_config"]["InstanceType"].startswith("m5.")
    total = 0
    for name, t in types.items():
        if name == head:
            continue
        assert 0 <= t["min_workers"] <= t["max_workers"], name
        total += t["max_workers"]
        gpu = t["node_config"]["InstanceType"].split(".")[0] in ("g5", "g6", "g6e", "p4d", "p5")
        image = t.get("docker", {}).get("worker_image", cfg["docker"]["image"])
        assert image == (cuda if gpu else cpu), f"{name}: image {image}"
        if gpu:
            assert t["min_workers"] == 0, f"{name}: GPU nodes should scale from zero"
    assert total <= cfg["max_workers"], (
        f"node types allow {total} > max_workers {cfg['max_workers']}"
    )
    assert cfg["docker"]["head_image"] == cpu
    for remote, local in cfg["file_mounts"].items():
        assert remote.startswith("/"), f"file_mounts target {remote} is not absolute"
        assert (ROOT / local).exists(), f"file_mounts source {local} is missing"
    start = " ".join(cfg["head_start_ray_commands"])
    assert "--head" in start
    assert "--autoscaling-config" in start
    assert any("$RAY_HEAD_IP" in c for c in cfg["worker_start_ray_commands"])
    assert any(f"ray.__version__ == '{_pin('ray')}'" in c for c in cfg["setup_commands"])
