"""The review studio: one local web page from uploading a specs sheet to publishing (``shoe-lora studio``).

:mod:`.app` is the Starlette app, :mod:`.dagster_runs` launches runs through Dagster's GraphQL API and
:mod:`.serve` checks the command line's settings and runs uvicorn. The logic (specs checks, reviews.csv
writes, the published set) is the framework-free core's: :mod:`shoe_lora_pipeline.core.studio` and
:mod:`shoe_lora_pipeline.core.renders.decisions`.
"""
