"""What users run around the compiler, apart from the compiler core.

- ``cli``: the ``llmopt`` command (inspect, bench, autotune, models);
- ``inspection``: ``llmopt.explain`` (runs a model, gathers Dynamo's and llmopt's story)
  and its text view; ``explain``: the explanation data model both views read;
  ``html_report``: the HTML view;
- ``bench``: end-to-end tokens/s (``peak_memory``: its memory figure); ``autotune_cli``:
  ``llmopt autotune``; ``model_spec``: what ``MODEL_OR_CONFIG`` names (presets, HF
  configs, ``module:factory``);
- ``gpu_build`` (ahead-of-time sm_80/sm_90 build check, CI on CPU; its mechanism is
  ``triton_aot``) and ``gpu_check`` (the one-shot check on a lent GPU), both run with
  ``python -m llmopt.tools.<name>``.

Dependencies point one way: tools import the backend, passes, codegen and runtime;
nothing in the compiler imports tools. Imports nothing at package import.
"""
