"""executor: an offline batch executor for GGUF language models.

The parts, and the only ways the arrows may point:

    cli.py ──────────▶ services ───────────────────────────▶ store/  (the only SQL)
    (parse, call one,  submit, pipeline, worker, loader,       db, queue, loads, locks, …
     render: report.py export, status, doctor, models
     progress.py)          │            │
                           ▼            ▼
                 plan.py (pure)    supervisor.py ──spawn──▶ engine/ (model process: llama_cpp
                 gguf_info, gpu     records.py ◀───────────  only in engine/llama.py; never
                                    (the pipe's types)        imports the store)

Where new things go: a command → a function in cli.py calling one service; a table → report.py;
an input format → a parser beside openai_batch.py, dispatched in inputs.py, fields from
fields.py; a database backend → store/db.py (same SQLAlchemy Core statements); an engine →
engine/ behind the Engine protocol, chosen in engine.create_engine; a placement rule →
plan.py, with its inputs gathered in loader.plan_for.
"""

__version__ = "0.1.0"
