"""Print an export file as `custom_id: output`, one block per prompt (used by `make demo`)."""

import json
import sys
import textwrap

with open(sys.argv[1], encoding="utf-8") as results:
    for line in results:
        row = json.loads(line)
        text = row["output"] if row["status"] == "done" else f"[{row['status']}] {row['error']}"
        print(f"\n{row['custom_id']} ({row['completion_tokens']} tokens, {row['finish_reason']}):")
        print(textwrap.indent(text.strip(), "    "))
