"""cluster/: launcher YAMLs pass Ray's own validation; KubeRay manifests pass the CRDs' schemas."""
from __future__ import annotations

import copy
import pathlib
import re

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CRDS = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml",
        "RayService": "ray.io_rayservices.yaml"}
MANIFESTS = {"raycluster.yaml": "RayCluster", "rayjob.yaml": "RayJob", "rayservice.yaml": "RayService"}


def load(path: pathlib.Path) -> dict:
    # the CRDs are ~1 MB each: libyaml's loader reads them ~50x faster than pure Python
    return yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


# --------------------------------------------------------------------------- cluster launcher
@pytest.fixture(params=["aws.yaml", "gcp.yaml"])
def launcher(request, repo_root):
    return request.param, load(repo_root / "cluster" / request.param)


def test_launcher_config_passes_rays_validation(launcher):
    _, cfg = launcher
    prepared = prepare_config(copy.deepcopy(cfg))   # merges the provider defaults, as `ray up` does
    validate_config(prepared)                       # ray-schema.json + the launcher's own checks


def test_launcher_validation_can_fail(launcher):
    _, cfg = launcher
    bad = copy.deepcopy(cfg)
    bad["available_node_types"]["gpu_1x"]["min_worker"] = 1          # typo of min_workers
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(bad))
    bad = copy.deepcopy(cfg)
    bad["head_node_type"] = "nope"
    with pytest.raises(ValueError):
        validate_config(prepare_config(bad))


def test_launcher_node_types(launcher):
    _, cfg = launcher
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"].get("CPU") == 0 and not head["resources"].get("GPU")
    gpus = {name: t["resources"].get("GPU", 0) for name, t in types.items() if name != cfg["head_node_type"]}
    assert sorted(gpus.values()) == [1, 8]
    for name in gpus:
        t = types[name]
        assert 0 <= t["min_workers"] < t["max_workers"] <= cfg["max_workers"]
    assert sum(types[n]["max_workers"] for n in gpus) <= cfg["max_workers"]


def test_launcher_installs_ark_ray_and_handles_auth(launcher):
    _, cfg = launcher
    setup = "\n".join(cfg["setup_commands"])
    assert re.search(r"pip install \"?/home/ray/ark-ray\[gpu\]", setup)
    assert "RAY_AUTH_MODE=token" in setup
    assert cfg["file_mounts"]["/home/ray/ark-ray"] == "."
    assert "~/.ray/auth_token" in cfg["file_mounts"].values()
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = cfg[key][-1]
        assert "source ~/.ark-ray.env" in start and "ray start" in start
        assert "--metrics-export-port=8080" in start
    assert "--head" in cfg["head_start_ray_commands"][-1]
    assert "$RAY_HEAD_IP" in cfg["worker_start_ray_commands"][-1]


def test_images_match_the_pinned_ray(repo_root, launcher):
    _, cfg = launcher
    assert cfg["docker"]["image"] == f"rayproject/ray:{ray.__version__}-py311-gpu"
    assert f'"ray[data,serve,train]=={ray.__version__}"' in (repo_root / "pyproject.toml").read_text()
    assert f"FROM rayproject/ray:{ray.__version__}-py311-gpu" in (repo_root / "cluster" / "Dockerfile").read_text()


# --------------------------------------------------------------------------- KubeRay
def to_json_schema(node):
    """A CRD's OpenAPI v3 schema as a JSON Schema, as strict as `kubectl apply` (unknown fields
    are errors): int-or-string and nullable spelled out, objects closed unless they preserve
    unknown fields. CEL rules (x-kubernetes-validations) are not evaluated."""
    if not isinstance(node, dict):
        return node
    out = {k: v for k, v in node.items() if not k.startswith("x-kubernetes-")}
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if out.pop("nullable", False) and "type" in out:
        out["type"] = [out["type"], "null"]
    if "properties" in out:
        out["properties"] = {k: to_json_schema(v) for k, v in out["properties"].items()}
        if "additionalProperties" not in out and not node.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    if isinstance(out.get("additionalProperties"), dict):
        out["additionalProperties"] = to_json_schema(out["additionalProperties"])
    if "items" in out:
        out["items"] = to_json_schema(out["items"])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in out:
            out[key] = [to_json_schema(s) for s in out[key]]
    return out


