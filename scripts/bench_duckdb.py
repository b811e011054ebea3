"""DuckDB reference for the batch benchmarks: the same SQL over the same Parquet
files (the current files of the Delta table, read with hive partitioning).

usage:
  bench_duckdb.py TABLE_DIR SQL
      -> prints one markdown table row (the `batch` benchmark)
  bench_duckdb.py TABLE_DIR SQL [--daily-sql SQL] [--files LIST] [--memory-limit 2GiB]
                  [--temp-dir DIR] [--out DIR] [--json]
      (the `batch_scale` benchmark)

--files LIST      the data files, one path relative to TABLE_DIR a line, instead of
                  reading the Delta log (which imports deltalake into this process)
--daily-sql SQL   a second query, timed apart (the batch run computes both)
--memory-limit    DuckDB's memory_limit (beyond it, it spills to --temp-dir)
--out DIR         write each query's result to DIR/<name>.parquet (COPY ... TO), as
                  the batch run writes its tables, instead of fetching the rows into
                  Python
--json            print one JSON object: version, settings, each query's seconds and
                  rows, and the peak bytes of the temp directory seen while running
"""
import argparse
import json
import os
import threading
import time

import duckdb

p = argparse.ArgumentParser()
p.add_argument("table_dir")
p.add_argument("sql")
p.add_argument("--daily-sql")
p.add_argument("--files")
p.add_argument("--memory-limit")
p.add_argument("--temp-dir")
p.add_argument("--out")
p.add_argument("--json", action="store_true")
p.add_argument("--threads", type=int, default=2)
args = p.parse_args()

if args.files:
    with open(args.files) as f:
        files = [os.path.join(args.table_dir, line.strip()) for line in f if line.strip()]
else:
    import deltalake

    files = [f.replace("file://", "") for f in deltalake.DeltaTable(args.table_dir).file_uris()]

con = duckdb.connect()
con.execute(f"SET threads TO {args.threads}")
if args.memory_limit:
    con.execute(f"SET memory_limit = '{args.memory_limit}'")
    # the results are unordered (the batch layer sorts what it writes), so DuckDB
    # need not keep the order in which rows came, which costs memory
    con.execute("SET preserve_insertion_order = false")
if args.temp_dir:
    os.makedirs(args.temp_dir, exist_ok=True)
    con.execute(f"SET temp_directory = '{args.temp_dir}'")
files_sql = "[" + ", ".join("'" + f + "'" for f in files) + "]"
# event_time as epoch microseconds: the batch layer's SQL casts it to BIGINT, as DataFusion does
con.execute(
    f"CREATE VIEW raw_events AS SELECT * REPLACE (CAST(event_date AS VARCHAR) AS event_date, "
    f"CAST(event_hour AS INTEGER) AS event_hour, epoch_us(event_time) AS event_time) "
    f"FROM read_parquet({files_sql}, hive_partitioning = true)"
)

peak_temp = 0
running = False


def watch_temp():
    """Sample the temp directory's size every 50 ms while a query runs."""
    global peak_temp
    while running:
        size = 0
        for root, _, names in os.walk(args.temp_dir):
            for n in names:
                try:
                    size += os.path.getsize(os.path.join(root, n))
                except OSError:
                    pass
        peak_temp = max(peak_temp, size)
        time.sleep(0.05)


def run(name, sql):
    global running
    watcher = None
    if args.temp_dir:
        running = True
        watcher = threading.Thread(target=watch_temp, daemon=True)
        watcher.start()
    start = time.perf_counter()
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        out = os.path.join(args.out, f"{name}.parquet")
        rows = con.execute(f"COPY ({sql}) TO '{out}' (FORMAT parquet)").fetchone()[0]
    else:
        rows = len(con.execute(sql).fetchall())
    secs = time.perf_counter() - start
    running = False
    if watcher:
        watcher.join()
    return {"name": name, "secs": secs, "rows": rows}


queries = [run("hourly", args.sql)]
if args.daily_sql:
    queries.append(run("daily", args.daily_sql))

if args.json:
    print(
        json.dumps(
            {
                "duckdb": duckdb.__version__,
                "threads": args.threads,
                "memory_limit": con.execute("SELECT current_setting('memory_limit')").fetchone()[0],
                "files": len(files),
                "queries": queries,
                "peak_temp_bytes": peak_temp,
            }
        )
    )
else:
    for q in queries:
        print(
            f"| aggregation alone, DuckDB {duckdb.__version__} (same SQL, same files) | {q['secs']:.2f} | {q['rows']} |"
        )
