"""Benchmark: model download through the console's job vs plain curl, and the /hf/ endpoint's
serving throughput vs a plain static file server (Python's http.server), in one run.

A synthetic model of about 1 GiB in 5 files is imported into a 'peer' console that serves it on
/hf/ (uvicorn, as `make run` starts it). Then, on the same machine:
- download: curl fetching every file from /hf/ into a directory, versus a download job of this
  console (huggingface_hub metadata + transfer + sha256 of every file + atomic publish) from the
  same /hf/ endpoint; ratio_vs_curl = curl time / job time.
- serving: curl fetching every file to /dev/null from /hf/, versus from `python -m http.server`
  serving the same directory; ratio_vs_static = static time / /hf/ time.
Each measurement is repeated and the best run kept. Run: .venv/bin/python bench/download.py
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import console

REPEATS = int(os.environ.get("BENCH_REPEATS", "4"))
FILE_SIZES = [256, 256, 256, 255]  # MiB of weights, plus config and tokenizer files


def setup_django(work: Path) -> None:
    console(work, redis_db=12, flush=False, VAR_DIR=str(work / "client-var"), DATA_DIR=str(work / "client-data"),
            DATABASE_URL=f"sqlite:///{work / 'client.sqlite3'}")  # fmt: skip


def curl(urls: list[str], headers: list[str], out_dir: Path | None) -> float:
    command = ["curl", "-sS", "--fail", "--http1.1"]
    for header in headers:
        command += ["-H", header]
    for url in urls:
        target = str(out_dir / url.rsplit("/", 1)[1]) if out_dir else "/dev/null"
        command += ["-o", target, url]
    start = time.perf_counter()
    subprocess.run(command, check=True)
    return time.perf_counter() - start


def settle() -> None:
    """Start each measurement with no dirty pages left over from the previous one."""
    os.sync()
    time.sleep(0.5)


def best(times: list[float]) -> float:
    return min(times)


def main() -> None:
    from tests.models_catalog.helpers import Peer, free_port, make_model_dir, write_safetensors

    work = Path(tempfile.mkdtemp(prefix="bench-download-"))
    try:
        source = make_model_dir(work / "source", weights_bytes=1024)
        (source / "model.safetensors").unlink()
        (source / "pytorch_model.bin").unlink()
        for index, mib in enumerate(FILE_SIZES):
            write_safetensors(source / f"model-{index + 1:05d}-of-{len(FILE_SIZES):05d}.safetensors", mib * 1024**2)
        total = sum(p.stat().st_size for p in source.iterdir())
        names = sorted(p.name for p in source.iterdir())

        peer = Peer(work / "peer").start()
        peer.manage("import_model", str(source), "bench/model")
        snapshot = next((work / "peer" / "data" / "models").glob("bench--model/snapshots/*"))
        static_port = free_port()
        static = subprocess.Popen(
            [sys.executable, "-m", "http.server", str(static_port), "--bind", "127.0.0.1", "-d", str(snapshot)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(1.0)
        hf_urls = [f"{peer.url}/hf/bench/model/resolve/main/{name}" for name in names]
        static_urls = [f"http://127.0.0.1:{static_port}/{name}" for name in names]
        auth = [f"Authorization: Bearer {peer.token}"]

        setup_django(work)
        from appliance.jobs import run_job
        from models_catalog.models import HubEndpoint, LocalModel, ModelJob
        from models_catalog.tasks import model_job_body

        endpoint = HubEndpoint(name="peer", url=peer.url + "/hf", kind=HubEndpoint.Kind.PEER)
        endpoint.set_token(peer.token)
        endpoint.save()

        curl_times, job_times, hf_times, static_times = [], [], [], []

        def run_curl() -> None:
            out = work / "curl-out"
            out.mkdir()
            settle()
            curl_times.append(curl(hf_urls, auth, out))
            shutil.rmtree(out)

        def run_job_once() -> None:
            job = LocalModel.request_download("bench/model", endpoint=endpoint, allow_patterns=["*"], enqueue=False)
            settle()
            start = time.perf_counter()
            status = run_job(ModelJob, job.pk, model_job_body)
            job_times.append(time.perf_counter() - start)
            job.refresh_from_db()
            if status != "succeeded":
                raise SystemExit(f"download job {status}: {job.error}")
            model = LocalModel.objects.get(repo_id="bench/model")
            assert model.size_bytes == total
            shutil.rmtree(model.directory)
            model.delete()

        for repeat in range(REPEATS):
            # Alternate the order: whoever writes second would otherwise pay for the first's writeback.
            for step in (run_curl, run_job_once) if repeat % 2 == 0 else (run_job_once, run_curl):
                step()
            settle()
            hf_times.append(curl(hf_urls, auth, None))
            settle()
            static_times.append(curl(static_urls, [], None))

        static.terminate()
        peer.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    def rate(seconds: float) -> float:
        return total / seconds / 1024**2

    rows = [
        ("download: curl from /hf/ to disk", best(curl_times)),
        ("download: console job (verify + publish)", best(job_times)),
        ("serving: curl from /hf/ to /dev/null", best(hf_times)),
        ("serving: curl from http.server to /dev/null", best(static_times)),
    ]
    print(f"\n{total / 1024**2:.0f} MiB in {len(names)} files, best of {REPEATS} runs, same machine\n")
    print(f"| {'measurement':45} | {'seconds':>8} | {'MiB/s':>8} |")
    print(f"| {'-' * 45} | {'-' * 8}:| {'-' * 8}:|")
    for label, seconds in rows:
        print(f"| {label:45} | {seconds:8.2f} | {rate(seconds):8.0f} |")
    ratio_vs_curl = best(curl_times) / best(job_times)
    ratio_vs_static = best(static_times) / best(hf_times)
    print(f"\nratio_vs_curl = {ratio_vs_curl:.2f} (goal >= 0.8), ratio_vs_static = {ratio_vs_static:.2f} (goal >= 0.7)")
    print(
        json.dumps(
            {
                "ratio_vs_curl": round(ratio_vs_curl, 3),
                "ratio_vs_static": round(ratio_vs_static, 3),
                "job_mib_s": round(rate(best(job_times)), 1),
                "curl_mib_s": round(rate(best(curl_times)), 1),
                "hf_serving_mib_s": round(rate(best(hf_times)), 1),
                "static_serving_mib_s": round(rate(best(static_times)), 1),
            }
        )
    )


if __name__ == "__main__":
    main()
