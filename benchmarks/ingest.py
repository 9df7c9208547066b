"""`vitpipe ingest` vs calling img2dataset directly, same settings, same URL list, one run.

    python benchmarks/ingest.py [--images 3000] [--processes 1] [--threads 32]

Serves generated 64x64 PNGs from a loopback HTTP server (a separate process, 127.0.0.1 only),
then times img2dataset.download(...) with the arguments vitpipe derives from its config, and
`vitpipe ingest` (bounded fetch + img2dataset + manifest/dedup/re-shard pass), in alternating
order, and prints images/s and the overhead.
"""

from __future__ import annotations

import argparse
import io
import multiprocessing
import os
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")


def serve(port_queue, count: int) -> None:
    import http.server

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    bodies = []
    for _ in range(64):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buffer, format="PNG")
        bodies.append(buffer.getvalue())

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):  # noqa: N802
            index = int(self.path.strip("/").split(".")[0])
            body = bodies[index % len(bodies)] + index.to_bytes(8, "big")  # unique bytes after IEND: no duplicates
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    port_queue.put(server.server_address[1])
    server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--processes", type=int, default=1)
    parser.add_argument("--threads", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    from img2dataset import download

    from vitpipe.config import IngestConfig
    from vitpipe.pipeline.ingest import ingest
    from vitpipe.pipeline.web import img2dataset_kwargs

    queue = multiprocessing.get_context("spawn").Queue()
    server = multiprocessing.get_context("spawn").Process(target=serve, args=(queue, args.images), daemon=True)
    server.start()
    port = queue.get(timeout=60)
    config = IngestConfig(image_size=32, processes=args.processes, threads=args.threads, shard_size=1000,
                          allow_networks=["127.0.0.1/32"])
    times: dict[str, list[float]] = {"img2dataset": [], "vitpipe": []}
    written = {}
    with tempfile.TemporaryDirectory() as tmp:
        urls = Path(tmp) / "urls.txt"
        urls.write_text("".join(f"http://127.0.0.1:{port}/{i}.png\n" for i in range(args.images)))
        for repeat in range(args.repeats):
            order = ["img2dataset", "vitpipe"] if repeat % 2 == 0 else ["vitpipe", "img2dataset"]
            for name in order:
                out = Path(tmp) / f"{name}_{repeat}"
                start = time.perf_counter()
                if name == "img2dataset":
                    download(**img2dataset_kwargs(urls, out, config))
                    import pyarrow.parquet as pq
                    written[name] = sum(row["status"] == "success" for table in out.glob("*.parquet")
                                        for row in pq.read_table(table, columns=["status"]).to_pylist())
                else:
                    manifest = ingest(str(urls), out, config, progress=False)
                    written[name] = manifest["written"]
                times[name].append(time.perf_counter() - start)
                shutil.rmtree(out)
    server.terminate()
    best = {name: min(values) for name, values in times.items()}
    print(f"\n{args.images} URLs over loopback, {args.processes} process(es) x {args.threads} threads, "
          f"resize to 32 px, best of {args.repeats}\n")
    print("| path | seconds | images/s |")
    print("|---|---:|---:|")
    for name in ("img2dataset", "vitpipe"):
        print(f"| {name} | {best[name]:.2f} | {args.images / best[name]:.0f} |")
    print(f"\nvitpipe overhead: {best['vitpipe'] / best['img2dataset'] - 1:+.1%} (samples written: img2dataset "
          f"{written['img2dataset']}, vitpipe {written['vitpipe']})")


if __name__ == "__main__":
    main()
