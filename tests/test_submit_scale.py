"""Submit streams: 100,000 lines are validated and queued without holding the file in memory."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.helpers import ROOT

MEASURE = """
import json, resource, sys
from executor.config import load_settings
from executor.store import open_database
from executor.jobs.submit import submit
path, db, model = sys.argv[1:4]
settings = load_settings({"db": db, "model": model})
result = submit(settings, open_database(settings.db_url), path)
print(json.dumps({"items": result.items,
                  "maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def submit_measuring_memory(path: Path, db: Path, model: Path) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", MEASURE, str(path), str(db), str(model)],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )
    return json.loads(out.stdout)


def write_prompts(path: Path, n: int) -> Path:
    with open(path, "w") as f:
        for i in range(n):
            f.write(
                json.dumps(
                    {"custom_id": f"id-{i}", "prompt": "lorem ipsum dolor sit amet " * 20 + str(i)}
                )
                + "\n"
            )
    return path


def test_100k_lines_do_not_sit_in_memory(tmp_path, tiny_model):
    small = submit_measuring_memory(
        write_prompts(tmp_path / "small.jsonl", 10), tmp_path / "small.db", tiny_model
    )
    big_file = write_prompts(tmp_path / "big.jsonl", 100_000)
    big = submit_measuring_memory(big_file, tmp_path / "big.db", tiny_model)
    assert big["items"] == 100_000
    file_size = big_file.stat().st_size  # about 58 MB
    growth = big["maxrss"] - small["maxrss"]
    # Holding the lines (let alone parsed objects) would cost more than the file itself; what
    # remains is the set of custom_ids for duplicate detection and one insert chunk.
    assert growth < file_size / 2, f"memory grew {growth / 2**20:.0f} MiB"
