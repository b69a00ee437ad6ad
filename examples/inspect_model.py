"""What did llmopt do to my model? ``explain`` from Python, and the HTML page.

    python examples/inspect_model.py [--model tiny-llama] [--layers 2] [--seq 16] [--html report.html]

Compiles the model once with llmopt on an example prompt and prints what happened: how
many graphs (and why Dynamo broke the model into several, if it did), what recompiled,
per pass how many rewrites and which near-misses (with the reason a pattern did not
fire), the operations each layer runs before and after the passes, and the kernel
chosen for each linear. ``--html`` writes the same as a self-contained page with the
graphs drawn. (``llmopt inspect MODEL --html out.html`` does all of this from the shell.)
"""
import argparse

import torch

from llmopt.tools.explain import compress_ops
from llmopt.tools.inspection import explain
from llmopt.tools.model_spec import resolve


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny-llama", help="preset, HF model_type, directory or module:factory")
    p.add_argument("--layers", type=int, default=None, help="override the number of layers")
    p.add_argument("--seq", type=int, default=16, help="prompt length of the example input")
    p.add_argument("--html", default="llmopt_report.html", help="where to write the HTML page ('' for none)")
    args = p.parse_args()

    spec = resolve(args.model, layers=args.layers, seq=args.seq)
    with torch.no_grad():
        explanation = explain(spec.model, *spec.example_args, options={"inner": "aten"})
    print(explanation)

    # The same facts, as data:
    report = explanation.reports[0]
    print("\nrewrites per pass:", explanation.rewrites_by_pass())
    # Run it twice: the second run finds the capture in the cache ("hit") and skips AOTAutograd.
    print(f"compile: {report.compile_seconds:.2f}s ({report.phases_text()}), capture cache: {report.capture_cache}")
    for miss in report.near_misses[:5]:
        print(f"near-miss in {miss.layer}: {miss.pass_name}: {miss.reason}")
    first = next((layer for layer in explanation.graphs[0].layers if ".0" in layer.layer), None)
    if first is not None:
        print(f"\n{first.layer}: {len(first.before)} ops before the passes, {len(first.after)} after:")
        print("  " + compress_ops(first.after))
    if args.html:
        explanation.to_html(args.html)
        print(f"\nwrote {args.html} (open it in a browser)")


if __name__ == "__main__":
    main()
