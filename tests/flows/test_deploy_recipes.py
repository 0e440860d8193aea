"""Every recipe under deploy/ loads and holds what its docs promise."""

from __future__ import annotations

import asyncio
import datetime as dt
import re
import subprocess
import sys
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
    # no path to edit by hand: the archive and output roots come from the environment at deploy time
    assert sweep["parameters"]["root"] == "{{ $HYPERDEQ_SWEEP_ROOT }}"
    assert (
        sweep["parameters"]["out_root"] == scene["parameters"]["out_dir"] == "{{ $HYPERDEQ_OUT }}"
    )
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
    from workers.cluster import ClusterSpec

    rec = _load("cluster/local.yaml")
    assert rec["kind"] == "local"
    kw = ClusterSpec(recipe="local").cluster_kwargs()
    assert kw["n_workers"] == rec["cluster"]["n_workers"]
    assert kw["threads_per_worker"] == 1
    assert kw["env"] == {"OMP_NUM_THREADS": "1"}
    assert ClusterSpec(recipe="local", n_workers=3).cluster_kwargs()["n_workers"] == 3


def test_gpu_recipe_one_worker_per_gpu_with_resource() -> None:
    from workers.cluster import ClusterSpec

    rec = _load("cluster/gpu-dask-cuda.yaml")
    assert rec["kind"] == "cuda"
    kw = ClusterSpec(kind="cuda", recipe="gpu-dask-cuda").cluster_kwargs()
    assert kw["resources"] == {"GPU": 1}
    # no device list: LocalCUDACluster starts one worker per GPU the host has (a hard-coded
    # "0,1,2,3" fails on hosts with fewer GPUs)
    assert "CUDA_VISIBLE_DEVICES" not in kw and "CUDA_VISIBLE_DEVICES" not in rec["cluster"]
    assert rec["cluster"]["resources"] == {"GPU": 1}
    assert rec["cluster"]["threads_per_worker"] == 1
    worker = rec["cli"]["worker"]
    assert worker[:3] == ["dask", "cuda", "worker"]
    assert worker[worker.index("--resources") + 1] == "GPU=1"


def _worker_env_config(worker_env: dict) -> dict:
    """Dask config that hands ``worker_env`` to every Nanny's worker process, before it starts."""
    import dask.config

    key = "distributed.nanny.pre-spawn-environ"
    return {key: {**dask.config.get(key), **{str(k): str(v) for k, v in worker_env.items()}}}


