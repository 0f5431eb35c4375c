"""A local Spark for the tests: every folder it writes under one root, quiet, and its JVM gone when it stops.

pyspark starts the JVM as a child process that outlives ``SparkSession.stop()`` until the Python process exits;
a test suite must not leave it behind, so :func:`local_spark` also closes the gateway and waits for the JVM to exit
(it does once its stdin closes). Spark's scratch space, the JVM's temp folder and the Python workers' TMPDIR all
point under ``root``, so a test can scan everything Spark wrote, and its log lines go to ``root / LOG``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

SPARK_BIN = Path(sys.executable).parent / "spark-submit"
#: the file under the root that receives the JVM's and its Python workers' stderr (Spark's log lines)
LOG = "spark.log"


def scratch_env(root: Path) -> dict[str, str]:
    """The environment a local Spark (driver JVM and Python workers) is started with: temp folders under ``root``."""
    tmp = root / "tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    return {"PYSPARK_PYTHON": sys.executable, "TMPDIR": str(tmp), "SPARK_LOCAL_DIRS": str(root / "local")}


def local_conf(root: Path) -> dict[str, str]:
    """local[2]-sized settings: no UI, few partitions, and every folder Spark writes under ``root``."""
    (root / "local").mkdir(parents=True, exist_ok=True)
    return {
        "spark.ui.enabled": "false",
        "spark.ui.showConsoleProgress": "false",
        "spark.sql.shuffle.partitions": "2",
        "spark.default.parallelism": "2",
        "spark.local.dir": str(root / "local"),
        "spark.sql.warehouse.dir": str(root / "warehouse"),
        "spark.driver.extraJavaOptions": f"-Djava.io.tmpdir={root / 'tmp'} -Dderby.system.home={root / 'derby'}",
        "spark.executor.extraJavaOptions": f"-Djava.io.tmpdir={root / 'tmp'}",
        "spark.driver.memory": "1g",
    }


@contextmanager
def local_spark(root: Path, extra: dict[str, str] | None = None) -> Iterator[Any]:
    """A ``local[2]`` SparkSession, stopped and its JVM reaped on exit."""
    from pyspark import SparkContext
    from pyspark.sql import SparkSession

    saved = {k: os.environ.get(k) for k in scratch_env(root)}
    os.environ.update(scratch_env(root))
    builder = SparkSession.builder.master("local[2]").appName("inferd-tests")
    for key, value in {**local_conf(root), **(extra or {})}.items():
        builder = builder.config(key, value)
    # the JVM (Spark's log lines) and the Python workers it forks write to the stderr they inherit: make it a file
    # of ours, so a test can read everything Spark logged
    stderr = os.dup(2)
    with (root / LOG).open("ab") as log:
        os.dup2(log.fileno(), 2)
        try:
            spark = builder.getOrCreate()
        finally:
            os.dup2(stderr, 2)
            os.close(stderr)
    try:
        spark.sparkContext.setLogLevel("ERROR")
        yield spark
    finally:
        spark.stop()
        gateway = SparkContext._gateway
        if gateway is not None:
            # pyspark's own handle on the JVM it launched (not public: an AttributeError here means pyspark changed
            # how it keeps it, and the JVM would be left behind)
            proc: subprocess.Popen[bytes] = gateway.proc
            gateway.shutdown()
            if proc.stdin:
                proc.stdin.close()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
            SparkContext._gateway = None
            SparkContext._jvm = None
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
