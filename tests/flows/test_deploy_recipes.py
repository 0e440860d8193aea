"""Every recipe under deploy/ loads and holds what its docs promise."""

from __future__ import annotations

import asyncio
import datetime as dt
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"


def _load(name: str) -> dict:
    data = yaml.safe_load((DEPLOY / name).read_text())
    assert isinstance(data, dict), name
    return data


def _dotted(d: dict, prefix: str = "") -> dict:
    """Flatten a nested mapping to dotted keys (dask.config.set replaces nested dicts whole)."""
    out: dict = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else k
        out.update(_dotted(v, key) if isinstance(v, dict) else {key: v})
    return out


def test_prefect_yaml_deployments() -> None:
    from prefect.client.schemas.schedules import CronSchedule
    from prefect.flows import Flow

    cfg = _load("prefect.yaml")
    assert cfg["prefect-version"].startswith("3.8")
    deps = {d["name"]: d for d in cfg["deployments"]}
    assert set(deps) == {"nightly-sweep", "on-demand"}
    sweep, scene = deps["nightly-sweep"], deps["on-demand"]
    # cron schedule is valid and the on-demand one has none
    (sched,) = sweep["schedules"]
    CronSchedule(cron=sched["cron"], timezone=sched["timezone"])
    assert scene["schedules"] == []
    for d in deps.values():
        assert d["work_pool"]["name"] == "hyperdeq-process"
        path, func = d["entrypoint"].split(":")
        assert (ROOT / path).is_file(), d["entrypoint"]
    import flows.scene_flow
    import flows.sweep

    assert isinstance(flows.sweep.sweep_archive, Flow)
    assert isinstance(flows.scene_flow.process_scene, Flow)
    assert sweep["entrypoint"].endswith(":sweep_archive")
    assert scene["entrypoint"].endswith(":process_scene")
    # the sweep's default parameters are accepted by its parameter model
    from flows.settings import SweepParams

    SweepParams(**sweep["parameters"])
    pull = cfg["pull"][0]["prefect.deployments.steps.set_working_directory"]
    assert "HYPERDEQ_REPO" in pull["directory"]


def test_sensor_presets_are_valid_globs_with_known_formats() -> None:
    from pipeline.readers import FORMATS

    sensors = _load("sensors.yaml")["sensors"]
    assert {"enmap", "emit", "prisma", "aviris"} <= set(sensors)
    for name, s in sensors.items():
        assert s["patterns"] and all(isinstance(p, str) for p in s["patterns"]), name
        assert s["format"] is None or s["format"] in FORMATS, (name, s["format"])


def test_enmap_preset_matches_the_real_potsdam_tiles(shared_data: Path) -> None:
    from flows.sweep import scan_archive

    found = scan_archive(shared_data / "enmap_potsdam_tiles", sensors=["enmap"])
    assert len(found) == 18
    assert all(p.name.startswith("enmap_potsdam_tile_") for p in found)


def test_local_recipe_feeds_cluster_options() -> None:
    from flows.settings import ClusterOptions

    rec = _load("cluster/local.yaml")
    assert rec["kind"] == "local"
    kw = ClusterOptions(recipe="local").cluster_kwargs()
    assert kw["n_workers"] == rec["cluster"]["n_workers"]
    assert kw["threads_per_worker"] == 1
    assert kw["env"] == {"OMP_NUM_THREADS": "1"}
    assert ClusterOptions(recipe="local", n_workers=3).cluster_kwargs()["n_workers"] == 3


def test_gpu_recipe_one_worker_per_gpu_with_resource() -> None:
    from flows.settings import ClusterOptions

    rec = _load("cluster/gpu-dask-cuda.yaml")
    assert rec["kind"] == "cuda"
    kw = ClusterOptions(kind="cuda", recipe="gpu-dask-cuda").cluster_kwargs()
    assert kw["resources"] == {"GPU": 1} and kw["CUDA_VISIBLE_DEVICES"] == "0,1,2,3"
    assert rec["cluster"]["resources"] == {"GPU": 1}
    assert rec["cluster"]["threads_per_worker"] == 1
    worker = rec["cli"]["worker"]
    assert worker[:3] == ["dask", "cuda", "worker"]
    assert worker[worker.index("--resources") + 1] == "GPU=1"


def test_slurm_recipe_is_dask_jobqueue_config() -> None:
    slurm = _load("cluster/slurm.yaml")["jobqueue"]["slurm"]
    for key in ("cores", "memory", "processes", "walltime", "queue"):
        assert key in slurm, key
    args = slurm["worker-extra-args"]
    assert args[args.index("--resources") + 1] == "GPU=1"
    assert any("--gres=gpu:1" in d for d in slurm["job-extra-directives"])
    assert any("PREFECT_API_URL" in line for line in slurm["job-script-prologue"])
    assert re.fullmatch(r"\d\d:\d\d:\d\d", slurm["walltime"])