def test_gpu_recipe_worker_env_reaches_workers_whose_env_is_replaced(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """LocalCUDACluster gives each Nanny ``env={"CUDA_VISIBLE_DEVICES": ...}``, replacing any ``env=``
    passed in; the recipe's worker_env must travel through Dask's config. A real Nanny with its
    env replaced the same way shows that the values still reach the worker process."""
    import dask.config
    from distributed import Client, Nanny, Scheduler, SpecCluster

    env = {
        **_load("cluster/gpu-dask-cuda.yaml")["worker_env"],
        "HYPERDEQ_RECIPE_PROBE": "gpu-dask-cuda",
    }
    for k in env:  # the flow process's own environment would take precedence over the config
        monkeypatch.delenv(k, raising=False)
    spec = {
        "gpu0": {
            "cls": Nanny,
            "options": {
                "env": {"CUDA_VISIBLE_DEVICES": "0"},
                "nthreads": 1,
                "resources": {"GPU": 1},
            },
        }
    }
    sched = {"cls": Scheduler, "options": {"dashboard_address": ":0", "host": "127.0.0.1"}}
    with (
        dask.config.set(_worker_env_config(env)),
        SpecCluster(workers=spec, scheduler=sched) as cluster,
        Client(cluster, set_as_default=False) as client,
    ):
        client.wait_for_workers(1, timeout=60)
        got = client.run(
            lambda: {k: __import__("os").environ.get(k) for k in (*env, "CUDA_VISIBLE_DEVICES")}
        )
    (w,) = got.values()
    assert w == {**env, "CUDA_VISIBLE_DEVICES": "0"}


@pytest.mark.gpu
def test_gpu_recipe_starts_one_worker_per_visible_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    dask_cuda = pytest.importorskip("dask_cuda")
    import dask.config
    import torch
    from distributed import Client

    from workers.cluster import ClusterSpec

    rec = _load("cluster/gpu-dask-cuda.yaml")
    kw = ClusterSpec(kind="cuda", recipe="gpu-dask-cuda").cluster_kwargs()
    kw.pop("env", None)
    kw["dashboard_address"] = ":0"
    for k in rec["worker_env"]:
        monkeypatch.delenv(k, raising=False)
    with (
        dask.config.set(_worker_env_config(rec["worker_env"])),
        dask_cuda.LocalCUDACluster(**kw) as cluster,
        Client(cluster, set_as_default=False) as client,
    ):
        n = torch.cuda.device_count()
        client.wait_for_workers(n, timeout=120)
        info = client.scheduler_info()["workers"].values()
        assert len(info) == n and all(w["resources"] == {"GPU": 1} for w in info)
        envs = client.run(lambda: __import__("os").environ.get("OMP_NUM_THREADS"))
        assert set(envs.values()) == {rec["worker_env"]["OMP_NUM_THREADS"]}


def test_slurm_recipe_is_dask_jobqueue_config() -> None:
    slurm = _load("cluster/slurm.yaml")["jobqueue"]["slurm"]
    for key in ("cores", "memory", "processes", "walltime", "queue"):
        assert key in slurm, key
    args = slurm["worker-extra-args"]
    assert args[args.index("--resources") + 1] == "GPU=1"
    assert "--nthreads" not in args  # jobqueue derives it from cores
    assert any("--gres=gpu:1" in d for d in slurm["job-extra-directives"])
    assert any("PREFECT_API_URL" in line for line in slurm["job-script-prologue"])
    assert re.fullmatch(r"\d\d:\d\d:\d\d", slurm["walltime"])


def _slurm_config() -> dict:
    """The recipe as Dask config (dotted keys: merged with jobqueue's defaults, as a YAML file in
    ~/.config/dask would be)."""
    return {
        f"jobqueue.slurm.{k}": v
        for k, v in _load("cluster/slurm.yaml")["jobqueue"]["slurm"].items()
    }


def test_slurm_recipe_renders_a_job_script_with_dask_jobqueue() -> None:
    import dask.config

    dask_jobqueue = pytest.importorskip("dask_jobqueue")
    with (
        dask.config.set(_slurm_config()),
        dask_jobqueue.SLURMCluster(
            scheduler_options={"dashboard_address": ":0", "host": "127.0.0.1"}
        ) as cluster,
    ):
        script = cluster.job_script()
    lines = script.splitlines()
    directives = [ln for ln in lines if ln.startswith("#SBATCH")]
    assert "#SBATCH --gres=gpu:1" in directives and "#SBATCH -p gpu" in directives
    assert "#SBATCH --cpus-per-task=8" in directives and "#SBATCH -t 04:00:00" in directives
    (cmd,) = [ln for ln in lines if "distributed.cli.dask_worker" in ln]
    assert cmd.count("--nthreads") == 1 and "--nthreads 1" in cmd
    assert "--resources GPU=1" in cmd and "--local-directory $TMPDIR" in cmd
    # the job's Python after the prologue's activate, not the client's interpreter
    assert cmd.startswith("python -m distributed.cli.dask_worker") and sys.executable not in script
    activate = next(i for i, ln in enumerate(lines) if "bin/activate" in ln)
    assert activate < lines.index(cmd)


def test_slurm_job_script_runs_the_activated_python_against_a_real_scheduler(
    tmp_path: Path,
) -> None:
    """The rendered job script, run by bash as SLURM would (``module`` and the environment are
    stand-ins): the worker that joins the scheduler is the activated environment's Python."""
    import dask.config
    from distributed import Client

    dask_jobqueue = pytest.importorskip("dask_jobqueue")
    home, venv_bin, stubs = (
        tmp_path / "home",
        tmp_path / "home" / "hyperdeq" / ".venv" / "bin",
        tmp_path / "stubs",
    )
    venv_bin.mkdir(parents=True)
    stubs.mkdir()
    # the job environment's interpreter: a launcher that records that it ran, then runs this Python
    (venv_bin / "python").write_text(
        f'#!/bin/sh\nexport HYPERDEQ_JOB_PYTHON="$0"\nexec "{sys.executable}" "$@"\n'
    )
    (venv_bin / "python").chmod(0o755)
    (venv_bin / "activate").write_text(
        f'export PATH="{venv_bin}:$PATH"\nexport HYPERDEQ_ACTIVATED=1\n'
    )
    (stubs / "module").write_text("#!/bin/sh\nexit 0\n")
    (stubs / "module").chmod(0o755)
    (tmp_path / "scratch").mkdir()
    cfg = _slurm_config()
    cfg["jobqueue.slurm.memory"] = (
        "2GiB"  # the recipe's 64GiB is only a limit, but keep this modest
    )
    with (
        dask.config.set(cfg),
        dask_jobqueue.SLURMCluster(
            scheduler_options={"dashboard_address": ":0", "host": "127.0.0.1"}
        ) as cluster,
        Client(cluster, set_as_default=False) as client,
    ):
        script = tmp_path / "job.sh"
        script.write_text(cluster.job_script())
        env = {
            "HOME": str(home),
            "TMPDIR": str(tmp_path / "scratch"),
            "PATH": f"{stubs}:/usr/bin:/bin",
        }
        proc = subprocess.Popen(
            ["bash", str(script)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        try:
            client.wait_for_workers(1, timeout=90)
            got = client.run(
                lambda: tuple(
                    __import__("os").environ.get(k)
                    for k in ("HYPERDEQ_JOB_PYTHON", "HYPERDEQ_ACTIVATED", "PREFECT_API_URL")
                )
            )
            info = list(client.scheduler_info()["workers"].values())
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
    ((job_python, activated, prefect_url),) = got.values()
    assert job_python == str(venv_bin / "python") and activated == "1"
    assert prefect_url == "http://prefect.internal:4200/api"
    (w,) = info
    assert w["nthreads"] == 1 and w["resources"] == {"GPU": 1}


def _docker_build_tags() -> dict[str, str]:
    """``{target: image tag}`` of the build commands deploy/Dockerfile documents."""
    text = (DEPLOY / "Dockerfile").read_text()
    found = re.findall(r"docker build -f deploy/Dockerfile --target (\w+)\s+-t (\S+) \.", text)
    assert found, "deploy/Dockerfile documents no build command"
    return dict(found)


def test_kubernetes_recipe_is_a_daskcluster_on_one_buildable_image() -> None:
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
    # Dask needs the same Python and dask on scheduler and workers: one image for both, and it is
    # the image the documented `docker build --target cuda` makes
    assert sched["image"] == worker["image"] == _docker_build_tags()["cuda"]
    assert sched["image"] in (ROOT / "docs" / "deploy.md").read_text()


def test_dockerfile_stages_run_the_same_python() -> None:
    """The CPU image (clients, Prefect workers) and the CUDA image (Dask workers) must match."""
    text = (DEPLOY / "Dockerfile").read_text()
    py = re.search(r"^ARG PYTHON_VERSION=(\d+\.\d+)$", text, flags=re.M).group(1)
    assert re.search(r"^FROM python:\$\{PYTHON_VERSION\}-slim AS cpu$", text, flags=re.M)
    base = re.search(r"^FROM nvidia/cuda:\S+-(ubuntu\d+\.\d+) AS cuda$", text, flags=re.M).group(1)
    system_python = {"ubuntu22.04": "3.10", "ubuntu24.04": "3.12"}  # the distributions' python3
    assert system_python[base] == py


def test_kubernetes_worker_and_scheduler_commands_start(tmp_path: Path) -> None:
    """The containers' commands, run as the operator runs them (scheduler address in
    DASK_SCHEDULER_ADDRESS, DASK_WORKER_NAME substituted): the worker joins with GPU=1, one thread
    and the recipe's environment. Only the dashboard port is freed (another process may hold 8788)."""
    import os

    from distributed import Client, LocalCluster
    from distributed.cli.dask_scheduler import main as scheduler_cli
    from distributed.cli.dask_worker import main as worker_cli

    k = _load("cluster/kubernetes.yaml")
    (worker,) = k["spec"]["worker"]["spec"]["containers"]
    (sched,) = k["spec"]["scheduler"]["spec"]["containers"]
    scheduler_cli.make_context("dask scheduler", list(sched["args"][2:]))  # the CLI accepts them
    args = [a.replace("$(DASK_WORKER_NAME)", "hyperdeq-worker-0") for a in worker["args"][2:]]
    worker_cli.make_context("dask worker", list(args))
    args[args.index("--dashboard-address") + 1] = ":0"
    env_recipe = {e["name"]: e["value"] for e in worker["env"]}
    dask_bin = Path(sys.executable).with_name("dask")
    with (
        LocalCluster(n_workers=0, dashboard_address=":0", host="127.0.0.1") as cluster,
        Client(cluster, set_as_default=False) as client,
    ):
        env = {**os.environ, **env_recipe, "DASK_SCHEDULER_ADDRESS": cluster.scheduler_address}
        proc = subprocess.Popen(
            [str(dask_bin), "worker", *args],
            env=env,
            cwd=tmp_path,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            client.wait_for_workers(1, timeout=90)
            info = list(client.scheduler_info()["workers"].values())
            got = client.run(lambda: {k: __import__("os").environ.get(k) for k in env_recipe})
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
    (w,) = info
    assert w["name"] == "hyperdeq-worker-0" and w["nthreads"] == 1 and w["resources"] == {"GPU": 1}
    assert list(got.values()) == [env_recipe]


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
        return k.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    ca_key = _key()
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "hyperdeq-test-ca")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    out = {"ca": d / "ca.pem"}
    out["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    for role in ("scheduler", "worker", "client"):
        k = _key()
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, role)]))
            .issuer_name(ca_name)
            .public_key(k.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=1))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(
                x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
                ),
                critical=False,
            )
            .sign(ca_key, hashes.SHA256())
        )
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
            async with Scheduler(
                host="tls://127.0.0.1", port=0, security=sec, dashboard_address=":0"
            ) as s:
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
        project_at = stage.find("pip install -e .")
        assert 0 <= torch_at < project_at, name
        assert "download.pytorch.org/whl/" in stage
        # the project itself is copied in after torch is installed
        assert stage.find("COPY pyproject.toml") > torch_at
    assert "whl/cpu" in stages[0] and "whl/cu" in stages[1]