@pytest.fixture(scope="module")
def crd_validators(repo_root):
    folder = repo_root.parent / "shared" / "schemas" / "kuberay"
    if not folder.is_dir():
        pytest.skip(f"KubeRay CRD schemas not found at {folder} (they live in ../shared/schemas beside the repo)")
    out = {}
    for kind, fname in CRDS.items():
        crd = load(folder / fname)
        assert crd["spec"]["names"]["kind"] == kind
        version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1" and v["served"])
        schema = to_json_schema(version["schema"]["openAPIV3Schema"])
        out[kind] = (f"{crd['spec']['group']}/v1", jsonschema.Draft7Validator(schema))
    return out


@pytest.fixture(params=sorted(MANIFESTS))
def manifest(request, repo_root):
    docs = list(yaml.safe_load_all((repo_root / "cluster" / "kuberay" / request.param).read_text()))
    assert len(docs) == 1
    return MANIFESTS[request.param], docs[0]


def errors(validator, doc) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]


def test_manifest_validates_against_its_crd(manifest, crd_validators):
    kind, doc = manifest
    api_version, validator = crd_validators[kind]
    assert doc["apiVersion"] == api_version and doc["kind"] == kind
    assert doc["metadata"]["name"]
    assert errors(validator, doc) == []


def test_crd_validation_can_fail(manifest, crd_validators):
    kind, doc = manifest
    _, validator = crd_validators[kind]
    bad = copy.deepcopy(doc)
    bad["spec"]["specTypo"] = True
    assert any("specTypo" in e for e in errors(validator, bad))
    cluster = cluster_spec(copy.deepcopy(doc))
    cluster["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["imagee"] = "x"   # pod-level typo
    assert errors(validator, bad_doc(doc, cluster))
    cluster = cluster_spec(copy.deepcopy(doc))
    del cluster["headGroupSpec"]
    assert errors(validator, bad_doc(doc, cluster))


def cluster_spec(doc: dict) -> dict:
    spec = doc["spec"]
    return spec.get("rayClusterSpec") or spec.get("rayClusterConfig") or spec


def bad_doc(doc: dict, cluster: dict) -> dict:
    out = copy.deepcopy(doc)
    key = next((k for k in ("rayClusterSpec", "rayClusterConfig") if k in out["spec"]), None)
    if key:
        out["spec"][key] = cluster
    else:
        out["spec"] = cluster
    return out


def test_kuberay_clusters_autoscale_gpu_workers_with_token_auth(manifest):
    kind, doc = manifest
    cluster = cluster_spec(doc)
    assert cluster["rayVersion"] == ray.__version__
    assert cluster["authOptions"] == {"mode": "token"}
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    gpus = []
    for g in cluster["workerGroupSpecs"]:
        assert g["minReplicas"] <= g.get("replicas", 0) <= g["maxReplicas"] and g["minReplicas"] < g["maxReplicas"]
        (c,) = g["template"]["spec"]["containers"]
        gpus.append(int(c["resources"]["limits"]["nvidia.com/gpu"]))
        assert g["rayStartParams"]["metrics-export-port"] == "8080"
    assert 1 in gpus
    if kind != "RayService":
        assert sorted(gpus) == [1, 8]
    images = {c["image"] for grp in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
              for c in grp["template"]["spec"]["containers"]}
    assert len(images) == 1


def test_rayjob_runs_the_opd_job(repo_root):
    doc = load(repo_root / "cluster" / "kuberay" / "rayjob.yaml")
    assert doc["spec"]["entrypoint"] == "python jobs/opd.py --config jobs/configs/opd_cluster.yaml"
    env = yaml.safe_load(doc["spec"]["runtimeEnvYAML"])
    assert env["working_dir"] == "/home/ray/ark-ray"
    assert doc["spec"]["shutdownAfterJobFinishes"] is True


def test_rayservice_serves_the_gpu_serve_config(repo_root):
    """serveConfigV2 is serve_configs/gpu.yaml key for key (once it still set HF-only batch keys that
    gpu.yaml had dropped), and both are valid Serve configs whose args are valid ServeConfigs."""
    from ray.serve.schema import ServeDeploySchema

    from ark_ray.config import ServeConfig, load_config

    doc = load(repo_root / "cluster" / "kuberay" / "rayservice.yaml")
    ours = yaml.safe_load(doc["spec"]["serveConfigV2"])
    theirs = load(repo_root / "serve_configs" / "gpu.yaml")
    assert ours == theirs
    ServeDeploySchema.model_validate(ours)
    for app in ours["applications"]:
        load_config(ServeConfig, overrides=dict(app["args"]))       # unknown or bad keys fail here
    assert ours["applications"][0]["args"]["model"] == "${ARK_MODEL_DIR}"
    cluster = doc["spec"]["rayClusterConfig"]
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:      # built and served anywhere
        (container,) = group["template"]["spec"]["containers"]
        assert {"name": "ARK_MODEL_DIR", "value": "/mnt/ark/models/ark-asr-0.6b"} in container["env"]
    drifted = copy.deepcopy(ours)
    drifted["applications"][0]["args"]["max_batch_size"] = 64
    assert drifted != theirs                                         # the comparison can fail


# --------------------------------------------------------------------------- the multi-node OPD layout
def fits(want: dict, have: dict) -> bool:
    return all(have.get(k, 0) >= v for k, v in want.items())


def total(bundles: list[dict]) -> dict:
    out: dict = {}
    for b in bundles:
        for k, v in b.items():
            out[k] = out.get(k, 0) + v
    return out


def launcher_node_types(cfg: dict) -> dict:
    """{worker node type: (its Ray resources, max_workers)} of a cluster launcher config."""
    return {n: (t["resources"], t["max_workers"]) for n, t in cfg["available_node_types"].items()
            if n != cfg["head_node_type"]}


def kuberay_node_types(doc: dict) -> dict:
    """{worker group: (the Ray resources of one pod, maxReplicas)}: CPUs and GPUs from the container's
    limits, custom resources from rayStartParams (a JSON string, quoted as KubeRay wants it)."""
    import json

    out = {}
    for g in cluster_spec(doc)["workerGroupSpecs"]:
        (c,) = g["template"]["spec"]["containers"]
        res = {"CPU": float(c["resources"]["limits"]["cpu"]), "GPU": int(c["resources"]["limits"]["nvidia.com/gpu"])}
        if "resources" in g["rayStartParams"]:
            res.update(json.loads(json.loads(g["rayStartParams"]["resources"])))
        out[g["groupName"]] = (res, g["maxReplicas"])
    return out


def check_layout(types: dict) -> None:
    """jobs/configs/opd_cluster.yaml's requests, as the job makes them (resource_requests), against a
    cluster's node types: each role fits exactly one node type, the learner group all on one node
    (so it packs STRICT_PACK), and there are enough nodes for every rollout worker and teacher."""
    from ark_ray.config import OpdConfig, load_config
    from ark_ray.opd.controller import resource_requests
    from ark_ray.train.learner import pack_strategy

    cfg = load_config(OpdConfig, pathlib.Path(__file__).resolve().parents[1] / "jobs/configs/opd_cluster.yaml")
    req = resource_requests(cfg)
    group = total(req["learner"])
    (learner_type,) = [n for n, (res, _) in types.items() if fits(group, res)]
    assert pack_strategy(req["learner"], [types[learner_type][0]]) == "STRICT_PACK"
    engines = req["rollout worker"] + req["teacher"]
    homes = {n for want in engines for n, (res, _) in types.items() if fits(want, res)}
    assert len(homes) == 1 and learner_type not in homes, homes
    (home,) = homes
    res, most = types[home]
    per_node = min(int(res[k] // v) for k, v in engines[0].items())
    assert all(w == engines[0] for w in engines) and most * per_node >= len(engines)
    assert req["learner"][0]["GPU"] == 1 and len(req["learner"]) == types[learner_type][0]["GPU"]


def test_launcher_node_types_match_the_multi_node_opd_layout(launcher):
    _, cfg = launcher
    check_layout(launcher_node_types(cfg))


@pytest.mark.parametrize("name", ["raycluster.yaml", "rayjob.yaml"])
def test_kuberay_groups_match_the_multi_node_opd_layout(repo_root, name):
    check_layout(kuberay_node_types(load(repo_root / "cluster" / "kuberay" / name)))


def test_layout_check_can_fail(repo_root):
    types = kuberay_node_types(load(repo_root / "cluster" / "kuberay" / "rayjob.yaml"))
    for group, key in (("gpu-8x", "ark_learner"), ("gpu-1x", "ark_engine")):
        broken = {n: ({k: v for k, v in res.items() if not (n == group and k == key)}, most)
                  for n, (res, most) in types.items()}
        with pytest.raises((AssertionError, ValueError)):
            check_layout(broken)
