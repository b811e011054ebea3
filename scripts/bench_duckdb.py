"""DuckDB reference for the batch benchmark: the same SQL over the same Parquet
files (the current files of the Delta table, read with hive partitioning).

usage: bench_duckdb.py TABLE_DIR SQL   -> prints one markdown table row
"""
import sys
import time

import deltalake
import duckdb

table_dir, sql = sys.argv[1], sys.argv[2]
files = deltalake.DeltaTable(table_dir).file_uris()
con = duckdb.connect()
con.execute("SET threads TO 2")
files_sql = "[" + ", ".join("'" + f.replace("file://", "") + "'" for f in files) + "]"
con.execute(
    f"CREATE VIEW raw_events AS SELECT * REPLACE (CAST(event_date AS VARCHAR) AS event_date, "
    f"CAST(event_hour AS INTEGER) AS event_hour) FROM read_parquet({files_sql}, hive_partitioning = true)"
)
start = time.perf_counter()
rows = con.execute(sql).fetchall()
secs = time.perf_counter() - start
print(f"| aggregation alone, DuckDB {duckdb.__version__} (same SQL, same files) | {secs:.2f} | {len(rows)} |")