def _copies(stage: str) -> list[tuple[str, str]]:
    return [tuple(m.split()) for m in re.findall(r"^COPY (\S+ \S+)$", stage, flags=re.M)]


def test_dockerfile_image_layout_finds_the_demo_scene_and_the_benchmarks(tmp_path: Path) -> None:
    """No Docker engine here: the image's /opt/hyperdeq is rebuilt from the Dockerfile's COPY lines
    (honouring deploy/Dockerfile.dockerignore) and the build's own check, `hyperdeq demo`'s scene
    lookup and `hyperdeq bench`'s data lookups run in it, outside the checkout."""
    import fnmatch
    import os
    import shutil

    text = (DEPLOY / "Dockerfile").read_text()
    ignore = [
        ln.strip()
        for ln in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
        if ln.strip() and not ln.startswith("#")
    ]
    stages = re.split(r"^FROM ", text, flags=re.M)[1:]
    assert _copies(stages[0]) == _copies(stages[1])
    workdir = re.search(r"^WORKDIR (\S+)$", stages[0], flags=re.M).group(1)
    image = tmp_path / "image"
    root = image / workdir.lstrip("/")

    def ignored(path: str, names: list[str]) -> set[str]:
        rel = Path(path).relative_to(ROOT)
        return {
            n
            for n in names
            for pat in ignore
            if fnmatch.fnmatch(str(rel / n), pat.removeprefix("**/"))
            or fnmatch.fnmatch(n, pat.removeprefix("**/"))
        }

    for line in _copies(stages[0]):
        *srcs, dest = line
        for src in srcs:
            assert (ROOT / src).exists(), f"COPY {src}: not in the repository"
            target = root / dest if dest != "./" else root / Path(src).name
            if (ROOT / src).is_dir():
                shutil.copytree(ROOT / src, target, ignore=ignored)
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / src, target)
    demo_env = re.search(r"HYPERDEQ_DEMO_SCENE=(\S+)", stages[0]).group(1)
    assert demo_env == re.search(r"HYPERDEQ_DEMO_SCENE=(\S+)", stages[1]).group(1)
    assert (image / demo_env.lstrip("/")).is_file()
    build_check = re.findall(r'python -c "(from flows\.settings import[^"]+)"', stages[0])
    assert build_check, "the Dockerfile's build no longer checks the demo scene"
    probe = "\n".join(
        [
            build_check[0],
            "import flows.settings as s, benchmarks.harness as h, benchmarks.data as d",
            f"assert s.__file__.startswith({str(root)!r}), s.__file__",
            "assert h.ROOT == s.REPO_ROOT and d.DEMO.is_file()",
            "assert (h.ROOT / 'tests/data/decsc').is_dir() and (h.ROOT / 'tests/data/unmix').is_dir()",
            "assert (h.ROOT / 'docs/benchmarks').is_dir() and h.RESULTS_DIR.is_dir()",
            "demo = s.demo_scene() if hasattr(s, 'demo_scene') else s.DEMO_SCENE",
            "assert demo.is_file(), demo",
        ]
    )
    env = {
        **os.environ,
        "PYTHONPATH": str(root),
        "HYPERDEQ_DEMO_SCENE": str(image / demo_env.lstrip("/")),
    }
    r = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    r = subprocess.run(
        [sys.executable, "-m", "flows", "bench", "--help"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0 and "benchmarks.md" in r.stdout, r.stderr[-2000:]


def test_docs_cover_every_recipe() -> None:
    doc = (ROOT / "docs" / "deploy.md").read_text()
    for name in (
        "local.yaml",
        "gpu-dask-cuda.yaml",
        "slurm.yaml",
        "kubernetes.yaml",
        "tls.yaml",
        "Dockerfile",
        "prefect.yaml",
        "sensors.yaml",
    ):
        assert name in doc, name
