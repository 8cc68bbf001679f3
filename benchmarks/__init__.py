"""The benchmarks of gategrad, run as scripts (``python benchmarks/overhead.py``).

``overhead.py`` is the entry point of the overhead benchmark; its parts are private modules:
``_config`` (sizes, variants, modes), ``_timing`` (interleaved timing), ``_memory`` (memory
counters and RSS subprocesses), ``_runners`` (what is timed, for every framework),
``_sections`` (the report's sections) and ``_report`` (the Markdown renderer).
"""
