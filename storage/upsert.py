"""Insert-or-replace on a unique key, with each dialect's native ON CONFLICT where it has one."""

from sqlalchemy import and_, insert, update
from sqlalchemy.dialects import postgresql, sqlite

_NATIVE = {"sqlite": sqlite.insert, "postgresql": postgresql.insert}


def upsert(conn, table, rows: list[dict], key: tuple[str, ...], replace: tuple[str, ...]) -> None:
    """Insert rows; where `key` already exists, overwrite the `replace` columns instead."""
    if not rows:
        return
    dialect_insert = _NATIVE.get(conn.dialect.name)
    if dialect_insert is not None:
        stmt = dialect_insert(table)
        stmt = stmt.on_conflict_do_update(index_elements=list(key),
                                          set_={c: stmt.excluded[c] for c in replace})
        conn.execute(stmt, rows)
        return
    # Portable fallback for other databases: update, and insert what did not exist.
    for row in rows:
        match = and_(*(table.c[c] == row[c] for c in key))
        if conn.execute(update(table).where(match).values({c: row[c] for c in replace})).rowcount == 0:
            conn.execute(insert(table).values(row))
