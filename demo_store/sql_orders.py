"""``sql-executor/1``: the demo orders table as a read-only SQLite database for ``sql-sqlite``."""
from __future__ import annotations

import csv
import hashlib
import sqlite3
from pathlib import Path

from demo_store.base import DATA_DIR, Artifact, BuildContext
from cmesh.manifest import MANIFEST_FILE, Manifest, dump_manifest

CSV_FILE = "orders.csv"
DB_FILE = "orders.sqlite"
STATUSES = ("processing", "shipped", "delivered", "cancelled", "returned")

# Typed columns and CHECKs so bad demo data fails the build, not a query later.
# No SQL comments in here: the schema is also flattened to one line for the manifest.
SCHEMA = f"""
CREATE TABLE orders (
    order_id        INTEGER PRIMARY KEY,
    customer_name   TEXT    NOT NULL,
    customer_email  TEXT    NOT NULL,
    status          TEXT    NOT NULL CHECK (status IN ({", ".join(f"'{s}'" for s in STATUSES)})),
    item            TEXT    NOT NULL,
    quantity        INTEGER NOT NULL CHECK (quantity > 0),
    total_usd       REAL    NOT NULL CHECK (total_usd >= 0),
    placed_at       TEXT    NOT NULL,
    carrier         TEXT,
    tracking_number TEXT,
    eta             TEXT
);
CREATE INDEX orders_customer_email ON orders (customer_email);
"""

NOTES = {"placed_at": "ISO date", "carrier": "NULL until shipped",
         "tracking_number": "NULL until shipped", "eta": "ISO date; NULL when unknown"}
COLUMNS = ("order_id", "customer_name", "customer_email", "status", "item", "quantity",
           "total_usd", "placed_at", "carrier", "tracking_number", "eta")


def typed_row(row: dict[str, str], lineno: int) -> tuple:
    """One CSV record as the table's Python types; empty optional fields become NULL."""
    try:
        return (int(row["order_id"]), row["customer_name"], row["customer_email"],
                row["status"], row["item"], int(row["quantity"]),
                round(float(row["total_usd"]), 2), row["placed_at"],
                row["carrier"] or None, row["tracking_number"] or None, row["eta"] or None)
    except (KeyError, ValueError) as exc:
        raise ValueError(f"{CSV_FILE}:{lineno}: {exc}") from None


def read_orders(path: Path) -> list[tuple]:
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        if tuple(reader.fieldnames or ()) != COLUMNS:
            raise ValueError(f"{path}: header {reader.fieldnames} != {list(COLUMNS)}")
        return [typed_row(row, lineno) for lineno, row in enumerate(reader, 2)]


def write_database(db_path: Path, rows: list[tuple]) -> None:
    conn = sqlite3.connect(db_path)
    try:
        conn.executescript(SCHEMA)
        placeholders = ", ".join("?" * len(COLUMNS))
        conn.executemany(f"INSERT INTO orders ({', '.join(COLUMNS)}) VALUES ({placeholders})",
                         rows)
        conn.execute("PRAGMA user_version = 1")
        conn.commit()
        # Rollback-journal mode (not WAL) so a read-only opener never needs -wal/-shm files.
        conn.execute("PRAGMA journal_mode = DELETE")
        conn.execute("VACUUM")
    finally:
        conn.close()


def build(out: Path, ctx: BuildContext) -> None:
    rows = read_orders(ctx.data_dir / CSV_FILE)
    write_database(out / DB_FILE, rows)
    manifest = Manifest(
        name="sql-executor", version="1", engine="sql-sqlite", platform="sqlite",
        description="Read-only SQL over the demo orders table (named :parameters only)",
        inputs=[{"name": "query", "datatype": "BYTES", "shape": [-1]},
                {"name": "params", "datatype": "BYTES", "shape": [-1], "optional": True,
                 "description": "per query, a JSON object of named parameters"}],
        outputs=[{"name": "rows", "datatype": "BYTES", "shape": [-1],
                  "description": "per query, a JSON array of row objects"},
                 {"name": "row_count", "datatype": "INT64", "shape": [-1]}],
        batching={"max_batch_size": 16, "max_queue_delay_ms": 1},
        memory_mb=16,
        options={"db": DB_FILE, "row_limit": 100, "timeout_ms": 250, "max_query_chars": 2000},
        # The schema travels with the model so an agent can be prompted with it.
        metadata={"tables": {"orders": list(COLUMNS)}, "column_notes": NOTES,
                  "row_count": len(rows),
                  "schema": " ".join(SCHEMA.split()), "source": f"demo_store/data/{CSV_FILE}"},
    )
    (out / MANIFEST_FILE).write_text(dump_manifest(manifest))
    ctx.progress(f"  wrote {DB_FILE} with {len(rows)} orders")


def _fingerprint() -> str:
    # Recipe revision plus a digest of the shipped CSV, so data edits rebuild stores.
    digest = hashlib.sha256((DATA_DIR / CSV_FILE).read_bytes()).hexdigest()[:12]
    return f"1-{digest}"


ARTIFACTS = [Artifact("sql-executor", "1", build, fingerprint=_fingerprint())]