def test_kubernetes_recipe_is_a_daskcluster() -> None:
    k = _load("cluster/kubernetes.yaml")
    assert k["apiVersion"] == "kubernetes.dask.org/v1"
    assert k["kind"] == "DaskCluster"
    (worker,) = k["spec"]["worker"]["spec"]["containers"]
    args = worker["args"]
    assert args[:2] == ["dask", "worker"]
    assert args[args.index("--resources") + 1] == "GPU=1"
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert {e["name"] for e in worker["env"]} >= {"PREFECT_API_URL"}
    (sched,) = k["spec"]["scheduler"]["spec"]["containers"]
    assert sched["args"] == ["dask", "scheduler"]
    ports = {p["port"] for p in k["spec"]["scheduler"]["service"]["ports"]}
    assert 8786 in ports


def test_tls_recipe_keys_are_distributed_config() -> None:
    import dask.config
    from distributed.security import Security

    tls = _load("cluster/tls.yaml")
    comm = tls["distributed"]["comm"]
    assert comm["require-encryption"] is True
    for role in ("scheduler", "worker", "client"):
        assert comm["tls"][role]["cert"] and comm["tls"][role]["key"]
    with dask.config.set(_dotted(tls)):
        sec = Security()
    assert sec.require_encryption is True
    assert sec.tls_ca_file == comm["tls"]["ca-file"]
    assert sec.tls_scheduler_cert == comm["tls"]["scheduler"]["cert"]
    assert sec.tls_worker_key == comm["tls"]["worker"]["key"]
    assert sec.tls_client_cert == comm["tls"]["client"]["cert"]


def _make_certs(d: Path) -> dict[str, Path]:
    """A throw-away CA and one certificate per role, for 127.0.0.1."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = dt.datetime.now(dt.UTC)

    def _key():
        return ec.generate_private_key(ec.SECP256R1())

    def _pem_key(k) -> bytes:
        return k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                               serialization.NoEncryption())

    ca_key = _key()
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "hyperdeq-test-ca")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - dt.timedelta(minutes=1)).not_valid_after(now + dt.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    out = {"ca": d / "ca.pem"}
    out["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    for role in ("scheduler", "worker", "client"):
        k = _key()
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, role)]))
                .issuer_name(ca_name).public_key(k.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - dt.timedelta(minutes=1))
                .not_valid_after(now + dt.timedelta(days=1))
                .add_extension(x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                    critical=False)
                .sign(ca_key, hashes.SHA256()))
        (d / f"{role}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (d / f"{role}-key.pem").write_bytes(_pem_key(k))
    return out


def test_tls_recipe_secures_a_real_scheduler_and_worker(tmp_path: Path) -> None:
    """The recipe with real certificates: a tls:// scheduler, worker and client compute together."""
    import dask.config
    from distributed import Client, Scheduler, Worker
    from distributed.security import Security

    _make_certs(tmp_path)
    tls = _load("cluster/tls.yaml")
    t = tls["distributed"]["comm"]["tls"]
    t["ca-file"] = str(tmp_path / "ca.pem")
    for role in ("scheduler", "worker", "client"):
        t[role]["cert"] = str(tmp_path / f"{role}.pem")
        t[role]["key"] = str(tmp_path / f"{role}-key.pem")

    async def _run() -> int:
        with dask.config.set(_dotted(tls)):
            sec = Security()
            async with Scheduler(host="tls://127.0.0.1", port=0, security=sec,
                                 dashboard_address=":0") as s:
                assert s.address.startswith("tls://")
                async with Worker(s.address, security=sec, nthreads=1):
                    async with Client(s.address, security=sec, asynchronous=True) as c:
                        return await c.submit(lambda x: x + 1, 41)

    assert asyncio.run(_run()) == 42

    # and a plain tcp:// address is refused before any connection attempt
    from distributed.comm import connect

    with dask.config.set(_dotted(tls)):
        args = Security().get_connection_args("client")
    with pytest.raises(RuntimeError, match="encryption required"):
        asyncio.run(connect("tcp://127.0.0.1:9", timeout=1, **args))


def test_dockerfile_installs_pinned_torch_before_the_project() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    stages = re.split(r"^FROM ", text, flags=re.M)[1:]
    names = [re.search(r" AS (\w+)", s.splitlines()[0]).group(1) for s in stages]
    assert names == ["cpu", "cuda"]
    assert re.search(r"^ARG TORCH_VERSION=\d+\.\d+\.\d+$", text, flags=re.M)
    for name, stage in zip(names, stages, strict=True):
        torch_at = stage.find('pip install "torch==${TORCH_VERSION}"')
        project_at = stage.find("pip install .")
        assert 0 <= torch_at < project_at, name
        assert "download.pytorch.org/whl/" in stage
        # the project itself is copied in after torch is installed
        assert stage.find("COPY pyproject.toml") > torch_at
    assert "whl/cpu" in stages[0] and "whl/cu" in stages[1]


def test_docs_cover_every_recipe() -> None:
    doc = (ROOT / "docs" / "deploy.md").read_text()
    for name in ("local.yaml", "gpu-dask-cuda.yaml", "slurm.yaml", "kubernetes.yaml", "tls.yaml",
                 "Dockerfile", "prefect.yaml", "sensors.yaml"):
        assert name in doc, name
