"""URL lists on Spark (`ingest distributor=pyspark`): the whole ingest runs as Spark tasks.

1. img2dataset's pyspark distributor downloads its shards on the executors, with vitpipe's
   bounded, address-checking fetch (`bounded_downloader`), into OUT/_work/img2dataset.
2. One task per downloaded shard classifies its rows (failed / filtered / sample, split): rows
   without image bytes, in a DataFrame.
3. Exact dedup is a window over sha256 on the cluster: the first copy in (shard, row) order is
   kept, the order the local ingest reads in, so both modes keep the same copies.
4. The driver collects only counts per (split, downloaded shard), turns them into offsets, and each
   final shard is written (tar, sha256, stats) by one task that reads the downloaded shards it needs.

The driver merges counts and per-shard stats into the same manifest.json / sizes.json as a local
ingest. Executors must see OUT (a shared filesystem) and have vitpipe installed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from vitpipe.config import ConfigError, IngestConfig
from vitpipe.pipeline import ingest as local
from vitpipe.pipeline.sources import Sample, SourceSpec

INSTALL_HINT = ("distributor=pyspark needs PySpark and a Java runtime: pip install 'vitpipe[spark]' "
                "and apt-get install openjdk-17-jre-headless (or set JAVA_HOME)")
ROW_SCHEMA = ("shard INT, position INT, key STRING, outcome STRING, reason STRING, sha256 STRING, "
              "ref STRING, detail STRING")


def check_can_run(spec: SourceSpec) -> None:
    """Refuse, before anything is written, what Spark mode cannot do here."""
    if spec.kind != "url_list":
        raise ConfigError(f"distributor=pyspark distributes URL-list downloads; a {spec.kind} source is "
                          "read on this machine: drop distributor=pyspark")
    home = os.environ.get("JAVA_HOME")
    if home and not os.access(Path(home) / "bin" / "java", os.X_OK):  # Spark would print shell noise
        raise ConfigError(f"JAVA_HOME={home} holds no bin/java; point it at a Java 17+ runtime or unset it")
    if not _importable("pyspark") or not (home or shutil.which("java")):
        raise ConfigError(INSTALL_HINT)


def _importable(name: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(name) is not None
    except ValueError:  # a module set to None in sys.modules (how tests hide an install)
        return False


@contextlib.contextmanager
def session(config: IngestConfig):
    """The active Spark session (spark-submit, a notebook) or one of ours, stopped afterwards."""
    from pyspark.sql import SparkSession

    active = SparkSession.getActiveSession()
    if active is not None:
        yield active
        return
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)  # executors run this interpreter
    builder = (SparkSession.builder.appName("vitpipe-ingest").config("spark.ui.enabled", "false")
               .config("spark.ui.showConsoleProgress", str(sys.stderr.isatty()).lower()))  # no bars in logs
    master = config.spark_master or os.environ.get("SPARK_MASTER")
    if master:
        builder = builder.master(master)
    elif "PYSPARK_GATEWAY_PORT" not in os.environ:  # not under spark-submit, which sets the master
        builder = builder.master(f"local[{config.processes}]")
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("ERROR")
    try:
        yield spark
    finally:
        spark.stop()


def ingest_url_list(url_list: Path, out: Path, config: IngestConfig,
                    flat: bool) -> tuple[dict[str, local.SplitWriter], local.Accounts]:
    from vitpipe.pipeline import web

    with session(config) as spark:
        downloaded = web.download(url_list, out / local.WORK_DIR, config)
        tables = sorted(str(p) for p in downloaded.glob("*.parquet"))
        settings = dataclasses.asdict(config)
        rows = spark.sparkContext.parallelize(tables, max(1, len(tables))).flatMap(
            lambda table: classify_shard(table, settings))
        frame = spark.createDataFrame(rows, ROW_SCHEMA).cache()
        accounts = _accounts(frame)
        kept = _dedup(frame, config, accounts)
        writers = _write_shards(spark, kept, out, config, flat, settings)
        frame.unpersist()
    return writers, accounts


def classify_shard(table: str, settings: dict[str, Any]) -> list[tuple]:
    """Task: the rows of one downloaded shard, placed as the local ingest places them (no bytes)."""
    from vitpipe.pipeline.web import shard_records

    config = IngestConfig(**settings)
    shard, rows = int(Path(table).stem), []
    for position, record in enumerate(shard_records(Path(table), config.label_col, config.split_col)):
        outcome, where = local.place(record, config)
        if outcome == "sample":
            rows.append((shard, position, record.key, where, None, record.content_hash, None, None))
        else:
            ref, detail = (record.ref, record.detail[:300]) if outcome == "failed" else (None, None)
            rows.append((shard, position, None, outcome, where, None, ref, detail))
    return rows


def _accounts(frame) -> local.Accounts:
    """Failure and filter counts, and the first examples per reason in the local ingest's order."""
    from pyspark.sql import Window, functions as F

    accounts = local.Accounts()
    for outcome, reason, count in frame.groupBy("outcome", "reason").count().collect():
        accounts.rows += count
        if outcome == "failed":
            accounts.failures[reason] = count
        elif outcome == "filtered":
            accounts.filtered[reason] = count
    first = Window.partitionBy("reason").orderBy("shard", "position")
    examples = (frame.where(F.col("outcome") == "failed").withColumn("rank", F.row_number().over(first))
                .where(F.col("rank") <= local.MAX_EXAMPLES_PER_REASON).orderBy("reason", "rank").collect())
    for row in examples:
        accounts.examples.setdefault(row.reason, []).append({"ref": row.ref, "detail": row.detail})
    return accounts


