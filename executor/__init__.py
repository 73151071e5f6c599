"""executor: an offline batch executor for GGUF language models.

The folders are the parts; the arrows point down only (tests/test_architecture.py holds the
table of which part may import which, and fails on a cycle):

    cli/        the command line: parse, call one service, render (render.py, progress.py)
     │          `executor doctor` (doctor.py), log lines (logs.py)
     ├──▶ serve/    OpenAI's Files and Batch API and the status page (never loads a model)
     │     │
     ▼     ▼
    jobs/       what users hand in and take out: prompt files and OpenAI batch lines (inputs,
     │          fields, openai_batch), job specs, submit, export, status, run-job
     ▼
    run/        the worker (claim → generate → checkpoint), the loader (load, measure,
     │          shrink), the supervisor (the model process's parent side)
     ▼
    planning/   the pure plan (plan.py, sizes.py, placement.py) and what it needs gathered
     │          (gather.py), the context a job needs (workload.py), one rule for a job's
     │          load settings (job_settings.py)
     ▼
    gguf/  machine/  engine/
    GGUF headers, tensor tables and model files; NVML, CPUs, RAM, energy; the model process
    (child.py, llama.py: the only llama_cpp imports are under engine/, which never imports
    the store) and what crosses its pipe (protocol.py)
     ▼
    store/      the only SQL: schema, migrations, queue, results, loads, workers, locks
     ▼
    core        config, errors, units, redact, paths, params (generation parameters),
                outcomes (how an item ends): they import nothing above them

The model process imports only engine/, machine.cpus, params and outcomes.

Where new things go: a command → a function in cli/*_commands.py calling one service; a table
→ cli/render.py; an input format → a parser beside jobs/openai_batch.py, dispatched in
jobs/inputs.py, its fields checked by jobs/fields.py; a store backend → store/db.py (the same
SQLAlchemy Core statements run on SQLite and PostgreSQL); an engine → engine/ behind the
Engine protocol, chosen in engine.create_engine; a placement rule → planning/plan.py with its
inputs gathered in planning/gather.py; a scheduler integration (Slurm, Kubernetes) → run/ for
what the worker must obey, examples/ for the scripts.
"""

__version__ = "0.1.0"
