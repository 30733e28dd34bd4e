"""On-disk cache of generations and judgements (SQLite, one row per finished item).

Keys are hashes of (model fingerprint, exact prompt text, parameters), so a rerun with the same
inputs is instant and an interrupted run resumes where it stopped: each result is committed as
soon as it exists. The model fingerprint covers the base weights' files and the adapter's bytes,
so retraining a run into the same folder never serves stale answers.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
from pathlib import Path


def _file_sig(p: Path) -> str:
    st = p.stat()
    return f"{p.name}:{st.st_size}:{int(st.st_mtime_ns)}"


def model_fingerprint(loaded) -> str:
    fp = getattr(loaded, "_fingerprint", None)
    if fp:
        return fp
    h = hashlib.sha256()
    base = Path(loaded.base_folder)
    for f in sorted(base.glob("*.json")) + sorted(base.glob("*.safetensors")):
        h.update(_file_sig(f).encode())
    if loaded.adapter is not None:
        for f in sorted(Path(loaded.adapter).glob("adapter_model.safetensors")):
            h.update(f.read_bytes())
    h.update(f"{loaded.template}|{loaded.system_prompt}|{loaded.dtype}".encode())
    loaded._fingerprint = h.hexdigest()[:24]
    return loaded._fingerprint


class Cache:
    def __init__(self, path: Path | None = None):
        from .models import cache_dir

        self.path = Path(path or os.environ.get("TUNELAB_GEN_CACHE", cache_dir() / "cache.sqlite"))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(str(self.path), timeout=30)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("CREATE TABLE IF NOT EXISTS items (key TEXT PRIMARY KEY, kind TEXT, value TEXT)")
        self.db.commit()

    @staticmethod
    def key(kind: str, *parts) -> str:
        return hashlib.sha256(json.dumps([kind, *parts], sort_keys=True, ensure_ascii=False,
                                         default=str).encode()).hexdigest()

    def get_raw(self, key: str):
        row = self.db.execute("SELECT value FROM items WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else None

    def put_raw(self, key: str, kind: str, value) -> None:
        self.db.execute("INSERT OR REPLACE INTO items VALUES (?, ?, ?)",
                        (key, kind, json.dumps(value, ensure_ascii=False)))
        self.db.commit()

    def get(self, loaded, prompt: str, params):
        return self.get_raw(self.key("gen", model_fingerprint(loaded), prompt, params.key()))

    def put(self, loaded, prompt: str, params, value) -> None:
        self.put_raw(self.key("gen", model_fingerprint(loaded), prompt, params.key()), "gen", value)