def _dedup(frame, config: IngestConfig, accounts: local.Accounts):
    """Samples left after exact dedup (first copy in shard, row order; a test split is kept whole)."""
    from pyspark.sql import Window, functions as F

    samples = frame.where(~F.col("outcome").isin("failed", "filtered")).withColumnRenamed("outcome", "split")
    if not config.dedup:
        return samples
    copies = Window.partitionBy("sha256").orderBy("shard", "position")
    deduped = samples.where(F.col("split") != "test").withColumn("copy", F.row_number().over(copies))
    accounts.duplicates = deduped.where(F.col("copy") > 1).count()
    return deduped.where(F.col("copy") == 1).drop("copy").unionByName(samples.where(F.col("split") == "test"))


def _write_shards(spark, kept, out: Path, config: IngestConfig, flat: bool,
                  settings: dict[str, Any]) -> dict[str, local.SplitWriter]:
    """Number every kept sample within its split from per-shard counts (the only thing collected),
    then write each final shard in a task of its own."""
    from pyspark.sql import Window, functions as F

    counts = sorted((r.split, r.shard, r["count"]) for r in kept.groupBy("split", "shard").count().collect())
    offsets, running = [], Counter()
    for split, shard, count in counts:
        offsets.append((split, shard, running[split]))
        running[split] += count
    offset_frame = spark.createDataFrame(offsets, "split STRING, shard INT, offset LONG")
    in_shard = Window.partitionBy("split", "shard").orderBy("position")
    numbered = (kept.join(F.broadcast(offset_frame), ["split", "shard"])
                .withColumn("index", F.col("offset") + F.row_number().over(in_shard) - 1)
                .withColumn("final", (F.col("index") / config.shard_size).cast("long")))
    groups = numbered.groupBy("split", "final").agg(
        F.sort_array(F.collect_list(F.struct("shard", "position", "key"))).alias("members"))
    downloaded = str(out / local.WORK_DIR / "img2dataset")
    results = groups.rdd.map(lambda g: write_final_shard(
        g.split, g.final, [(m.shard, m.key) for m in g.members], downloaded, str(out), flat, settings)).collect()
    writers = {split: local.SplitWriter(out if flat else out / split, config.shard_size) for split in running}
    for split, _, entry, reused in sorted(results, key=lambda r: (r[0], r[1])):
        writer = writers[split]
        writer.shards.append(entry)
        writer.written += entry["samples"]
        writer.skipped_existing += reused
    return writers


def write_final_shard(split: str, index: int, members: list[tuple[int, str]], downloaded: str, out: str,
                      flat: bool, settings: dict[str, Any]) -> tuple[str, int, dict[str, Any], bool]:
    """Task: final shard ``index`` of ``split`` from the downloaded shards holding its members."""
    from vitpipe.pipeline.web import shard_records

    config = IngestConfig(**settings)
    wanted: dict[int, set[str]] = {}
    for shard, key in members:
        wanted.setdefault(shard, set()).add(key)
    found: dict[tuple[int, str], Sample] = {}
    for shard, keys in wanted.items():
        for record in shard_records(Path(downloaded) / f"{shard:05d}.parquet", config.label_col, config.split_col):
            if isinstance(record, Sample) and record.key in keys:
                found[shard, record.key] = record
    samples = [found[member] for member in members]
    directory = Path(out) if flat else Path(out) / split
    entry, reused = local.write_shard(directory, index, samples)
    return split, index, entry, reused
